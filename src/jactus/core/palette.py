"""Palette fine-tuning (docs/METHOD.md section 11): one set of factors serves a palette of budgets by truncation.

A `PaletteLinear` holds the nested factors of the largest rank any member of the palette gives its layer
(`union_subspace(nested=True)`: every smaller rank's factorization is the leading columns and core block; exactly, up
to rounding, when the task directions come from the exact eigensolver, `calib.eig_method=eigh` or `auto` on the CPU,
and to the accuracy of subspace iteration where `auto` runs it on CUDA), the core split into the blocks each member
adds, and one bias per member; a member that keeps the layer dense computes with the frozen dense weight instead. A
`PaletteNorm` holds one copy of a norm layer per member. `set_active_member` picks the member the model computes;
`deploy_member` builds that member's deployable model (`LowRankLinear` / `nn.Linear` and its own norms), which
`save_compact` writes as any compact model.

Why the core is split: every block of the core that member k uses is a parameter of its own, so a step that trains a
smaller member leaves the blocks only larger members use without a gradient (`None`): the optimizer skips them, with
no momentum or weight decay applied from steps they took no part in.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .freeze import is_norm, set_trainable
from .layers import LowRankLinear


class PaletteLinear(nn.Module):
    """`y = U_r (C_r (V_r^T x)) + b_k` for member k of rank r (`U_r = U[:, :r]`, `C_r = C[:r, :r]`), or
    `y = W x + b_k` for a member that keeps the layer dense. Only the core blocks and the biases train."""

    def __init__(self, U: torch.Tensor, C: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None,
                 ranks: Sequence[int | None], weight: torch.Tensor | None = None):
        super().__init__()
        levels = sorted({rank for rank in ranks if rank is not None})
        if not levels:
            raise ValueError("PaletteLinear needs at least one member that factorizes the layer; all ranks are None")
        if C.shape != (U.shape[1], V.shape[1]) or levels[-1] > U.shape[1] or U.shape[1] != V.shape[1]:
            raise ValueError(f"PaletteLinear expects U [m, R], C [R, R], V [n, R] with R >= the largest member rank "
                             f"{levels[-1]}; got U {tuple(U.shape)}, C {tuple(C.shape)}, V {tuple(V.shape)}")
        if None in ranks and weight is None:
            raise ValueError("a member keeps the layer dense (rank None), so PaletteLinear needs the dense weight")
        top = levels[-1]
        self.ranks = list(ranks)
        self.levels = levels
        self.U = nn.Parameter(U[:, :top].contiguous(), requires_grad=False)
        self.V = nn.Parameter(V[:, :top].contiguous(), requires_grad=False)
        self.weight = None if None not in ranks else nn.Parameter(weight.detach(), requires_grad=False)
        # Level i adds the rows [r_{i-1}, r_i) of C[:r_i, :r_i] and the columns [r_{i-1}, r_i) of C[:r_{i-1}, :].
        self.core_rows = nn.ParameterList()
        self.core_cols = nn.ParameterList()
        previous = 0
        for rank in levels:
            self.core_rows.append(nn.Parameter(C[previous:rank, :rank].clone()))
            if previous:
                self.core_cols.append(nn.Parameter(C[:previous, previous:rank].clone()))
            previous = rank
        self.biases = None if bias is None else nn.ParameterList(
            nn.Parameter(bias.detach().clone()) for _ in ranks)
        self.active = len(ranks) - 1

    @property
    def in_features(self) -> int:
        return self.V.shape[0]

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    @property
    def rank(self) -> int | None:
        """The active member's rank (None: dense)."""
        return self.ranks[self.active]

    def core(self, rank: int) -> torch.Tensor:
        """`C[:rank, :rank]`, assembled from the blocks of the levels up to `rank`."""
        if rank not in self.levels:
            raise ValueError(f"rank {rank} is not a member rank of this layer; member ranks: {self.levels}")
        core = self.core_rows[0]
        for level in range(1, self.levels.index(rank) + 1):
            core = torch.cat([torch.cat([core, self.core_cols[level - 1]], dim=1), self.core_rows[level]], dim=0)
        return core

    def core_parameters(self) -> list[nn.Parameter]:
        """Every core block: the optimizer keeps them out of weight decay (a zero core is a layer with zero output, not
        the pretrained one)."""
        return [*self.core_rows, *self.core_cols]

    def member_bias(self, index: int) -> torch.Tensor | None:
        return None if self.biases is None else self.biases[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank, bias = self.ranks[self.active], self.member_bias(self.active)
        if rank is None:
            return F.linear(x, self.weight, None if bias is None else bias.to(self.weight.dtype))
        U, V = self.U[:, :rank], self.V[:, :rank]
        core = self.core(rank).to(U.dtype)
        bias = None if bias is None else bias.to(U.dtype)
        h = torch.matmul(x, V)
        if x.numel() // self.in_features > self.out_features:  # as FactorizedLinear: form U C when tokens > m
            return F.linear(h, U @ core, bias)
        return F.linear(F.linear(h, core), U, bias)

    @torch.no_grad()
    def deployed(self, index: int) -> nn.Module:
        """Member `index` as a deployable layer: `LowRankLinear` (`down = V_r^T`, `up = U_r C_r`, its bias), or an
        `nn.Linear` holding the (shared, frozen) dense weight."""
        rank, bias = self.ranks[index], self.member_bias(index)
        if rank is None:
            layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
            layer.weight = self.weight
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().to(self.weight.dtype, copy=True), requires_grad=False)
            return layer
        layer = LowRankLinear(self.in_features, self.out_features, rank, bias=bias is not None,
                              device=self.U.device, dtype=self.U.dtype)
        layer.down.weight.copy_(self.V[:, :rank].T)
        dtype = torch.promote_types(self.U.dtype, torch.float32)
        layer.up.weight.copy_(self.U[:, :rank].to(dtype) @ self.core(rank).to(dtype))
        if bias is not None:
            layer.up.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, " \
               f"bias={self.biases is not None}"


class PaletteNorm(nn.Module):
    """One copy of a norm layer per member; calls the active member's copy."""

    def __init__(self, norm: nn.Module, members: int):
        super().__init__()
        self.members = nn.ModuleList(copy.deepcopy(norm) for _ in range(members))
        self.active = members - 1

    def forward(self, *args, **kwargs):
        return self.members[self.active](*args, **kwargs)


def palette_modules(model: nn.Module) -> list[PaletteLinear | PaletteNorm]:
    return [module for module in model.modules() if isinstance(module, (PaletteLinear, PaletteNorm))]


def wrap_norms(model: nn.Module, members: int) -> int:
    """Replace every norm layer with parameters by a `PaletteNorm` of `members` copies; returns how many."""
    names = [name for name, module in model.named_modules()
             if is_norm(module) and not isinstance(module, PaletteNorm) and name
             and any(True for _ in module.parameters(recurse=False))]
    names = [name for name in names if not any(name.startswith(f"{other}.") for other in names)]
    for name in names:
        model.set_submodule(name, PaletteNorm(model.get_submodule(name), members))
    return len(names)


def set_active_member(modules: Sequence[nn.Module], index: int) -> None:
    """Make member `index` the one every palette layer of `modules` (`palette_modules(model)`) computes."""
    for module in modules:
        if not 0 <= index < (len(module.ranks) if isinstance(module, PaletteLinear) else len(module.members)):
            raise ValueError(f"palette member {index} does not exist in {type(module).__name__}")
        module.active = index


def train_palette(model: nn.Module, head_names: Sequence[str] = ()) -> nn.Module:
    """The freeze policy of a palette: core blocks, member biases, every member's norms and the heads train; the
    factors, the dense weights and everything else stay frozen (trainable tensors in fp32)."""
    palettes = {name for name, module in model.named_modules() if isinstance(module, PaletteLinear)}

    def palette_trainable(name: str, _) -> bool:
        layer, _, _ = name.rpartition(".")
        owner, _, kind = layer.rpartition(".")
        return owner in palettes and kind in ("core_rows", "core_cols", "biases")

    set_trainable(model, head_names=head_names, norms=True, extra=palette_trainable)
    return model


def deploy_member(model: nn.Module, index: int, rank_map: dict[str, int | None] | None = None) -> nn.Module:
    """A deployable copy of member `index`: palette layers become its `LowRankLinear` / `nn.Linear`, palette norms
    its own norm copy; the frozen tensors outside them are shared with `model`, not copied (they are what most of a
    model's memory is), so cast the copy's dtype only once `model` is done computing. `rank_map`: the member's plan
    (targets it keeps dense included), recorded as `jactus_rank_map` for `save_compact`."""
    memo: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, PaletteLinear):
            memo[id(module)] = module.deployed(index)
        elif isinstance(module, PaletteNorm):
            memo[id(module)] = copy.deepcopy(module.members[index])
    inside = {id(param) for module in model.modules() if isinstance(module, (PaletteLinear, PaletteNorm))
              for param in module.parameters()}
    for param in model.parameters():
        if not param.requires_grad and id(param) not in inside:
            memo[id(param)] = param
    member = copy.deepcopy(model, memo)
    if rank_map is not None:
        member.jactus_rank_map = dict(rank_map)
    return member
