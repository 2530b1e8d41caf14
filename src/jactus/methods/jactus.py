"""JACTUS as a method: calibrate -> plan ranks -> factorize into the task-aware union -> train the cores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..core import ALLOCATORS, SCOPES, STATS_MODES, compress_model
from ..core.subspace import WEIGHT_BASES
from .base import CalibSettings, MethodContext, check_budget, choice, register
from .low_rank import LowRankMethod


@register("jactus")
class Jactus(LowRankMethod):
    """Joint adaptation and compression with a task-aware union of subspaces (METHOD.md sections 1-5).

    The ablations of the paper are knobs: `rho=0` (weight subspace only), `weight_basis=plain`,
    `allocator=uniform`, `stats_mode=input` (Sg = I) or `gradient` (Sx = I). Compression runs through the
    memory-bounded `compress_model` with the `calib` group's memory options (`CalibSettings`: `max_stats_bytes`
    bounds the statistics held at once, `stats_dtype` is the dtype of their running sums, ...).
    """

    def __init__(
        self,
        budget: float = 0.8,
        scope: str = "model",
        allocator: str = "marginal_gain",
        rank_multiple: int = 8,
        rho: float = 0.25,
        weight_basis: str = "whitened",
        stats_mode: str = "kfac",
        damping: float = 1e-2,
        targets: Sequence[str] | None = None,
        mask_key: str = "attention_mask",
        calib: Mapping | None = None,
    ):
        super().__init__()
        self._budget = check_budget(budget, "jactus")
        self.scope = choice(scope, SCOPES, "budget.scope")
        self.allocator = choice(allocator, ALLOCATORS, "allocator")
        self.stats_mode = choice(stats_mode, STATS_MODES, "method.stats_mode")
        self.weight_basis = choice(weight_basis, WEIGHT_BASES, "method.weight_basis")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"method.rho={rho}: expected a fraction in [0, 1]")
        if rank_multiple < 1:
            raise ValueError(f"allocator.rank_multiple={rank_multiple}: expected a positive integer")
        if damping < 0:
            raise ValueError(f"calib.damping={damping}: expected >= 0")
        self.rank_multiple, self.rho, self.damping = int(rank_multiple), float(rho), float(damping)
        self.targets = list(targets) if targets else None
        self.mask_key = mask_key
        self.calib = CalibSettings.from_config(calib)
        self.compress_stats: dict | None = None

    @property
    def budget(self) -> float:
        return self._budget

    def apply(self, ctx: MethodContext) -> nn.Module:
        if ctx.calibration_batches is None:
            raise ValueError("jactus needs calibration batches (the datamodule's calibration_dataloader())")
        self.head_names = list(ctx.head_names)
        model, self.plan = compress_model(
            ctx.model,
            ctx.calibration_batches,
            ctx.loss_fn,
            self.budget,
            targets=self.targets,
            allocator=self.allocator,
            scope=self.scope,
            rank_multiple=self.rank_multiple,
            rho=self.rho,
            weight_basis=self.weight_basis,
            stats_mode=self.stats_mode,
            damping=self.damping,
            mask_key=self.mask_key,
            head_names=ctx.head_names,
            device=ctx.device,
            **self.calib.driver_kwargs(),
        )
        self.compress_stats = model.jactus_compress_stats
        return model

    def summary(self) -> dict:
        summary = super().summary()
        if summary and self.compress_stats:
            summary["compress_stats"] = self.compress_stats
        return summary
