"""Parameter accounting: what a model holds, and what it will hold once deployed (cores folded into `U`)."""

from __future__ import annotations

from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a parameter shared by several modules (tied embeddings) is counted once."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():  # `parameters()` already skips repeated Parameter objects
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def linear_cost(in_features: int, out_features: int, rank: int | None, bias: bool) -> int:
    """Deployed parameters of one target linear: `m n` dense (rank None), `(m + n) r` as a low-rank pair; + bias."""
    weight = in_features * out_features if rank is None else (in_features + out_features) * rank
    return weight + (out_features if bias else 0)


def dense_rank_limit(in_features: int, out_features: int) -> int:
    """floor(m n / (m + n)): from this rank on a low-rank pair costs at least as much as the dense layer."""
    return (in_features * out_features) // (in_features + out_features)


def deployed_params(model: nn.Module) -> int:
    """Parameters of the deployed model: each `FactorizedLinear` counts `m r + bias` beside its `V` (n r, counted once
    where layers share it): its core folded into `U`."""
    from .layers import FactorizedLinear

    layers = [module for module in model.modules() if isinstance(module, FactorizedLinear)]
    return count_params(model) - sum(layer.U.numel() + layer.C.numel() - layer.out_features * layer.rank
                                     for layer in layers)
