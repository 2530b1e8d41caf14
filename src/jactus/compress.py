"""jactus-compress: calibrate, then write one compact model per budget (no fine-tuning).

    jactus-compress model=smollm2_135m data=arc_e 'budgets=[0.9,0.8,0.6]'            # JACTUS (the default)
    jactus-compress model=smollm2_135m data=arc_e method=compress_then_adapt budgets=[0.8]

Each budget gets `<run dir>/budget_<b>/` with the compact model (model.safetensors, rank_map.json, arch.json),
the tokenizer for language models, and a summary.json whose metrics are the accuracy before any fine-tuning.
JACTUS and its ablations get every budget from one memory-bounded `compress_model` run (one calibration, the
`calib` group's memory options): each summary's `compress_wall_s` is that run's, shared by the palette. Any other
compressing method (cersa, compress_then_adapt, tunecomp) is applied once per budget to a copy of the dense model
(compress_then_adapt's adapters start at zero and tunecomp's student is exported as initialised, so these are the
compressed models their fine-tuning starts from). A full-size method (lora, full_ft, ...) is refused.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from .core import count_params, save_compact, stored_bytes
from .core.calibration import to_device
from .methods.base import MethodContext, input_batches_for
from .methods.jactus import Jactus
from .summary import bytes_fields, git_sha, write_summary
from .utils.run import CONF_DIR, build_run, method_label, task_wrapper
from .utils.tables import print_results_table


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def _budgets(cfg: DictConfig) -> list[float]:
    budgets = list(cfg.budgets) if not isinstance(cfg.budgets, (int, float)) else [cfg.budgets]
    if not budgets:
        raise ValueError("budgets=[]: give at least one retained-parameter ratio, e.g. budgets=[0.8,0.6]")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise ValueError(f"budgets={budgets}: {budget!r} is not a retained-parameter ratio in (0, 1]")
    return [float(b) for b in budgets]


@task_wrapper
def compress(cfg: DictConfig) -> list[dict]:
    start = time.perf_counter()
    budgets = _budgets(cfg)
    label = method_label(cfg)
    if not getattr(get_class(cfg.method._target_), "compresses", False):
        raise ValueError(f"method={label} keeps the model at full size; jactus-compress takes a compressing method: "
                         f"jactus (and its ablations), cersa, compress_then_adapt, tunecomp or taco")
    methods = [instantiate(cfg.method, budget=budget, _convert_="all") for budget in budgets]  # options fail here
    L.seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    run = build_run(cfg)
    run.datamodule.setup("fit")
    module, model = run.module, run.module.model.to(device)
    calibration = [to_device(b, device) for b in run.datamodule.calibration_dataloader()]
    text = input_batches_for(methods[0], run.datamodule)  # generic text for Sx only
    input_batches = None if text is None else [to_device(b, device) for b in text]
    module.warmup_head(calibration, cfg.calib.head_warmup_steps, cfg.calib.head_warmup_lr)
    test_loader = run.datamodule.test_dataloader() if cfg.evaluate else None
    rows = [("dense", module.evaluate(test_loader, device))] if test_loader is not None else []
    params_original = count_params(model)
    bytes_original = stored_bytes(model)["total"]  # the compact models are written in the backbone's dtype

    def compressed():
        """(budget, method, compact model, seconds) per budget, one at a time (each goes once written)."""
        if isinstance(methods[0], Jactus) and not methods[0].sparse_share:  # one calibration for every budget
            method = methods[0]
            begin = time.perf_counter()
            planned = [method.params_budget(model, budget, method.targets) for budget in budgets]  # unit=bytes
            ctx = MethodContext(model=model, loss_fn=module.calibration_loss, calibration_batches=calibration,
                                head_names=module.head_names, family=module.family, device=device,
                                input_batches=input_batches)
            results = method.compress(ctx, planned)  # every option of the method (shared bases, compensation)
            seconds = time.perf_counter() - begin
            for budget in budgets:
                compact, method.plan = results.pop(0)
                yield budget, method, compact, seconds
            return
        for index, (budget, method) in enumerate(zip(budgets, methods, strict=True)):
            dense = model if index == len(budgets) - 1 else copy.deepcopy(model)
            begin = time.perf_counter()
            ctx = MethodContext(model=dense, loss_fn=module.calibration_loss, calibration_batches=calibration,
                                head_names=module.head_names, family=module.family, device=device,
                                input_batches=input_batches)
            compact = method.apply(ctx)
            yield budget, method, compact, time.perf_counter() - begin

    summaries = []
    for budget, method, compact, compress_wall_s in compressed():
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
            rows.append((f"{label}@{budget}", metrics))
        deployed = method.params_deployed(compact)  # a sparse method counts its non-zeros
        summary = {
            "method": label, "model": cfg.model.name, "data": cfg.data.name, "budget": budget,
            "seed": int(cfg.seed), "params_original": params_original, "params_deployed": deployed,
            "params_trainable": 0, "params_ratio": deployed / params_original, "metrics": metrics,
            "wall_s": compress_wall_s + time.perf_counter() - budget_start, "git_sha": git_sha(), "status": "ok",
            "experiment": cfg.get("experiment_name"), "fine_tuned": False, "compress_wall_s": compress_wall_s,
            "budget_scope": getattr(method, "scope", None), "budget_unit": method.unit,
            **bytes_fields(compact, bytes_original), **method.summary(),
        }
        if getattr(compact, "jactus_compress_stats", None) is not None:
            summary["compress_stats"] = compact.jactus_compress_stats
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
