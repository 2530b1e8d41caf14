"""TuneComp's math in plain PyTorch: the two-branch layer, the teacher decay, the group lasso and the hard shrinkage.

Per target layer the model computes

    y = a_t (W0 x + b0) + sqrt(1 - a_t^2) (B (mask * A x) + b),      a_t = max(0, 1 - sin(pi t / 2T)),

with the dense teacher `W0, b0` frozen and the student `B A` (a low-rank factorization whose rank components are
pruned by `mask`) trained; at `a_T = 0` only the student remains and the layer is deployed as `LowRankLinear`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..core.params import linear_cost
from ..core.precision import trainable_dtype
from ..core.subspace import Metric, weight_bases, whitened_svd


def teacher_weight(step: int, max_steps: int) -> float:
    """a_t = max(0, 1 - sin(pi t / 2T)): 1 at t = 0, 0 from t = T on."""
    if max_steps <= 0:
        raise ValueError(f"max_steps={max_steps}: TuneComp's schedule needs a positive number of training steps")
    t = min(max(step, 0), max_steps)
    return max(0.0, 1.0 - math.sin(math.pi * t / (2 * max_steps)))


def whitened_low_rank(weight: torch.Tensor, metric: Metric, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation-aware rank-`rank` factors `B (m x k)`, `A (k x n)` of `W`, minimising ||(W - B A) Lx||_F.

    The SVD of the whitened weight `W Lx = U S V^T` (`Sx = Lx Lx^T`, SVD-LLM) is truncated and mapped back,
    with the singular values split evenly: `B = U sqrt(S)`, `A = sqrt(S) V^T Lx^{-1}`. Returns `(B, A, s)`; for each
    component the input energy `a_j^T Sx a_j` is `s_j` and the output energy `||b_j||^2 a_j^T Sx a_j` is `s_j^2`."""
    svd = whitened_svd(weight, metric)
    left, right = weight_bases(weight, metric, svd)  # U and Lx^{-T} V
    scale = svd.values[:rank].sqrt()
    up = left[:, :rank] * scale
    right = right[:, :rank] * scale
    dtype = trainable_dtype(weight.dtype)  # the student trains: fp32 on a half-precision weight
    return up.to(dtype), right.T.to(dtype), svd.values[:rank]


class TwoBranchLinear(nn.Module):
    """A frozen dense teacher and a trainable, prunable low-rank student, mixed by the teacher weight `a_t`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, energy_momentum: float = 0.99,
                 teacher: nn.Linear | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank={rank}: a two-branch layer needs at least one rank component")
        self.in_features, self.out_features = in_features, out_features
        self.teacher = teacher if teacher is not None else nn.Linear(in_features, out_features, bias=bias)
        self.teacher.requires_grad_(False)
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)
        # 1 for a kept rank component, 0 for a pruned one; pruned components take no part in forward or backward.
        self.register_buffer("mask", torch.ones(rank))
        # Running mean of each component's squared activation (a_j . x)^2: its output energy is ||b_j||^2 times this.
        self.register_buffer("component_energy", torch.ones(rank))
        self.energy_momentum = energy_momentum
        self.teacher_weight = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, metric: Metric | None = None) -> TwoBranchLinear:
        """The teacher is `linear` itself (frozen, not copied); the student, in fp32 for a half-precision `linear`
        (`core.precision`), starts as its whitened rank-`rank` approximation under `metric` (zeros without one:
        structure only, for a checkpoint about to be loaded)."""
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, teacher=linear)
        device, dtype = linear.weight.device, trainable_dtype(linear.weight.dtype)
        layer.down.to(device=device, dtype=dtype)
        layer.up.to(device=device, dtype=dtype)
        layer.mask = layer.mask.to(device)
        layer.component_energy = layer.component_energy.to(device)
        with torch.no_grad():
            if linear.bias is not None:
                layer.up.bias.copy_(linear.bias)
            if metric is None:
                layer.up.weight.zero_()
                layer.down.weight.zero_()
            else:
                up, down, input_energy = whitened_low_rank(linear.weight, metric, rank)
                layer.up.weight.copy_(up)
                layer.down.weight.copy_(down)
                layer.component_energy.copy_(input_energy)
        return layer

    @property
    def rank(self) -> int:
        return self.mask.numel()

    @property
    def active_rank(self) -> int:
        return int(self.mask.sum().item())

    def component_importance(self) -> torch.Tensor:
        """Output energy of each rank component, ||b_j|| * sqrt(E[(a_j . x)^2]); pruned components score 0."""
        return self.up.weight.detach().norm(dim=0) * self.component_energy.clamp_min(0).sqrt() * self.mask

    def group_norms(self) -> torch.Tensor:
        """Group-lasso norms of the kept components: sqrt(||b_j||^2 + ||a_j||^2) (column j of B, row j of A)."""
        squared = self.up.weight.pow(2).sum(dim=0) + self.down.weight.pow(2).sum(dim=1)
        return squared.clamp_min(1e-24).sqrt() * self.mask

    @torch.no_grad()
    def prune(self, components: Iterable[int]) -> None:
        index = torch.as_tensor(list(components), dtype=torch.long, device=self.mask.device)
        self.mask[index] = 0
        self.up.weight[:, index] = 0
        self.down.weight[index] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The student may be fp32 on a bf16 teacher (core.precision); autocast casts anyway, plain runs need this.
        hidden = self.down(x.to(self.down.weight.dtype))
        if self.training:
            with torch.no_grad():
                energy = hidden.detach().float().pow(2).reshape(-1, hidden.shape[-1]).mean(dim=0)
                self.component_energy.lerp_(energy.to(self.component_energy.dtype), 1.0 - self.energy_momentum)
        student = self.up(hidden * self.mask.to(hidden.dtype)).to(x.dtype)
        a = self.teacher_weight
        if a == 0.0:
            return student
        return a * self.teacher(x) + math.sqrt(1.0 - a * a) * student

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"active_rank={self.active_rank}, teacher_weight={self.teacher_weight:.4f}")


def deployed_cost(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    """Parameters of the deployed layer: (m + n) r as a low-rank pair, or m n when that would not save (dense)."""
    dense = (in_features + out_features) * rank >= in_features * out_features
    return linear_cost(in_features, out_features, None if dense else rank, bias)


def select_prunable(layers: dict[str, TwoBranchLinear], params_now: int, params_target: int) -> dict[str, list[int]]:
    """The weakest rank components, ranked globally by importance^2 per parameter cost (m + n), whose removal brings
    the deployed parameters to `params_target` or just below; every layer keeps at least one component."""
    candidates = []
    for name, layer in layers.items():
        cost = layer.in_features + layer.out_features
        scores = layer.component_importance().pow(2) / cost
        active = layer.mask.nonzero().flatten().tolist()
        for j in active:
            candidates.append((scores[j].item(), name, j))
    candidates.sort()
    active_ranks = {name: layer.active_rank for name, layer in layers.items()}
    chosen: dict[str, list[int]] = {}
    for _, name, j in candidates:
        if params_now <= params_target:
            break
        if active_ranks[name] <= 1:
            continue
        layer = layers[name]
        bias = layer.up.bias is not None
        rank = active_ranks[name]
        params_now -= deployed_cost(layer.in_features, layer.out_features, rank, bias) - deployed_cost(
            layer.in_features, layer.out_features, rank - 1, bias
        )
        active_ranks[name] = rank - 1
        chosen.setdefault(name, []).append(j)
    return chosen


def group_lasso(layers: Sequence[TwoBranchLinear]) -> torch.Tensor:
    """Mean group norm over every kept rank component (a size-independent scale for the penalty weight)."""
    norms = [layer.group_norms() for layer in layers]
    kept = sum(layer.mask.sum() for layer in layers)
    return torch.cat(norms).sum() / kept.clamp_min(1)
