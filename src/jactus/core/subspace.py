"""One layer of JACTUS: the metric from calibration statistics, the task-aware union subspace, the projected core.

Everything here runs in fp64 on the device of the weight; `None` for a covariance means the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linalg import DEFAULT_DAMPING, check_finite, damp, orthonormal_union, top_eigenvectors, whitening

STATS_MODES = ("kfac", "input", "gradient", "none", "asvd")
WEIGHT_BASES = ("whitened", "plain")
ASVD_ALPHA = 0.5


@dataclass
class Metric:
    """The K-FAC metric of one layer: damped covariances and their factors `S = L L^T` (None = identity)."""

    input_cov: torch.Tensor | None = None
    grad_cov: torch.Tensor | None = None
    input_factor: torch.Tensor | None = None
    grad_factor: torch.Tensor | None = None


def check_choice(value: str, valid, what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


def layer_metric(layer_stats, stats_mode: str = "kfac", damping: float = DEFAULT_DAMPING, layer: str = "?",
                 device: torch.device | str | None = None) -> Metric:
    """The metric `stats_mode` asks for, from a `LayerStats` (or None for `stats_mode="none"`).

    kfac: Sx and Sg; input: Sx only (SVD-LLM); gradient: Sg only; none: plain weight;
    asvd: diagonal input scaling `Lx = diag(diag(Sx))^(alpha / 2)` with alpha = 0.5 (ASVD), Sg = I.
    """
    check_choice(stats_mode, STATS_MODES, "stats_mode")
    if stats_mode == "none":
        return Metric()
    if layer_stats is None:
        raise ValueError(f"layer {layer!r}: stats_mode={stats_mode!r} needs calibration statistics, got none")
    metric = Metric()
    if stats_mode in ("kfac", "input"):
        metric.input_cov, metric.input_factor = whitening(layer_stats.input_cov.to(device), damping, layer)
    if stats_mode in ("kfac", "gradient"):
        if layer_stats.grad_cov is None:
            raise ValueError(f"layer {layer!r}: stats_mode={stats_mode!r} needs the output-gradient covariance; "
                             f"calibrate with need_gradients=True")
        metric.grad_cov, metric.grad_factor = whitening(layer_stats.grad_cov.to(device), damping, layer)
    if stats_mode == "asvd":
        scale = damp(layer_stats.input_cov.to(device), damping, layer).diagonal()
        metric.input_factor = torch.diag(scale ** (ASVD_ALPHA / 2))
        metric.input_cov = torch.diag(scale ** ASVD_ALPHA)
    return metric


def whitened_weight(weight: torch.Tensor, metric: Metric) -> torch.Tensor:
    """`M = Lg^T W Lx` (fp64): its singular values squared are the K-FAC proxy's gain per kept rank."""
    M = weight.detach().to(torch.float64)
    if metric.grad_factor is not None:
        M = metric.grad_factor.T @ M
    if metric.input_factor is not None:
        M = M @ metric.input_factor
    return M


def spectrum(weight: torch.Tensor, metric: Metric, layer: str = "?") -> torch.Tensor:
    """Singular values of the whitened weight, descending (fp64)."""
    M = whitened_weight(weight, metric)
    check_finite(M, "whitened weight", layer)
    return torch.linalg.svdvals(M)


def _unwhiten(vectors: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """`L^{-T} vectors`: a whitened-space direction mapped back to the original space."""
    if factor is None:
        return vectors
    return torch.linalg.solve_triangular(factor.T, vectors, upper=True)


def task_directions(rank: int, rho: float) -> int:
    """b = round(rho r), rounding halves up."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho}: expected a fraction in [0, 1]")
    return int(math.floor(rho * rank + 0.5))


def union_subspace(weight: torch.Tensor, metric: Metric, rank: int, rho: float = 0.25,
                   weight_basis: str = "whitened", layer: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases `U` (m x r) and `V` (n x r) of the task-aware union (METHOD.md section 2).

    Weight directions: top singular vectors of the whitened weight mapped back (or of `W` for `plain`). Task
    directions: top-b eigenvectors of Sg (output side) and Sx (input side); a side without statistics takes weight
    directions only. Dependent directions are replaced by the next weight directions, so each basis has `rank` columns.
    """
    check_choice(weight_basis, WEIGHT_BASES, "weight_basis")
    m, n = weight.shape
    if not 0 < rank <= min(m, n):
        raise ValueError(f"layer {layer!r}: rank {rank} outside [1, {min(m, n)}] for a {m}x{n} weight")
    b = task_directions(rank, rho)
    if weight_basis == "whitened":
        left, _, right_h = torch.linalg.svd(whitened_weight(weight, metric), full_matrices=False)
        left, right = _unwhiten(left, metric.grad_factor), _unwhiten(right_h.T, metric.input_factor)
    else:
        left, _, right_h = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
        right = right_h.T
    check_finite(left, "weight subspace", layer)

    def side(weight_dirs: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        count = b if cov is not None else 0
        task = top_eigenvectors(cov, count, layer) if count else weight_dirs[:, :0]
        a = rank - count
        return orthonormal_union(torch.cat([weight_dirs[:, :a], task, weight_dirs[:, a:]], dim=1), rank)

    return side(left, metric.grad_cov), side(right, metric.input_cov)


def projected_core(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, metric: Metric) -> torch.Tensor:
    """`C* = argmin_C ||Sg^{1/2} (W - U C V^T) Sx^{1/2}||_F = (U^T Sg U)^{-1} U^T Sg W Sx V (V^T Sx V)^{-1}`.

    Solved with Cholesky solves, never explicit inverses; with identity statistics (and orthonormal U, V) it is
    `U^T W V`.
    """
    W = weight.detach().to(torch.float64)
    U, V = U.to(torch.float64), V.to(torch.float64)
    SgU = U if metric.grad_cov is None else metric.grad_cov @ U
    SxV = V if metric.input_cov is None else metric.input_cov @ V
    core = SgU.T @ W @ SxV
    if metric.grad_cov is not None:
        core = torch.cholesky_solve(core, torch.linalg.cholesky(U.T @ SgU))
    if metric.input_cov is not None:
        core = torch.cholesky_solve(core.T, torch.linalg.cholesky(V.T @ SxV)).T
    return core


def factorize_layer(weight: torch.Tensor, metric: Metric, rank: int, rho: float = 0.25,
                    weight_basis: str = "whitened", layer: str = "?"):
    """`(U, C, V)` in fp64 with `U C V^T` the JACTUS approximation of `weight` at `rank`."""
    U, V = union_subspace(weight, metric, rank, rho, weight_basis, layer)
    core = projected_core(weight, U, V, metric)
    check_finite(core, "projected core", layer)
    return U, core, V
