"""The LightningModule shared by every task: optimisation, evaluation outside the trainer, metric naming."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.calibration import to_device
from ..core.modes import module_modes, restore_modes


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
        # Logged evaluation metrics are named `<stage><metric_tag>/...`: jactus-train tags each palette member
        # (`test_b60/acc`), whose evaluations all run at one step and would otherwise overwrite each other in a logger.
        self.metric_tag = ""

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
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: the method froze everything")
        # Weight decay pulls a parameter toward zero: right for a dense weight or a head, wrong for a core, where
        # zero means a layer with zero output rather than the pretrained weights; cores never decay. Each layer that
        # holds cores names them (`core_parameters()`: FactorizedLinear's C, PaletteLinear's core blocks).
        cores = {id(p) for m in self.model.modules() if hasattr(m, "core_parameters") for p in m.core_parameters()}
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

    def on_fit_start(self):
        # Training runs in train mode, as HF's Trainer and a plain PyTorch loop run it. `from_pretrained` returns an
        # eval-mode model and Lightning (>= 2.2) keeps each submodule's own mode, so without this a pretrained
        # backbone trained in eval mode (its configured dropout off) beside adapters injected in train mode, and any
        # helper that restored the top module's flag switched those adapters' dropout off too. Lightning's
        # validation loop puts the model in eval mode and gives every module its flag back afterwards.
        self.model.train()

    # ---- evaluation ------------------------------------------------------------------------------------------
    # Each evaluation also keeps its per-item results (`item_results[stage]`, written as items.jsonl.gz next to
    # summary.json): what a paired bootstrap over items needs (jactus-report --gaps).
    def on_validation_epoch_start(self):
        self._counts, self._items = self._new_counts(), []

    def on_test_epoch_start(self):
        self._counts, self._items = self._new_counts(), []

    def validation_step(self, batch, batch_idx):
        self._score(batch)

    def test_step(self, batch, batch_idx):
        self._score(batch)

    def _score(self, batch) -> None:
        scored = self.score_batch(batch)
        self._accumulate(self._counts, scored)
        self._keep_items(self._items, scored)

    def on_validation_epoch_end(self):
        self._log_accuracy("val")

    def on_test_epoch_end(self):
        self._log_accuracy("test")

    def _log_accuracy(self, stage: str) -> None:
        counts, items = self._counts, self._items
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            items = _gather_items(items)
        self.item_results[stage] = _stack_items(items)
        logged = stage + self.metric_tag
        for key, value in self.metrics_from_counts(counts, logged).items():
            self.log(key, value, sync_dist=False, prog_bar=key == f"{logged}/acc")

    @property
    def item_results(self) -> dict[str, dict[str, torch.Tensor] | None]:
        """stage -> {"task_idx", "item_idx", "correct", "nll"} ([items] each, CPU) of the last evaluation of that
        stage; None where items carry no ids and several processes evaluated (the positions would collide)."""
        if "_item_results" not in self.__dict__:
            self._item_results = {}
        return self._item_results

    def item_records(self, stage: str, default_task: str = "") -> list[dict] | None:
        """The per-item results of `stage` as items.jsonl.gz records (see `jactus.summary.write_items`); task names
        from `task_names` (`default_task` for single-task data)."""
        results = self.item_results.get(stage)
        if results is None:
            return None
        names = self.task_names if len(self.task_names) > 1 else [self.task_names[0] if self.task_names else
                                                                  default_task]
        return [{"split": stage, "task": names[task], "index": index, "correct": bool(correct), "nll": float(nll)}
                for task, index, correct, nll in zip(results["task_idx"].tolist(), results["item_idx"].tolist(),
                                                     results["correct"].tolist(), results["nll"].tolist(), strict=True)]

    @torch.no_grad()
    def evaluate(self, batches: Iterable, device: torch.device | str | None = None, stage: str = "test",
                 progress: bool = True) -> dict:
        """Accuracy of the current model over `batches` outside any trainer (before/after-compression figures); the
        per-item results go to `item_results[stage]`.

        A half-precision backbone with fp32 trainables runs under autocast in its dtype, as `bf16-mixed` trains it."""
        from ..core.precision import autocast_for

        device = torch.device(device) if device is not None else next(self.model.parameters()).device
        modes = module_modes(self.model)
        self.model.eval()
        counts, items = self._new_counts(device), []
        with autocast_for(self.model, device):
            for batch in tqdm(batches, desc=f"evaluate ({stage})", leave=False, disable=not progress):
                scored = self.score_batch(to_device(batch, device))
                self._accumulate(counts, scored)
                self._keep_items(items, scored)
        restore_modes(modes)
        self.item_results[stage] = _stack_items(items)
        return self.metrics_from_counts(counts, stage)

    @staticmethod
    def _keep_items(items: list[dict], scored: dict[str, torch.Tensor]) -> None:
        """Append a batch's per-item results; without `item_idx` in `scored` an item's id is its position in the
        evaluation order (an unshuffled loader: the index in the split)."""
        kept = {key: scored[key].detach().cpu() for key in ("task_idx", "correct", "nll")}
        if "item_idx" in scored:
            kept["item_idx"] = scored["item_idx"].detach().cpu()
        else:
            start = sum(len(batch["correct"]) for batch in items)
            kept["item_idx"] = torch.arange(start, start + len(kept["correct"]))
            kept["positional"] = True
        items.append(kept)

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


def _stack_items(items: list[dict]) -> dict[str, torch.Tensor] | None:
    if any(batch is None for batch in items):
        return None
    keys = ("task_idx", "item_idx", "correct", "nll")
    if not items:
        return {key: torch.zeros(0) for key in keys}
    return {key: torch.cat([batch[key].reshape(-1) for batch in items]) for key in keys}


def _gather_items(items: list[dict]) -> list[dict | None]:
    """Every process's per-item results (positional ids from several processes would collide: None then)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    everything = [batch for part in gathered for batch in part]
    return [None] if any(batch.get("positional") for batch in everything) else everything

