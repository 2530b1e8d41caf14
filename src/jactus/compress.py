"""jactus-compress: calibrate once, then write one compact model per budget (no fine-tuning).

    jactus-compress model=smollm2_135m data=arc_e 'budgets=[0.9,0.8,0.6]'

Each budget gets `<run dir>/budget_<b>/` with the compact model (model.safetensors, rank_map.json, arch.json),
the tokenizer for language models, and a summary.json whose metrics are the accuracy before any fine-tuning.
All budgets come from one memory-bounded `compress_model` run (`calib.max_stats_bytes`, `calib.stats_dtype`):
each summary's `compress_wall_s` is that run's wall time, shared by the palette.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .core import compress_model, count_params, save_compact
from .lit.base import _to_device
from .methods.jactus import Jactus
from .summary import git_sha, write_summary
from .utils.run import CONF_DIR, build_run, method_label, task_wrapper
from .utils.tables import print_results_table


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: expected auto, cpu or cuda")
    return torch.device(name)


@task_wrapper
def compress(cfg: DictConfig) -> list[dict]:
    start = time.perf_counter()
    budgets = list(cfg.budgets) if not isinstance(cfg.budgets, (int, float)) else [cfg.budgets]
    if not budgets:
        raise ValueError("budgets=[]: give at least one retained-parameter ratio, e.g. budgets=[0.8,0.6]")
    method = instantiate(cfg.method, budget=budgets[0], _convert_="all")
    if not isinstance(method, Jactus):
        raise ValueError(f"jactus-compress runs JACTUS and its ablations; method={method_label(cfg)} is not one")
    L.seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    run = build_run(cfg)
    run.datamodule.setup("fit")
    module, model = run.module, run.module.model.to(device)
    calibration = [_to_device(b, device) for b in run.datamodule.calibration_dataloader()]
    module.warmup_head(calibration, cfg.calib.head_warmup_steps, cfg.calib.head_warmup_lr)
    test_loader = run.datamodule.test_dataloader() if cfg.evaluate else None
    rows = [("dense", module.evaluate(test_loader, device))] if test_loader is not None else []

    params_original = count_params(model)
    compress_start = time.perf_counter()
    compacts = compress_model(model, calibration, module.calibration_loss, budgets, targets=method.targets,
                              allocator=method.allocator, scope=method.scope, rank_multiple=method.rank_multiple,
                              rho=method.rho, weight_basis=method.weight_basis, stats_mode=method.stats_mode,
                              damping=method.damping, mask_key=method.mask_key, head_names=module.head_names,
                              device=device, **method.calib.driver_kwargs())
    compress_wall_s = time.perf_counter() - compress_start
    del model  # it is now the last budget's compact model
    summaries = []
    for budget in budgets:
        compact, plan = compacts.pop(0)  # each compact model goes once written and evaluated
        budget_start = time.perf_counter()
        compact = method.export(compact)
        out_dir = Path(cfg.paths.output_dir) / f"budget_{budget}"
        save_compact(compact, out_dir)
        if run.loaded.tokenizer is not None:
            run.loaded.tokenizer.save_pretrained(out_dir)
        metrics = {}
        if test_loader is not None:
            module.model = compact
            metrics = module.evaluate(test_loader, device)
            rows.append((f"{method_label(cfg)}@{budget}", metrics))
        deployed = count_params(compact)
        summary = {
            "method": method_label(cfg), "model": cfg.model.name, "data": cfg.data.name, "budget": budget,
            "seed": int(cfg.seed), "params_original": params_original, "params_deployed": deployed,
            "params_trainable": 0, "params_ratio": deployed / params_original, "metrics": metrics,
            "wall_s": compress_wall_s + time.perf_counter() - budget_start, "git_sha": git_sha(), "status": "ok",
            "experiment": cfg.get("experiment_name"), "fine_tuned": False, "rank_map": dict(plan.ranks),
            "compress_wall_s": compress_wall_s, "compress_stats": compact.jactus_compress_stats,
        }
        write_summary(out_dir, summary)
        summaries.append(summary)
        del compact
    if rows:
        print_results_table(f"{cfg.model.name} on {cfg.data.name}: before fine-tuning: accuracy (%), nll", rows)
    print(f"wrote {len(budgets)} compact models under {cfg.paths.output_dir} in {time.perf_counter() - start:.1f}s")
    return summaries


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compress")
def main(cfg: DictConfig) -> None:
    compress(cfg)


if __name__ == "__main__":
    main()
