"""What the plan-based low-rank methods (jactus, cersa, compress_then_adapt) share: a rank plan from the one
compression driver, its checkpointed structure, its rebuild for a resume, and the plan's figures in summary.json."""

from __future__ import annotations

from torch import nn

from ..core import FactorizedLinear, RankPlan, apply_rank_map, fold_factorized
from .base import Method, train_cores


class LowRankMethod(Method):
    """Subclasses set `self.plan` and `self.head_names` in `apply`. By default the factorized layers keep their
    cores trainable (`FactorizedLinear`, the one freeze policy) and `export` folds each core into its left factor;
    a subclass with other layers overrides `layer_cls` and `prepare_rebuilt`."""

    compresses = True
    layer_cls: type[nn.Module] = FactorizedLinear

    def __init__(self):
        self.plan: RankPlan | None = None
        self.head_names: list[str] = []

    def export(self, model: nn.Module) -> nn.Module:
        """Fold every core into its left factor (U <- U C): the deployed (m + n) r layers."""
        return fold_factorized(model)

    def structure(self) -> dict | None:
        if self.plan is None:
            return None
        return {"plan": self.plan.to_dict(), "head_names": self.head_names}

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        """The plan's layer shapes (no calibration); the checkpoint's weights are loaded into them next."""
        self.plan = RankPlan.from_dict(structure["plan"])
        self.head_names = list(structure["head_names"])
        apply_rank_map(model, self.plan.ranks, layer_cls=self.layer_cls, shared=self.plan.shared or ())
        return self.prepare_rebuilt(model)

    def prepare_rebuilt(self, model: nn.Module) -> nn.Module:
        """What `apply` does after factorizing, for a rebuilt model: by default, the cores train."""
        train_cores(model, self.head_names)
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
                "residual_total": sum(self.plan.residual.values()) if self.plan.residual is not None else None,
            },
            "rank_residual": dict(self.plan.residual) if self.plan.residual is not None else None,
            "plan_ratio": self.plan.ratio,
        }
