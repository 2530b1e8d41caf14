"""The LightningModule shared by every task: optimisation, evaluation outside the trainer, metric naming."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm


class TaskModule(L.LightningModule):
    """Wraps a backbone `self.model`; subclasses define the loss and how a batch is scored.

    `self.model` is the attribute methods replace (factorize, add adapters); the optimiser is built in
    `configure_optimizers` from whatever is trainable then, so a method applied before fit is honoured.
    """

    family: str = ""

    def __init__(
        self,
        model: nn.Module,
        head_names: Sequence[str] = (),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"optim.lr={lr}: expected a positive learning rate")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio={warmup_ratio}: expected a value in [0, 1)")
        self.model = model
        self.method = None  # set by CompressionCallback: its `loss_terms` join the task loss
        self.distillation = None  # set by CompressionCallback when distill.weight > 0 (jactus.distill.Distillation)
        self.head_names = list(head_names)
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_ratio, self.min_lr_ratio = warmup_ratio, min_lr_ratio

    # ---- what subclasses provide -------------------------------------------------------------------------
    def loss_and_logits(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The task loss of `model` on a training batch, the logits it was computed from at the loss positions
        ([B, C] for a classifier, [M, V] at the M labelled tokens for an LM) and the batch row of each ([B] / [M]).
        The logits are what distillation compares with the dense model's."""
        raise NotImplementedError

    def calibration_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The task loss of `model` on a training batch (used by training and by calibration)."""
        return self.loss_and_logits(model, batch)[0]

    def score_batch(self, batch) -> dict[str, torch.Tensor]:
        """Per-example scores: {"correct": bool [B], "nll": float [B], "task_idx": long [B]}.

        `nll` is the example's loss under the task's own scoring rule (cross-entropy of the true class; the
        per-token negative log-likelihood of the gold answer for QA). Accuracy on a few hundred items moves in
        steps of several points; the mean NLL separates models that accuracy cannot."""
        raise NotImplementedError

    @property
    def task_names(self) -> list[str]:
        return []

    def warmup_head(self, batches: Iterable, steps: int, lr: float) -> None:
        """A short linear probe of the task heads (backbone frozen) before calibration; see core.warmup_head."""
        from ..core import warmup_head

        heads = [p for name in self.head_names for p in self.model.get_submodule(name).parameters()]
        if heads and steps > 0:
            warmup_head(self.model, heads, batches, self.calibration_loss, steps, lr=lr)

    # ---- training --------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss, logits, _ = self.loss_and_logits(self.model, batch)
        batch_size = self._batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        # The method's terms (TuneComp's group lasso, ...) and distillation join the loss here, so the precision
        # plugin's loss scaling and gradient accumulation treat them exactly like the task loss.
        terms = dict(self.method.loss_terms(self.model, batch)) if self.method is not None else {}
        if self.distillation is not None:
            terms["distill"] = self.distillation.term(self.model, batch, logits)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
            loss = loss + value
        if terms:
            self.log("train/total_loss", loss.detach(), batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        from ..core import FactorizedLinear

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: the method froze everything")
        # Weight decay pulls a parameter toward zero: right for a dense weight or a head, wrong for a core, where
        # zero means a layer with zero output rather than the pretrained weights; cores never decay.
        cores = {id(m.C) for m in self.model.modules() if isinstance(m, FactorizedLinear)}
        decay = [p for p in params if p.ndim >= 2 and id(p) not in cores]
        no_decay = [p for p in params if p.ndim < 2 or id(p) in cores]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_ratio * total)
        floor = self.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation ------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self):
        self._counts = self._new_counts()

    def on_test_epoch_start(self):
        self._counts = self._new_counts()

    def validation_step(self, batch, batch_idx):
        self._accumulate(self._counts, self.score_batch(batch))

    def test_step(self, batch, batch_idx):
        self._accumulate(self._counts, self.score_batch(batch))

    def on_validation_epoch_end(self):
        self._log_accuracy("val")

    def on_test_epoch_end(self):
        self._log_accuracy("test")

    def _log_accuracy(self, stage: str) -> None:
        counts = self._counts
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        for key, value in self.metrics_from_counts(counts, stage).items():
            self.log(key, value, sync_dist=False, prog_bar=key == f"{stage}/acc")

    @torch.no_grad()
    def evaluate(self, batches: Iterable, device: torch.device | str | None = None, stage: str = "test",
                 progress: bool = True) -> dict:
        """Accuracy of the current model over `batches` outside any trainer (before/after-compression figures).

        A half-precision backbone with fp32 trainables runs under autocast in its dtype, as `bf16-mixed` trains it."""
        from ..core.precision import HALF_DTYPES, model_dtype

        device = torch.device(device) if device is not None else next(self.model.parameters()).device
        dtype = model_dtype(self.model)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype in HALF_DTYPES else contextlib.nullcontext()
        was_training = self.model.training
        self.model.eval()
        counts = self._new_counts(device)
        with autocast:
            for batch in tqdm(batches, desc=f"evaluate ({stage})", leave=False, disable=not progress):
                self._accumulate(counts, self.score_batch(_to_device(batch, device)))
        self.model.train(was_training)
        return self.metrics_from_counts(counts, stage)

    def _new_counts(self, device=None) -> torch.Tensor:
        """Row t: [correct, total, summed nll] for task t (one row for single-task data)."""
        return torch.zeros(max(1, len(self.task_names)), 3, dtype=torch.float64, device=device or self.device)

    @staticmethod
    def _accumulate(counts: torch.Tensor, scored: dict[str, torch.Tensor]) -> None:
        task = scored["task_idx"].to(counts.device)
        counts[:, 0].index_add_(0, task, scored["correct"].to(counts.dtype).to(counts.device))
        counts[:, 1].index_add_(0, task, torch.ones_like(task, dtype=counts.dtype))
        counts[:, 2].index_add_(0, task, scored["nll"].detach().to(counts.dtype).to(counts.device))

    def metrics_from_counts(self, counts: torch.Tensor, stage: str) -> dict[str, float]:
        """`<stage>/acc` is the mean over tasks (the paper's "Avg."), `<stage>/acc_<task>` each task's; `<stage>/nll`
        and `<stage>/nll_<task>` the same for the mean per-example NLL (see `score_batch`)."""
        counts = counts.detach().cpu()
        seen = counts[:, 1] > 0
        totals = counts[:, 1].clamp_min(1)
        per_task = {"acc": (100.0 * counts[:, 0] / totals).tolist(), "nll": (counts[:, 2] / totals).tolist()}
        out: dict[str, float] = {}
        for metric, values in per_task.items():
            if len(self.task_names) > 1:
                for name, value, has in zip(self.task_names, values, seen.tolist(), strict=True):
                    if has:
                        out[f"{stage}/{metric}_{name}"] = value
            if seen.any():
                out[f"{stage}/{metric}"] = float(torch.tensor(values)[seen].mean())
        return out

    @staticmethod
    def _batch_size(batch) -> int:
        first = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        return int(first.shape[0])


def _to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(v.to(device) if torch.is_tensor(v) else v for v in batch)
    return batch.to(device)
