"""Which layers lose most when JACTUS compresses (issue 19 item 5): the compressed model's validation NLL with each
kind of target (q_proj, k_proj, ..., down_proj) put back to its dense weights, beside the K-FAC proxy the plan
predicted for that kind (`rank_residual`: the whitened spectrum's energy beyond each rank).

A Hydra app over jactus-train's config: the same overrides build the same model, data split, calibration and plan
(with `calib.stats_cache` a run that calibrated before is not calibrated again). No training: it measures the start
the cores train from. Writes `layer_damage.json` to the run directory and prints a table:

  python experiments/results/offline_llama/validation/layer_damage.py experiment=offline_llama variant=jactus_0.8 \
    seed=0 data.module.test_per_task=150 data.module.val_per_task=20 calib.stats_cache=logs/stats_cache hydra.mode=RUN \
    hydra.run.dir=logs/layer_damage/s0

Rows: "dense" (nothing compressed), "compressed" (the plan), and per kind "compressed, <kind> dense" (that kind
restored): the NLL the kind costs is compressed minus that row, the proxy share is the kind's residual over the total.

A what-if probe of the allocation (not a method option): `+kind_scale="{gate_proj: 1.4, q_proj: 0.3}"` multiplies
the proxy of those kinds (their squared whitened singular values) before the ranks are planned, so the allocator
trades them as if they mattered that much more or less; the factorizations are the usual ones at the ranks that
plan gives. `+restore_kinds=false` skips the per-kind rows (dense and compressed only).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from jactus.core import find_targets
from jactus.methods.base import MethodContext
from jactus.report.bootstrap import paired_bootstrap
from jactus.utils.run import CONF_DIR, build_run

log = logging.getLogger("jactus")


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)  # as jactus-train: the seed draws the split and the calibration items
    method = instantiate(cfg.method, _convert_="all")
    if not getattr(method, "compresses", False):
        raise ValueError(f"method {method.name!r} does not compress; pick a compressing variant (e.g. jactus_0.8)")
    run = build_run(cfg)
    datamodule, module = run.datamodule, run.module
    datamodule.setup("fit")
    device = torch.device("cpu")
    val = list(datamodule.val_dataloader())
    if not val:
        raise ValueError("no validation items: set data.module.val_per_task")

    per_item = {}  # row label -> {task index: per-item NLL in item order}

    def nll(label: str) -> dict:
        start = time.perf_counter()
        metrics = module.evaluate(val, device, stage="val", progress=False)
        items = module.item_results["val"]
        order = torch.argsort(items["task_idx"] * 1_000_000 + items["item_idx"])
        tasks, values = items["task_idx"][order].numpy(), items["nll"][order].double().numpy()
        per_item[label] = {int(task): values[tasks == task] for task in sorted(set(tasks.tolist()))}
        row = {"row": label, "val/nll": metrics["val/nll"], "val/acc": metrics["val/acc"],
               "eval_s": time.perf_counter() - start}
        log.info("%s: val/nll %.4f, val/acc %.2f (%.0f s)", label, row["val/nll"], row["val/acc"], row["eval_s"])
        return row

    kind_scale = dict(cfg.get("kind_scale") or {})
    if kind_scale:
        _scale_the_plans_proxy(kind_scale)
    rows = [nll("dense")]
    dense = {name: copy.deepcopy(layer) for name, layer in find_targets(module.model).items()}
    ctx = MethodContext(model=module.model, loss_fn=module.calibration_loss,
                        calibration_batches=datamodule.calibration_dataloader(), head_names=module.head_names,
                        family=module.family, device=device)
    start = time.perf_counter()
    module.model = method.apply(ctx)
    compress_s = time.perf_counter() - start
    summary = method.summary()
    ranks, residual = summary["rank_map"], summary["rank_residual"]
    rows.append(nll("compressed"))

    by_kind = defaultdict(list)
    for name in ranks:
        by_kind[kind_of(name)].append(name)
    total_residual = sum(residual.values())
    kinds = []
    restore = bool(cfg.get("restore_kinds", True))
    for kind, names in by_kind.items():
        factorized = [name for name in names if ranks[name] is not None]
        kind_residual = sum(residual[name] for name in names)
        entry = {"kind": kind, "targets": len(names), "factorized": len(factorized), "residual": kind_residual,
                 "residual_share": kind_residual / total_residual if total_residual else None}
        if factorized and restore:
            built = {name: module.model.get_submodule(name) for name in factorized}
            for name in factorized:
                module.model.set_submodule(name, dense[name])
            row = nll(f"compressed, {kind} dense")
            for name, layer in built.items():
                module.model.set_submodule(name, layer)
            entry["restored_nll"] = row["val/nll"]
            entry["nll_cost"] = rows[1]["val/nll"] - row["val/nll"]
            interval = paired_bootstrap({0: {task: per_item["compressed"][task] - per_item[row["row"]][task]
                                             for task in per_item["compressed"]}})
            entry["nll_cost_ci95"] = [interval.low, interval.high]  # over the items, resampled within each task
            rows.append(row)
        kinds.append(entry)

    cost_total = sum(k.get("nll_cost", 0.0) for k in kinds)
    for entry in kinds:
        entry["nll_cost_share"] = entry["nll_cost"] / cost_total if "nll_cost" in entry and cost_total else None
    result = {"overrides": list(HydraConfig.get().overrides.task), "seed": cfg.seed, "budget": method.budget,
              "kind_scale": kind_scale, "rank_by_kind": {kind: [ranks[name] for name in names]
                                                        for kind, names in by_kind.items()},
              "val_items": len(module.item_results["val"]["nll"]),
              "compress_s": compress_s, "plan_ratio": summary.get("plan_ratio"), "rows": rows, "kinds": kinds,
              "compressed_minus_dense": rows[1]["val/nll"] - rows[0]["val/nll"], "sum_of_kind_costs": cost_total,
              "stats_cache": (getattr(module.model, "jactus_compress_stats", {}) or {}).get("stats_cache")}
    (out_dir / "layer_damage.json").write_text(json.dumps(result, indent=2))
    print(f"\nval NLL: dense {rows[0]['val/nll']:.4f}, compressed {rows[1]['val/nll']:.4f} "
          f"(+{result['compressed_minus_dense']:.4f}); per kind, restoring it dense:")
    print(f"{'kind':<10} {'fact.':>5} {'proxy share':>11} {'NLL cost':>9} {'95% interval':>18} {'cost share':>10}")
    for entry in sorted(kinds, key=lambda e: -(e.get("nll_cost") or 0)):
        share = entry["residual_share"]
        cost, cost_share = entry.get("nll_cost"), entry.get("nll_cost_share")
        print(f"{entry['kind']:<10} {entry['factorized']:>5} {'-' if share is None else f'{share:.3f}':>11} "
              f"{'-' if cost is None else f'{cost:+.4f}':>9} {_interval(entry.get('nll_cost_ci95')):>18} "
              f"{'-' if cost_share is None else f'{cost_share:.3f}':>10}")
    print(f"sum of the kinds' costs {cost_total:+.4f} against the whole compression's {result['compressed_minus_dense']:+.4f}")


def _scale_the_plans_proxy(kind_scale: dict) -> None:
    """Wrap the plan step of `compress_model` so that each listed kind's spectrum counts `scale` times its proxy."""
    import jactus.core.bounded as bounded

    unknown = [kind for kind in kind_scale if kind not in KINDS]
    if unknown or any(not isinstance(v, (int, float)) or v <= 0 for v in kind_scale.values()):
        raise ValueError(f"kind_scale={kind_scale}: expected positive numbers for kinds among {KINDS}")
    plan_ranks = bounded.plan_ranks

    def scaled(*args, spectra=None, **kwargs):
        if spectra is not None:
            spectra = {name: values * float(kind_scale.get(kind_of(name), 1.0)) ** 0.5 for name, values in spectra.items()}
        return plan_ranks(*args, spectra=spectra, **kwargs)

    bounded.plan_ranks = scaled


KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _interval(bounds) -> str:
    return "-" if bounds is None else f"[{bounds[0]:+.4f}, {bounds[1]:+.4f}]"


if __name__ == "__main__":
    main()
