"""jactus-train: fine-tune (and, for compressing methods, compress first) a backbone on a task.

    jactus-train model=dinov2_small data=fashion_mnist method=jactus budget.ratio=0.8
    jactus-train -m method=full_ft,lora,jactus model=vit_tiny_test data=synthetic_vision trainer.fast_dev_run=true
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from .callbacks import CompressionCallback
from .core import model_dtype, save_compact, stored_bytes
from .distill import DistillSettings
from .summary import ITEMS_FILE, bytes_fields, git_sha, write_items, write_summary
from .utils.run import CONF_DIR, build_run, flat_config, method_label, task_wrapper
from .utils.tables import print_results_table

log = logging.getLogger("jactus")


@task_wrapper
def train(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    label = method_label(cfg)
    summary = {
        "method": label, "model": cfg.model.name, "data": cfg.data.name, "budget": None, "seed": int(cfg.seed),
        "params_original": None, "params_deployed": None, "params_trainable": None, "params_ratio": None,
        "bytes_deployed": None,
        "metrics": {}, "wall_s": None, "git_sha": git_sha(), "status": "failed",
        "experiment": cfg.get("experiment_name"), "run_dir": str(run_dir),
    }
    try:
        return _train(cfg, run_dir, summary, start)
    except BaseException as err:
        summary["error"] = f"{type(err).__name__}: {err}"
        summary["wall_s"] = time.perf_counter() - start
        write_summary(run_dir, summary)
        raise


def _train(cfg: DictConfig, run_dir: Path, summary: dict, start: float) -> dict:
    if not cfg.finetune and cfg.get("ckpt_path"):
        raise ValueError(f"ckpt_path={cfg.ckpt_path} resumes training, but finetune=false trains nothing")
    export_dtype(cfg.get("export_dtype"), None)  # a bad name fails before any loading
    L.seed_everything(cfg.seed, workers=True)
    method = instantiate(cfg.method, _convert_="all")  # bad method options fail here, before any loading
    run = build_run(cfg)
    summary["lr"] = run.module.lr
    # the dense model's bytes in the dtype the deployed model is written in, counted before any method changes it
    bytes_original = stored_bytes(run.module.model, dtype=export_dtype(cfg.get("export_dtype"),
                                                                       model_dtype(run.module.model)))["total"]
    compression = CompressionCallback(
        method,
        head_warmup_steps=cfg.calib.head_warmup_steps,
        head_warmup_lr=cfg.calib.head_warmup_lr,
        evaluate_before=cfg.evaluate_before,
        evaluate_dense_before=cfg.evaluate_dense_before,
        before_split="test" if cfg.test else "val",
        distill=DistillSettings(**(cfg.get("distill") or {})),
        ckpt_path=cfg.get("ckpt_path"),
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [compression] + [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(flat_config(cfg))

    if cfg.finetune:
        trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    else:
        # No training step, whatever trainer.max_steps says: a sweep-wide `trainer.max_steps=N` must not train the
        # zero_shot row (it did when that row relied on `max_steps: 0`). The method (and the head warm-up of a new
        # vision head) is still applied: the callback's `setup` runs for the evaluation below as it would for fit.
        log.info("finetune=false: evaluating %s without training", method_label(cfg))
    # A palette method (jactus_palette) trained one model per budget: each is evaluated here, smallest first, so that
    # the largest, active last, is the run's main model (its metrics, params_deployed).
    members = method.palette_members()
    palette, member_items = [], []
    for budget, activate in members:
        activate(run.module.model)
        run.module.metric_tag = member_tag(budget)  # the loggers get each member's metrics under its own names
        palette.append({"budget": budget, "metrics": _evaluate(cfg, trainer, run)})
        # each member's per-item results, tagged with its budget (one items file for the run)
        member_items += [{**record, "budget": budget} for record in _item_records(run.module, cfg.data.name)]
    run.module.metric_tag = ""
    metrics = palette[-1]["metrics"] if palette else _evaluate(cfg, trainer, run)
    if not compression.applied:  # finetune=false, test=false and no validation split: nothing ran at all
        raise ValueError("finetune=false with test=false and no validation split evaluates nothing: set test=true or "
                         "give the data a validation split (data.module.val_size / data.module.val_per_task)")

    deployed = method.export(run.module.model)
    deployed = deployed.to(export_dtype(cfg.get("export_dtype"), compression.backbone_dtype))
    summary.update(
        budget=method.budget,
        # what the budget counts (model | targets): the same budget over another scope is another row of a report
        budget_scope=getattr(method, "scope", None) if method.budget is not None else None,
        budget_unit=method.unit if method.budget is not None else None,  # params | bytes: what the budget counts
        params_original=compression.params_original,
        params_trainable=compression.params_trainable,
        params_deployed=method.params_deployed(deployed),
        metrics=metrics,
        metrics_before=compression.metrics_before,
        compress_wall_s=compression.apply_wall_s,
        resumed_from=cfg.get("ckpt_path"),
        compress_peak_mem_gb=compression.apply_peak_mem_gb,
        backbone_dtype=str(compression.backbone_dtype).replace("torch.", ""),
        export_dtype=str(next(deployed.parameters()).dtype).replace("torch.", ""),
        status="ok",
    )
    summary["params_ratio"] = summary["params_deployed"] / summary["params_original"]
    summary.update(bytes_fields(deployed, bytes_original))
    for member, (budget, activate) in zip(palette, members, strict=True):
        activate(run.module.model)
        member_model = method.export(run.module.model).to(export_dtype(cfg.get("export_dtype"),
                                                                       compression.backbone_dtype))
        member["params_deployed"] = method.params_deployed(member_model)
        member["params_ratio"] = member["params_deployed"] / summary["params_original"]
        member.update(bytes_fields(member_model, bytes_original))
        if cfg.save_compact and trainer.is_global_zero:
            _save_compact(member_model, run_dir / "compact" / f"budget_{budget}", run)
    if palette:
        summary["palette"] = palette
    if compression.distill_summary:
        summary["distill"] = compression.distill_summary
    summary.update(method.summary())
    items = member_items if palette else _item_records(run.module, cfg.data.name)
    if items:
        summary["items"] = ITEMS_FILE
    summary["wall_s"] = time.perf_counter() - start
    if trainer.is_global_zero:
        if items:
            write_items(run_dir, items)
        if cfg.save_compact and not palette:  # a palette's members went to compact/budget_<b> above
            _save_compact(deployed, run_dir / "compact", run)
        write_summary(run_dir, summary)
        _log_to_loggers(trainer, summary)
        _print_before_after(summary)
    return summary


def _evaluate(cfg: DictConfig, trainer: L.Trainer, run) -> dict[str, float]:
    """`test/*` metrics (with `test`) and `val/*` metrics (when there is a validation split) of the model as it is,
    under these names whatever `run.module.metric_tag` the loggers received them with."""
    metrics: dict[str, float] = {}
    run.module.item_results.clear()  # only the final evaluations' items (not the before-training ones) are written
    if cfg.test:
        results = trainer.test(run.module, datamodule=run.datamodule, verbose=False)
        metrics = _stage_metrics(results, "test", run.module.metric_tag)
    metrics.update(_validate(trainer, run))  # also with test=false: a learning-rate search needs val alone
    return metrics


def member_tag(budget: float) -> str:
    """The metric tag of a palette member (`TaskModule.metric_tag`): `_b60` for budget 0.6, so `test_b60/acc`. The
    budget is in percent with `p` for a decimal point (`_b62p5`): W&B reads a dot in a metric name as nesting."""
    return "_b" + f"{100 * budget:g}".replace(".", "p")


def _stage_metrics(results: list[dict], stage: str, tag: str) -> dict[str, float]:
    """The `<stage><tag>/<name>` entries of a trainer's results, as `<stage>/<name>`."""
    prefix = f"{stage}{tag}/"
    return {f"{stage}/{key[len(prefix):]}": float(value) for key, value in (results[0] if results else {}).items()
            if key.startswith(prefix)}


def _save_compact(deployed, path: Path, run) -> None:
    save_compact(deployed, path)
    if run.loaded.tokenizer is not None:
        run.loaded.tokenizer.save_pretrained(path)


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_dtype(name: str | None, backbone_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the deployed model is written in: `export_dtype` (null: the backbone's, whose frozen tensors are
    already in it; the fp32 trainables are cast to it)."""
    if name is None:
        return backbone_dtype or torch.float32
    if name not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype={name!r}: expected null (the backbone's dtype) or one of {list(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


def _validate(trainer: L.Trainer, run) -> dict[str, float]:
    """`val/*` metrics of the trained model when the data has a validation split (`data.module.val_size`,
    `val_per_task`): what learning-rate searches select on, so the test split is never used to choose.

    Fitting runs without a validation loop (trainer.limit_val_batches=0), so the split is evaluated once here."""
    if len(run.datamodule.val_dataloader().dataset) == 0:
        return {}
    if not trainer.limit_val_batches:
        trainer.limit_val_batches = 1.0
    results = trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    return _stage_metrics(results, "val", run.module.metric_tag)


def _item_records(module, data_name: str) -> list[dict]:
    """The per-item results of the final test and validation evaluations (items.jsonl.gz; see jactus.summary)."""
    records = []
    for stage in ("test", "val"):
        records += module.item_records(stage, default_task=data_name) or []
    return records


def _log_to_loggers(trainer: L.Trainer, summary: dict) -> None:
    numbers = {f"{k.replace('_', '/', 1)}": v for k, v in summary.items()
               if k.startswith(("params_", "bytes_")) and isinstance(v, (int, float))}  # params/ratio, bytes/deployed
    if summary.get("palette"):  # the members logged under their own names; the largest is also the run's `test/*`
        numbers.update(summary["metrics"])
    for logger in trainer.loggers:
        logger.log_metrics(numbers, step=trainer.global_step)
        logger.save()  # the trainer has finalized its loggers already: a CSV logger would not write these rows
        if summary.get("rank_map") and hasattr(logger, "log_table"):
            rows = [[name, -1 if rank is None else rank] for name, rank in summary["rank_map"].items()]
            logger.log_table(key="rank_map", columns=["layer", "rank (-1 = dense)"], data=rows)


def _print_before_after(summary: dict) -> None:
    rows, params = [], {}
    before = summary.get("metrics_before") or {}
    original, deployed = summary["params_original"], summary["params_deployed"]
    if "dense" in before:
        rows.append(("dense, before fine-tuning", before["dense"]))
        params[rows[-1][0]] = f"{original / 1e6:.2f}M (100%)"
    if "method" in before:
        rows.append((f"{summary['method']}, before fine-tuning", before["method"]))
        params[rows[-1][0]] = f"{deployed / 1e6:.2f}M ({100 * summary['params_ratio']:.1f}%)"
    if summary["metrics"]:
        rows.append((f"{summary['method']}, after fine-tuning", summary["metrics"]))
        params[rows[-1][0]] = f"{deployed / 1e6:.2f}M ({100 * summary['params_ratio']:.1f}%)"
    if rows:
        print_results_table(f"{summary['model']} on {summary['data']}: accuracy (%), nll", rows, params)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    summary = train(cfg)
    metric = cfg.get("optimized_metric") or "test/acc"
    value = summary["metrics"].get(metric)
    if value is None and cfg.get("hparams_search"):  # a sweeper must not optimise a missing number
        raise ValueError(f"optimized_metric={metric!r} is not among this run's metrics {sorted(summary['metrics'])}: "
                         f"a search selects on validation, so the data needs a validation split "
                         f"(data.module.val_size / data.module.val_per_task)")
    return value


if __name__ == "__main__":
    main()
