"""JACTUS as a method: calibrate -> plan ranks -> factorize into the task-aware union -> train the cores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..core import ALLOCATORS, SCOPES, STATS_MODES, apply_rank_map, compress_model, fold_factorized
from ..core.subspace import WEIGHT_BASES
from .base import CalibSettings, Method, MethodContext, check_budget, choice, register, train_cores


@register("jactus")
class Jactus(Method):
    """Joint adaptation and compression with a task-aware union of subspaces (METHOD.md sections 1-5).

    The ablations of the paper are knobs: `rho=0` (weight subspace only), `weight_basis=plain`,
    `allocator=uniform`, `stats_mode=input` (Sg = I) or `gradient` (Sx = I). Compression runs through the
    memory-bounded `compress_model` with the `calib` group's memory options (`CalibSettings`: `max_stats_bytes`
    bounds the statistics held at once, `stats_dtype` is the dtype of their running sums, ...).
    """

    compresses = True

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
        self.plan = None
        self.compress_stats: dict | None = None
        self.head_names: list[str] = []

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

    def export(self, model: nn.Module) -> nn.Module:
        """Fold every core into its left factor (U <- U C): the deployed (m + n) r layers."""
        return fold_factorized(model)

    def structure(self) -> dict | None:
        if self.plan is None:
            return None
        return {"plan": self.plan.to_dict(), "head_names": self.head_names}

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        from ..core import RankPlan

        self.plan = RankPlan.from_dict(structure["plan"])
        self.head_names = list(structure["head_names"])
        apply_rank_map(model, self.plan.ranks, layer_cls="factorized")
        train_cores(model, self.head_names)  # the one freeze policy, as compress_model applied it
        return model

    def summary(self) -> dict:
        if self.plan is None:
            return {}
        ranks = [r for r in self.plan.ranks.values() if r is not None]
        return {
            "rank_map": dict(self.plan.ranks),
            "rank_stats": {
                "layers": len(self.plan.ranks),
                "factorized": len(ranks),
                "dense": len(self.plan.ranks) - len(ranks),
                "rank_min": min(ranks) if ranks else None,
                "rank_mean": sum(ranks) / len(ranks) if ranks else None,
                "rank_max": max(ranks) if ranks else None,
            },
            "plan_ratio": self.plan.ratio,
            **({"compress_stats": self.compress_stats} if self.compress_stats else {}),
        }
