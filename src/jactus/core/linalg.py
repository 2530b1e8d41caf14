"""Numerically careful linear algebra for covariance statistics (all in fp64).

Whitening uses a Cholesky factor `L` (`S = L L^T`) rather than the symmetric square root: for the K-FAC metric
`||Lg^T E Lx||_F = ||Sg^{1/2} E Sx^{1/2}||_F`, since both equal `sqrt(tr(E^T Sg E Sx))`, and a Cholesky costs a
fraction of an eigendecomposition.
"""

from __future__ import annotations

import torch

DEFAULT_DAMPING = 1e-2


def check_finite(tensor: torch.Tensor, what: str, layer: str) -> None:
    """Raise a clear error naming the layer when `tensor` holds NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise FloatingPointError(f"layer {layer!r}: {what} has {bad} non-finite entries (NaN/Inf) out of "
                                 f"{tensor.numel()}; check the calibration loss and inputs")


def damp(cov: torch.Tensor, damping: float = DEFAULT_DAMPING, layer: str = "?") -> torch.Tensor:
    """Relative damping `S + damping * mean(diag S) * I` in fp64.

    An all-zero `S` (no signal reached the layer) becomes the identity: no statistics, no preferred direction.
    """
    if damping < 0:
        raise ValueError(f"damping={damping}: expected >= 0")
    check_finite(cov, "covariance", layer)
    cov = cov.to(torch.float64)
    cov = (cov + cov.T) / 2
    scale = float(cov.diagonal().mean())
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    if scale <= 0:
        return eye
    return cov + (damping * scale) * eye


def whitening(cov: torch.Tensor, damping: float = DEFAULT_DAMPING, layer: str = "?",
              retries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """`(S, L)`: the damped covariance and its lower Cholesky factor, `L L^T = S`, both fp64.

    When the Cholesky fails (damping 0 on rank-deficient statistics, or an ill-conditioned matrix), `S` gets an
    extra diagonal jitter, 10x larger each retry from 1e-10 * mean(diag S); `S` is returned with that jitter so that
    the metric and its factor stay consistent. After `retries` failures the error names the layer.
    """
    cov = damp(cov, damping, layer)
    factor, info = torch.linalg.cholesky_ex(cov)
    jitter = 1e-10 * float(cov.diagonal().mean())
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    for _ in range(retries):
        if int(info) == 0:
            return cov, factor
        cov = cov + jitter * eye
        factor, info = torch.linalg.cholesky_ex(cov)
        jitter *= 10
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"layer {layer!r}: covariance is not positive definite even with extra "
                                       f"jitter; increase damping")
    return cov, factor


def cholesky_factor(cov: torch.Tensor, layer: str = "?") -> torch.Tensor:
    """Lower-triangular `L` with `L L^T = cov` for a positive definite `cov` (no damping added)."""
    return whitening(cov, 0.0, layer)[1]


def top_eigenvectors(cov: torch.Tensor, count: int, layer: str = "?") -> torch.Tensor:
    """The `count` eigenvectors of a symmetric matrix with the largest eigenvalues (fp64 `eigh`), as columns."""
    check_finite(cov, "covariance", layer)
    cov = cov.to(torch.float64)
    _, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    return vectors[:, -count:].flip(-1) if count > 0 else vectors[:, :0]


def orthonormal_union(candidates: torch.Tensor, rank: int, tol: float = 1e-8) -> torch.Tensor:
    """`rank` orthonormal columns spanning the first candidate columns, in order of preference.

    Candidates are taken left to right; one that is numerically dependent on those already kept (relative residual
    below `tol` after two Gram-Schmidt sweeps) is skipped, so later candidates replace it. The fast path is one QR of
    the first `rank` (normalised) candidates when none of them is dependent.
    """
    candidates = candidates.to(torch.float64)
    columns = candidates / candidates.norm(dim=0).clamp_min(1e-300)
    q, r = torch.linalg.qr(columns[:, :rank])
    if columns.shape[1] >= rank and bool((r.diagonal().abs() > tol).all()):
        return q
    kept: list[torch.Tensor] = []
    for j in range(columns.shape[1]):
        v = columns[:, j]
        if kept:
            basis = torch.stack(kept, dim=1)
            v = v - basis @ (basis.T @ v)
            v = v - basis @ (basis.T @ v)
        norm = float(v.norm())
        if norm > tol:
            kept.append(v / norm)
            if len(kept) == rank:
                return torch.stack(kept, dim=1)
    raise ValueError(f"only {len(kept)} independent directions among {columns.shape[1]} candidates; need {rank}")
