"""CERSA: weight-only SVD keeping a fraction of spectral energy per layer, then train the k x k core.

Each target linear becomes `U C V^T` from the plain SVD of its own weight (no data statistics): with `budget` set
(the default, `budget.ratio`, like every compressing method) the one energy fraction for all layers that meets the
retained-parameter budget, or, with `energy` set and `budget` null, the ranks keeping that fraction of the squared
singular values (the paper's 0.90 / 0.95 rows, whose size is what it turns out to be). The cores `C`, biases, norms and task heads train;
`U` and `V` stay frozen. `export` folds each core (`U <- U C`) into a deployed `LowRankLinear`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..core import SCOPES, compress_model
from ..core.byte_budget import check_unit
from .base import CalibSettings, MethodContext, check_budget, check_positive, choice, register
from .low_rank import LowRankMethod


@register("cersa")
class CERSA(LowRankMethod):
    def __init__(
        self,
        energy: float | None = None,
        budget: float | None = 0.8,
        scope: str = "model",
        rank_multiple: int = 8,
        targets: Sequence[str] | None = None,
        calib: Mapping | None = None,
        unit: str = "params",
    ):
        super().__init__()
        self.unit = check_unit(unit)
        if (energy is None) == (budget is None):
            raise ValueError(f"cersa: set exactly one of method.energy (a spectral-energy fraction, e.g. 0.90) "
                             f"and method.budget (a retained-parameter ratio); got energy={energy!r}, "
                             f"budget={budget!r}")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise ValueError(f"method.energy={energy!r}: expected a spectral-energy fraction in (0, 1], e.g. 0.90")
        self.energy = None if energy is None else float(energy)
        self._budget = None if budget is None else check_budget(budget, "cersa")
        self.scope = choice(scope, SCOPES, "budget.scope")
        self.rank_multiple = check_positive(rank_multiple, "allocator.rank_multiple")
        self.targets = list(targets) if targets else None
        self.calib = CalibSettings.from_config(calib)

    @property
    def budget(self) -> float | None:
        """The budget asked for, or with a fixed energy fraction the ratio that fraction gave (after `apply`)."""
        if self._budget is not None:
            return self._budget
        return None if self.plan is None else self.plan.ratio

    def apply(self, ctx: MethodContext) -> nn.Module:
        # Weight-only: no calibration statistics at all (the driver's decomposition dtype and parking still apply).
        self.head_names = list(ctx.head_names)
        budget = None if self._budget is None else self.params_budget(ctx.model, self._budget, self.targets)
        model, self.plan = compress_model(ctx.model, None, None, budget, targets=self.targets,
                                          allocator="energy", scope=self.scope, rank_multiple=self.rank_multiple,
                                          rho=0.0, weight_basis="plain", stats_mode="none", energy=self.energy,
                                          head_names=self.head_names, device=ctx.device,
                                          **self.calib.driver_kwargs())
        return model

    def summary(self) -> dict:
        summary = super().summary()
        return {"energy": self.energy, **summary} if summary else {}
