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

import torch
import torch.nn.functional as F
from torch import nn


class FactorizedLinear(nn.Module):
    """`y = U (C (V^T x)) + b`; only `C` and `bias` train.

    Forward path: per token `U (C (V^T x))` costs `(m + n) r + r^2`; forming `U C` once per call costs `m r^2` and
    leaves `(m + n) r` per token. So `U C` is formed when the call carries more tokens than `m` (`tokens * r^2 >
    m * r^2`), which is the usual training case; small calls (decoding, tiny batches) go token by token.
    """

    def __init__(self, U: torch.Tensor, C: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if U.dim() != 2 or V.dim() != 2 or C.shape != (U.shape[1], V.shape[1]) or U.shape[1] != V.shape[1]:
            raise ValueError(f"FactorizedLinear expects U [m, r], C [r, r], V [n, r]; got U {tuple(U.shape)}, "
                             f"C {tuple(C.shape)}, V {tuple(V.shape)}")
        if bias is not None and bias.shape != (U.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({U.shape[0]},)")
        self.U = nn.Parameter(U.contiguous(), requires_grad=False)  # FSDP2 shards only contiguous parameters
        self.C = nn.Parameter(C.contiguous())
        self.V = nn.Parameter(V.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.sparse: nn.Module | None = None  # an optional sparse correction S x (core.sparse.SparseDelta)

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        """Zero factors of the right shapes: structure to load a checkpoint into."""
        kw = {"device": device, "dtype": dtype}
        return cls(torch.zeros(out_features, rank, **kw), torch.zeros(rank, rank, **kw),
                   torch.zeros(in_features, rank, **kw), torch.zeros(out_features, **kw) if bias else None)

    @property
    def in_features(self) -> int:
        return self.V.shape[0]

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int:
        return self.C.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The core and bias may be fp32 on bf16 factors (core.precision); under autocast the casts below are what
        # autocast does anyway, without it they keep one dtype per product.
        h = torch.matmul(x, self.V)  # V^T x per token: [..., r]
        core = self.C.to(self.U.dtype)
        bias = None if self.bias is None else self.bias.to(self.U.dtype)
        if x.numel() // self.in_features > self.out_features:
            y = F.linear(h, self.U @ core, bias)
        else:
            y = F.linear(F.linear(h, core), self.U, bias)
        return y if self.sparse is None else y + self.sparse(x).to(y.dtype)

    @torch.no_grad()
    def fold(self) -> LowRankLinear:
        """The deployed form in the factors' dtype: `down.weight = V^T`, `up.weight = U C` (formed in at least fp32),
        `up.bias = bias`."""
        layer = LowRankLinear(self.in_features, self.out_features, self.rank, bias=self.bias is not None,
                              device=self.U.device, dtype=self.U.dtype)
        layer.down.weight.copy_(self.V.T)
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
        y = self.up(self.down(x))
        return y if self.sparse is None else y + self.sparse(x).to(y.dtype)
