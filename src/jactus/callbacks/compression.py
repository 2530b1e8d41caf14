"""Applies any `Method` (JACTUS or a baseline) inside a Lightning run, at the one moment that is right for it.

Lightning's order is: `setup` hooks -> `configure_model` -> the strategy wraps the model (DDP / FSDP) and moves it
-> checkpoint restore of training state -> `on_fit_start`. The method must run in `setup`: once the strategy has
wrapped the model, DDP has already registered the dense weights' gradient buckets and FSDP has flattened and sharded
them, so replacing `nn.Linear`s by factorized layers afterwards would leave the wrapper pointing at parameters that no
longer exist (and, under FSDP, the full weights needed for calibration would no longer be on any single rank).
In `setup` the process group already exists, so calibration statistics are all-reduced, rank 0's plan and layers are
broadcast, and every rank holds the identical factorization.

Distillation (docs/METHOD.md section 9): with `distill.weight` > 0 the dense model's targets are cached over the
training set after the head warm-up and before the method changes the model (or, for a method with its own teacher such
as TuneComp, computed by that teacher each step); the LightningModule adds the KL term in `training_step`. The cache
travels in checkpoints, so a resumed run distils toward the same targets; an LM's cache is built at the run's
`distill.temperature` and `distill.topk`, so a resume with other values fails rather than change the objective.

Precision (docs/METHOD.md section 8): after the method is applied (or its structure rebuilt for a resume, before
Lightning loads the checkpoint's weights into it), every trainable tensor is cast to fp32 while the frozen ones keep the
backbone's dtype; the trainer's precision flag must be one that keeps them so (`core.precision.check_precision`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..core import check_precision, count_params, model_dtype, upcast_trainable
from ..core.calibration import check_every_rank_has_batches
from ..distill import Distillation, DistillSettings, TeacherCache, build_cache
from ..methods.base import Method, MethodContext, input_batches_for
from ..utils.tables import print_rank_table

CHECKPOINT_KEY = "jactus_method"
DISTILL_CHECKPOINT_KEY = "jactus_distill_cache"


class CompressionCallback(Callback):
    """Prepare `pl_module.model` with `method` before the strategy wraps it; steer training; checkpoint structure.

    Works with any LightningModule that has a `model` attribute and a `calibration_loss(model, batch)` method,
    and a datamodule with `calibration_dataloader()` (else the first `calib_batches` training batches are used).
    """

    def __init__(
        self,
        method: Method,
        head_warmup_steps: int = 0,
        head_warmup_lr: float = 1e-2,
        evaluate_before: bool = False,
        evaluate_dense_before: bool = True,
        calib_batches: int | None = None,
        before_split: str = "test",
        distill: DistillSettings | None = None,
        ckpt_path: str | None = None,
    ):
        if head_warmup_steps < 0:
            raise ValueError(f"calib.head_warmup_steps={head_warmup_steps}: expected >= 0")
        if before_split not in ("test", "val"):
            raise ValueError(f"before_split={before_split!r}: expected 'test' or 'val'")
        self.method = method
        self.head_warmup_steps = head_warmup_steps
        self.head_warmup_lr = head_warmup_lr
        self.evaluate_before = evaluate_before
        self.evaluate_dense_before = evaluate_dense_before
        self.before_split = before_split  # "val" in selection runs (test=false), which must not read the test split
        self.calib_batches = calib_batches
        self.applied = False
        self.params_original: int | None = None
        self.params_trainable: int | None = None
        self.metrics_before: dict[str, dict[str, float]] = {}
        self.apply_wall_s: float | None = None
        self.apply_peak_mem_gb: float | None = None
        self.backbone_dtype: torch.dtype | None = None
        # The checkpoint a resumed run starts from. Lightning sets `trainer.ckpt_path` only after the `setup` hooks,
        # so the caller passes it (jactus-train: `ckpt_path`); without it the method would be applied afresh.
        self.ckpt_path = ckpt_path
        self.distill = distill or DistillSettings()
        self.distill_weight = self.distill.resolved_weight(method)  # a bad pairing fails before any loading
        self.teacher_cache: TeacherCache | None = None
        self.distill_summary: dict = {}

    # ---- before the strategy wraps the model -----------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.applied:
            return
        self._check_strategy(trainer)
        self.backbone_dtype = model_dtype(pl_module.model)
        check_precision(trainer.precision, self.backbone_dtype)
        self.params_original = count_params(pl_module.model)
        ckpt_path = self.ckpt_path or trainer.ckpt_path
        if ckpt_path:
            self._rebuild_from_checkpoint(ckpt_path, pl_module)
        else:
            self._apply(trainer, pl_module)
        upcast_trainable(pl_module.model)  # what trains is fp32, whatever the method left in the backbone's dtype
        pl_module.method = self.method  # training_step adds the method's loss terms
        pl_module.distillation = self._distillation(pl_module)
        self.params_trainable = self.method.params_trainable(pl_module.model)
        self.applied = True
        summary = self.method.summary()
        if trainer.is_global_zero and summary.get("rank_map"):
            print_rank_table(summary["rank_map"], pl_module.model)

    def _check_strategy(self, trainer: L.Trainer) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if not self.method.shardable and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(f"method {self.method.name!r} cannot train under {type(trainer.strategy).__name__}: "
                             f"{self.method.unshardable_reason}; use trainer=ddp (or trainer=gpu) instead")

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        pl_module.model.to(device)
        calibration = _move(self._calibration_batches(trainer), device, trainer.global_rank, trainer.world_size)
        # Under DDP a rank without a calibration batch would leave the others waiting in a collective: all fail.
        check_every_rank_has_batches(len(calibration), "calibration", device)
        if self.head_warmup_steps and pl_module.head_names:
            pl_module.warmup_head(calibration, self.head_warmup_steps, self.head_warmup_lr)
        split, loader = self.before_split, None
        if self.evaluate_before:
            loader = getattr(trainer.datamodule, f"{split}_dataloader")()
        if loader is not None and self.evaluate_dense_before:
            self.metrics_before["dense"] = pl_module.evaluate(loader, device, stage=split)
        if self._needs_cache():
            self._build_teacher_cache(trainer, pl_module, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        ctx = MethodContext(
            model=pl_module.model,
            loss_fn=pl_module.calibration_loss,
            calibration_batches=calibration,
            head_names=pl_module.head_names,
            family=pl_module.family,
            device=device,
            input_batches=self._input_batches(trainer, device),
        )
        pl_module.model = self.method.apply(ctx).to(device)
        self.apply_wall_s = time.perf_counter() - start
        if device.type == "cuda":
            self.apply_peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2**30
        if loader is not None and self.method.compresses:
            self.metrics_before["method"] = pl_module.evaluate(loader, device, stage=split)

    # ---- distillation ----------------------------------------------------------------------------------------
    def _needs_cache(self) -> bool:
        return self.distill_weight > 0 and not self.method.own_teacher

    def _build_teacher_cache(self, trainer: L.Trainer, pl_module: L.LightningModule, device: torch.device) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "distillation_dataloader"):
            raise ValueError(f"distill.weight={self.distill_weight}: the datamodule {type(datamodule).__name__} has no "
                             f"distillation_dataloader() (the training set in order, with example indices)")
        start = time.perf_counter()
        self.teacher_cache = build_cache(pl_module.model, datamodule.distillation_dataloader(),
                                         pl_module.loss_and_logits, family=pl_module.family, topk=self.distill.topk,
                                         temperature=self.distill.temperature, device=device,
                                         rank=trainer.global_rank, world_size=trainer.world_size)
        self.distill_summary = {"cache_examples": len(self.teacher_cache),
                                "cache_mb": self.teacher_cache.nbytes() / 2**20,
                                "cache_wall_s": time.perf_counter() - start}

    def _distillation(self, pl_module: L.LightningModule) -> Distillation | None:
        if self.distill_weight == 0:
            return None
        distillation = Distillation(self.distill_weight, self.distill.temperature, cache=self.teacher_cache)
        if self.method.own_teacher:
            def teacher_logits(model, batch):
                with self.method.distill_teacher(model):
                    return pl_module.loss_and_logits(model, batch)[1]

            distillation.teacher_fn = teacher_logits
        elif self.teacher_cache is None:
            raise RuntimeError("distillation is on but no teacher cache was built")
        self.distill_summary.update(weight=self.distill_weight, temperature=self.distill.temperature,
                                    topk=self.distill.topk, teacher="own" if distillation.teacher_fn else "cache")
        return distillation

    def _input_batches(self, trainer: L.Trainer, device: torch.device) -> list | None:
        """This rank's share of the datamodule's input-only calibration batches (`input_batches_for`)."""
        loader = input_batches_for(self.method, trainer.datamodule)
        return None if loader is None else _move(loader, device, trainer.global_rank, trainer.world_size)

    def _calibration_batches(self, trainer: L.Trainer) -> Iterable:
        datamodule = trainer.datamodule
        if hasattr(datamodule, "calibration_dataloader"):
            return datamodule.calibration_dataloader()
        if self.calib_batches is None:
            raise ValueError("the datamodule has no calibration_dataloader(); set calib_batches to use training batches")
        batches = []
        for index, batch in enumerate(datamodule.train_dataloader()):
            if index >= self.calib_batches:
                break
            batches.append(batch)
        return batches

    def _rebuild_from_checkpoint(self, ckpt_path: str, pl_module: L.LightningModule) -> None:
        """Resume: rebuild the trained structure from the checkpoint (no calibration); Lightning loads weights next."""
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError(f"checkpoint {ckpt_path} was not written by a jactus run (no {CHECKPOINT_KEY!r} entry)")
        if saved["name"] != self.method.name:
            raise ValueError(f"checkpoint {ckpt_path} was trained with method {saved['name']!r}, "
                             f"but this run's method is {self.method.name!r}")
        if saved["structure"] is not None:
            pl_module.model = self.method.rebuild(pl_module.model, saved["structure"])
        if self._needs_cache():
            if DISTILL_CHECKPOINT_KEY not in checkpoint:
                raise ValueError(f"checkpoint {ckpt_path} holds no distillation targets, but this run has "
                                 f"distill.weight={self.distill_weight}: resume with the distill settings it was "
                                 f"trained with")
            cache = TeacherCache.from_state_dict(checkpoint[DISTILL_CHECKPOINT_KEY])
            mismatched = cache.mismatched_settings(self.distill.temperature, self.distill.topk)
            if mismatched:
                raise ValueError(f"checkpoint {ckpt_path} distils toward dense-model targets built with other settings "
                                 f"({'; '.join(mismatched)}): they would no longer match the student's side of the "
                                 f"KL; resume with the original values, or start a new run (no ckpt_path) to "
                                 f"rebuild the targets")
            self.teacher_cache = cache

    # ---- during training -------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.method.on_train_batch_start(pl_module.model, trainer.global_step, int(trainer.estimated_stepping_batches))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"name": self.method.name, "structure": self.method.structure()}
        if self.teacher_cache is not None:
            checkpoint[DISTILL_CHECKPOINT_KEY] = self.teacher_cache.state_dict()


def _move(batches: Iterable, device: torch.device, rank: int, world_size: int) -> list:
    """Materialise this rank's share of the (small) calibration set on the device.

    Under DDP every rank sees a different shard; calibrate all-reduces the sums, so the statistics equal those of
    the whole set and every rank builds the same factorization."""
    from ..core.calibration import to_device

    return [to_device(batch, device) for index, batch in enumerate(batches) if index % world_size == rank]
