"""RoSA's sparse adapter on a full-size linear: `y = W x + b + S x` (docs/METHOD.md section 10, `rosa`).

`S` has a fixed number of non-zeros (`nnz`, known from the density and the shape), whose values are an fp32 parameter
from the start, so an optimizer built before training owns them; its support (`sparse.index`, a buffer that
checkpoints carry) is chosen later, once, by `select` (RoSA picks it after a LoRA warm-up). Until then the adapter adds
nothing, and the values get zero gradients that an optimizer still counts as steps: `restart_optimizer_state` makes
the step after `select` their first. The frozen weight and bias are the base layer's own parameter objects, so the
state-dict names stay `weight` and `bias`, and a LoRA wrapper (PEFT) merges into `weight` as into any `nn.Linear`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from .sparse import SparseDelta


def density_nnz(density: float, out_features: int, in_features: int) -> int:
    """The non-zeros of an m x n sparse adapter at `density`: floor(density * m * n), at least one (RoSA's
    `int(density * numel)`; the product is rounded to 6 decimals first, so e.g. 0.29 * 100 gives 29, not 28)."""
    return max(1, math.floor(round(density * out_features * in_features, 6)))


class SparseAdaptedLinear(nn.Linear):
    """A frozen `nn.Linear` plus a sparse adapter `sparse` (`core.sparse.SparseDelta`) of `nnz` trainable values."""

    def __init__(self, base: nn.Linear, nnz: int):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        # A placeholder support (the first nnz positions), replaced by `select`; the values start at zero.
        placeholder = torch.arange(nnz, device=base.weight.device)
        self.sparse = SparseDelta(self.out_features, self.in_features, placeholder)
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.active:
            # in fp32 (the values' dtype, autocast off), back in the output's dtype
            return y + self.sparse(x, compute_dtype=self.sparse.values.dtype).to(y.dtype)
        # Not applied yet, but in the graph with a zero gradient: DDP without find_unused_parameters needs every
        # trainable parameter to get a gradient each step, and AdamW keeps zero values with zero gradients at zero.
        return y + self.sparse.values.sum().mul(0).to(y.dtype)

    @torch.no_grad()
    def select(self, index: torch.Tensor) -> None:
        """Fix the support (flat row-major positions, `nnz` of them) and start applying the adapter at S = 0."""
        if index.numel() != self.sparse.nnz:
            raise ValueError(f"a support of {index.numel()} positions for a sparse adapter of {self.sparse.nnz} values")
        self.sparse.index.copy_(index.to(self.sparse.index.device))
        self.sparse.values.zero_()
        self.active = True

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain `nn.Linear` with weight `W + S` (summed in at least fp32, stored in W's dtype), in place of W."""
        weight = self.weight
        if self.active:
            dtype = torch.promote_types(weight.dtype, torch.float32)
            weight.data = (weight.to(dtype) + self.sparse.matrix(dtype).to(weight.device)).to(weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.sparse.nnz}, active={self.active}"


def restart_optimizer_state(params: Iterable[nn.Parameter]) -> RemovableHandle:
    """At the next step of an optimizer that holds any of `params`, drop their state in it before it updates them, so
    that step is their first (AdamW: step count, both moments); then the hook removes itself.

    Why: AdamW counts the zero-gradient steps before `select` and its moments stay zero, so its bias correction would
    take the first real gradients at `1 - beta^t` of a late step t, not of step 1 (after 64 warm-up steps, with a
    steady gradient: 0.8x a fresh optimizer's first step, 1.8x its 15th, still 1.3x its 100th). The hook is on every
    optimizer's step because the optimizer is not in reach of the code that selects; a checkpoint written after that
    step holds the restarted state, so a resumed run neither needs nor gets another restart."""
    wanted = {id(param): param for param in params}  # by identity: a tensor's == compares values

    def before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        held = [param for group in optimizer.param_groups for param in group["params"] if id(param) in wanted]
        if held:
            for param in held:
                optimizer.state.pop(param, None)
            handle.remove()

    handle = register_optimizer_step_pre_hook(before_step)
    return handle
