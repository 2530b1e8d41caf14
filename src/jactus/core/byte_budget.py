"""Budgets in bytes (`budget.unit=bytes`, docs/METHOD.md section 4.3): the deployed model's stored bytes
(`compact.stored_bytes`, what `save_compact` writes) at most `ratio` times the dense model's, counted in the model's
floating dtype over the budget's scope.

Each compressing method plans in its own unit; these helpers turn a byte budget into it:
- a low-rank plan (jactus, compress_then_adapt, cersa, tunecomp) counts parameters: every stored floating tensor has
  the model's item size, and what is not a parameter (buffers such as rotary tables) is stored alike by the dense
  and the compact model, so the byte budget is a slightly smaller parameter budget (`params_ratio_for_bytes`);
- non-zeros cost their value plus their position: an int32 flat position for a sparse correction
  (`SPARSE_POSITION_BYTES`), one bit an entry of the layer for a pruned weight stored as a bitmask
  (`compact.bitmask_bytes`); TACO and the JACTUS sparse share count them so (`ByteBudget`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

UNITS = ("params", "bytes")
SPARSE_POSITION_BYTES = 4  # a sparse correction's flat position, stored as int32 (core.compact)


def check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"budget.unit={unit!r}: expected one of {list(UNITS)} (what budget.ratio counts: retained "
                         f"parameters, or the deployed model's stored bytes)")
    return unit


@dataclass(frozen=True)
class ByteBudget:
    """A byte budget over a scope: `original` bytes of the dense model (or of the target linears), `limit` the
    deployed model may store, `fixed` of them taken by what the method does not compress (buffers and parameters
    outside the targets for scope=model; the targets' biases for scope=targets), at `itemsize` bytes a value."""

    ratio: float
    original: int
    limit: int
    fixed: int
    itemsize: int

    @classmethod
    def of(cls, model: nn.Module, ratio: float, scope: str, targets: Mapping[str, nn.Linear]) -> ByteBudget:
        from .compact import stored_bytes
        from .precision import model_dtype

        itemsize = model_dtype(model).itemsize
        weights = sum(layer.weight.numel() for layer in targets.values()) * itemsize
        if scope == "model":
            original = stored_bytes(model)["total"]
        else:
            original = weights + sum(layer.bias.numel() for layer in targets.values() if layer.bias is not None) \
                * itemsize
        return cls(float(ratio), original, math.floor(ratio * original), original - weights, itemsize)

    def free(self) -> int:
        """Bytes left for the target weights' compressed form."""
        if self.limit <= self.fixed:
            raise ValueError(f"budget.ratio={self.ratio} in bytes allows {self.limit} of {self.original} bytes, but "
                             f"what is not compressed already takes {self.fixed} ({self.fixed / self.original:.4f} "
                             f"of them); raise the budget above that or use budget.scope=targets")
        return self.limit - self.fixed


def params_ratio_for_bytes(model: nn.Module, ratio: float, scope: str, targets: Mapping[str, nn.Linear]) -> float:
    """The retained-parameter ratio (over the same scope) whose low-rank model stores at most `ratio` of the dense
    model's bytes: with every parameter at the model's item size, parameters and bytes differ only by what is not a
    parameter (buffers), which both models store alike (scope=model); over the target linears they are
    proportional."""
    from .params import count_params

    if scope == "targets":
        return float(ratio)
    budget = ByteBudget.of(model, ratio, scope, targets)
    params = count_params(model)
    buffers = budget.original - params * budget.itemsize
    limit = (budget.limit - buffers) // budget.itemsize
    if limit <= 0:
        raise ValueError(f"budget.ratio={ratio} in bytes leaves no room for parameters once the model's "
                         f"{buffers} bytes of buffers are stored")
    return limit / params
