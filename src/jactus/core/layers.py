"""The two shapes of a compressed linear layer.

`FactorizedLinear` is the training form, `y = U (C (V^T x)) + b`, with frozen orthonormal bases `U` (m x r) and `V`
(n x r) and a trainable `r x r` core `C`. `LowRankLinear` is the deployed form, two plain `nn.Linear`s
(`down`: n -> r holding `V^T`, `up`: r -> m holding `U C` and the bias); it is also what PEFT LoRA can target.

`U` and `V` are `nn.Parameter`s with `requires_grad=False` rather than buffers: they are most of the layer's memory,
and parameters are what FSDP shards (buffers are replicated on every rank) and what DDP broadcasts at wrap time; they
stay in `state_dict`, follow `.to(dtype)`, and are skipped by any optimizer built from `requires_grad` parameters.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# id(basis) -> (the basis, its last input (both weak), that input's version, grad mode, the projection, members still
# to take it): held beside the model, so nothing here travels with a copy or a pickle of it, and dropped with the basis
_PROJECTIONS: dict[int, tuple] = {}


def project_once(weight: torch.Tensor, members: int, x: torch.Tensor,
                 project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`project(x)`, computed once for the `members` layers that share `weight` as their input basis (a `V`, or a
    deployed `down.weight`; `members < 2`: not shared, computed).

    The first member to see an input projects it and leaves the result beside the basis for the others; each later
    member given the very same tensor (same object, unmodified, same grad mode) takes it, and the last one clears it.
    An input seen by fewer members (another order, a different tensor) is projected again: the result is always
    `project(x)`.
    """
    if members < 2:
        return project(x)
    version = -1 if x.is_inference() else x._version
    grad = torch.is_grad_enabled()
    key = id(weight)
    cached = _PROJECTIONS.get(key)
    if cached is not None:
        owner, ref, seen_version, seen_grad, h, left = cached
        if owner() is weight and ref() is x and seen_version == version and seen_grad == grad:
            if left > 1:
                _PROJECTIONS[key] = (owner, ref, version, grad, h, left - 1)
            else:
                del _PROJECTIONS[key]
            return h
    h = project(x)
    if cached is None:
        weakref.finalize(weight, _PROJECTIONS.pop, key, None)  # the entry goes with the basis
    _PROJECTIONS[key] = (weakref.ref(weight), weakref.ref(x), version, grad, h, members - 1)
    return h


class FactorizedLinear(nn.Module):
    """`y = U (C (V^T x)) + b`; only `C` and `bias` train.

    `V` may be one `nn.Parameter` shared by layers that read the same input (`share_bases`, docs/METHOD.md section 3.3);
    then it can be wider than the layer's output, and `U` (m x q) and `C` (q x r) have q = min(r, m) columns.

    Forward path: per token `U (C (V^T x))` costs `(m + n) r + r^2`; forming `U C` once per call costs `m r^2` and
    leaves `(m + n) r` per token. So `U C` is formed when the call carries more tokens than `m` (`tokens * r^2 >
    m * r^2`), which is the usual training case; small calls (decoding, tiny batches) go token by token.

    Core dropout (`anchor_core_dropout(p)`, off by default): in train mode the core's change since the anchor sees
    dropped inputs, `y = U (C0 h + (C - C0) dropout_p(h)) + b` with `h = V^T x` and `C0` the core when anchored,
    as LoRA's dropout acts on its branch only (`W x + B A dropout(x)`). At the anchor `C = C0`, so it leaves the
    starting model as it is; in eval mode and after `fold` the layer is `U C V^T x + b`.
    """

    def __init__(self, U: torch.Tensor, C: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if U.dim() != 2 or V.dim() != 2 or C.shape != (U.shape[1], V.shape[1]) or U.shape[1] > V.shape[1]:
            raise ValueError(f"FactorizedLinear expects U [m, q], C [q, r], V [n, r] with q <= r (q = r but where a "
                             f"shared input basis is wider than m); got U {tuple(U.shape)}, C {tuple(C.shape)}, "
                             f"V {tuple(V.shape)}")
        if bias is not None and bias.shape != (U.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({U.shape[0]},)")
        self.U = nn.Parameter(U.contiguous(), requires_grad=False)  # FSDP2 shards only contiguous parameters
        self.C = nn.Parameter(C.contiguous())
        self.V = nn.Parameter(V.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.sparse: nn.Module | None = None  # an optional sparse correction S x (core.sparse.SparseDelta)
        self.shared_members = 1  # layers holding this `V` (core.factorize.tie_shared_bases): they project x once
        self.core_dropout = 0.0
        # the core at the anchor of core dropout; not in the state dict (a resumed run anchors at the resumed core)
        self.register_buffer("C0", None, persistent=False)

    @torch.no_grad()
    def anchor_core_dropout(self, p: float) -> None:
        """Core dropout with probability `p` on the change of the core from now on (0: off, the anchor dropped)."""
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"core dropout {p!r}: expected a probability in [0, 1) (0 = off)")
        self.core_dropout = float(p)
        self.C0 = self.C.detach().clone() if p > 0 else None

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        """Zero factors of the right shapes: structure to load a checkpoint into."""
        kw = {"device": device, "dtype": dtype}
        left = min(rank, out_features)  # a shared input basis may be wider than the layer's output
        return cls(torch.zeros(out_features, left, **kw), torch.zeros(left, rank, **kw),
                   torch.zeros(in_features, rank, **kw), torch.zeros(out_features, **kw) if bias else None)

    @property
    def in_features(self) -> int:
        return self.V.shape[0]

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        """The width of `V^T x`: the deployed form's rank."""
        return self.V.shape[1]

    def core_parameters(self) -> list[nn.Parameter]:
        """The core: the optimizer keeps it out of weight decay (a zero core is a layer with zero output, not the
        pretrained one)."""
        return [self.C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The core and bias may be fp32 on bf16 factors (core.precision); under autocast the casts below are what
        # autocast does anyway, without it they keep one dtype per product.
        h = project_once(self.V, self.shared_members, x, lambda inputs: torch.matmul(inputs, self.V))  # V^T x: [..., r]
        core = self.C.to(self.U.dtype)
        bias = None if self.bias is None else self.bias.to(self.U.dtype)
        if self.training and self.C0 is not None:  # core dropout: two r x r products per token, then U
            change = (self.C - self.C0).to(self.U.dtype)  # formed in the core's dtype (fp32), not the factors'
            g = F.linear(h, self.C0.to(self.U.dtype)) + F.linear(F.dropout(h, self.core_dropout, training=True), change)
            y = F.linear(g, self.U, bias)
        elif x.numel() // self.in_features > self.out_features:
            y = F.linear(h, self.U @ core, bias)
        else:
            y = F.linear(F.linear(h, core), self.U, bias)
        return y if self.sparse is None else y + self.sparse(x).to(y.dtype)

    @torch.no_grad()
    def fold(self, down: nn.Linear | None = None) -> LowRankLinear:
        """The deployed form in the factors' dtype: `down.weight = V^T`, `up.weight = U C` (formed in at least fp32),
        `up.bias = bias`. `down`: the folded `down` of a layer with the same `V` (a shared input basis), used as is."""
        layer = LowRankLinear(self.in_features, self.out_features, self.rank, bias=self.bias is not None,
                              device=self.U.device, dtype=self.U.dtype)
        if down is not None:
            if down.weight.shape != (self.rank, self.in_features):
                raise ValueError(f"shared down projection {tuple(down.weight.shape)}: expected "
                                 f"({self.rank}, {self.in_features})")
            layer.down = down
        else:
            layer.down.weight.copy_(self.V.T)
        layer.shared_members = self.shared_members
        dtype = torch.promote_types(self.U.dtype, torch.float32)
        layer.up.weight.copy_(self.U.to(dtype) @ self.C.to(dtype))
        if self.bias is not None:
            layer.up.bias.copy_(self.bias)
        if self.sparse is not None:
            layer.sparse = copy.deepcopy(self.sparse)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"bias={self.bias is not None}"


class LowRankLinear(nn.Module):
    """Deployed low-rank linear `up(down(x))`: `down` n -> r without bias, `up` r -> m with the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.sparse: nn.Module | None = None  # an optional sparse correction S x (core.sparse.SparseDelta)
        self.shared_members = 1  # layers holding this `down` (core.factorize.tie_shared_bases): they project x once

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(project_once(self.down.weight, self.shared_members, x, self.down))
        return y if self.sparse is None else y + self.sparse(x).to(y.dtype)
