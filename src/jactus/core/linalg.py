"""Numerically careful linear algebra for covariance statistics.

Whitening uses a Cholesky factor `L` (`S = L L^T`) rather than the symmetric square root: for the K-FAC metric
`||Lg^T E Lx||_F = ||Sg^{1/2} E Sx^{1/2}||_F`, since both equal `sqrt(tr(E^T Sg E Sx))`, and a Cholesky costs a
fraction of an eigendecomposition.

Precision: every function computes in the dtype of the matrix it is given (callers pick float64, or float32 on a GPU
with a float64 redo when a float32 result fails, see `Decompositions`); `resolve_compute_dtype` says which.
"""

from __future__ import annotations

import itertools

import torch

DEFAULT_DAMPING = 1e-2
COMPUTE_DTYPES = ("auto", torch.float32, torch.float64)
EIG_METHODS = ("auto", "eigh", "subspace")
# Subspace iteration for a few top eigenvectors: extra columns that speed up convergence of the wanted ones, the
# number of `Q = qr(S Q)` steps, and the seed of its (fixed, reproducible) random start.
SUBSPACE_OVERSAMPLE = 8
SUBSPACE_ITERATIONS = 8
SUBSPACE_SEED = 0
# A candidate direction whose residual (relative, after projecting out the kept ones) is below this is dependent:
# well above the rounding noise of the candidates' dtype.
DEPENDENCE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def check_choice(value, valid, what: str):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(str(v) for v in valid)}")
    return value


def resolve_compute_dtype(compute_dtype, device: torch.device | str) -> torch.dtype:
    """`"auto"`: float32 on CUDA (fp64 decompositions run several times slower there), float64 elsewhere."""
    check_choice(compute_dtype, COMPUTE_DTYPES, "compute_dtype")
    if compute_dtype == "auto":
        return torch.float32 if torch.device(device).type == "cuda" else torch.float64
    return compute_dtype


def check_finite(tensor: torch.Tensor, what: str, layer: str) -> None:
    """Raise a clear error naming the layer when `tensor` holds NaN or Inf."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise FloatingPointError(f"layer {layer!r}: {what} has {bad} non-finite entries (NaN/Inf) out of "
                                 f"{tensor.numel()}; check the calibration loss and inputs")


def damp(cov: torch.Tensor, damping: float = DEFAULT_DAMPING, layer: str = "?",
         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Relative damping `S + damping * mean(diag S) * I`, symmetrised, in `dtype`.

    An all-zero `S` (no signal reached the layer) becomes the identity: no statistics, no preferred direction.
    """
    if damping < 0:
        raise ValueError(f"damping={damping}: expected >= 0")
    cov = cov.to(dtype)
    check_finite(cov, "covariance", layer)
    cov = (cov + cov.T) / 2
    scale = float(cov.diagonal().mean())
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    if scale <= 0:
        return eye
    return cov + (damping * scale) * eye


def jittered_cholesky(cov: torch.Tensor, layer: str = "?", retries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """`(S, L)`: `cov` and its lower Cholesky factor, `L L^T = S`.

    When the Cholesky fails (damping 0 on rank-deficient statistics, or an ill-conditioned matrix), `S` gets an
    extra diagonal jitter, 10x larger each retry from 1e-10 * mean(diag S); `S` is returned with that jitter so that
    the metric and its factor stay consistent. After `retries` failures (at once with `retries=0`) the error names
    the layer.
    """
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
        raise torch.linalg.LinAlgError(f"layer {layer!r}: {str(cov.dtype).replace('torch.', '')} covariance is not "
                                       f"positive definite{' even with extra jitter' if retries else ''}; "
                                       f"increase damping")
    return cov, factor


def whitening(cov: torch.Tensor, damping: float = DEFAULT_DAMPING, layer: str = "?", retries: int = 6,
              dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """`(S, L)`: the damped covariance in `dtype` and its lower Cholesky factor (`jittered_cholesky`)."""
    return jittered_cholesky(damp(cov, damping, layer, dtype), layer, retries)


def cholesky_factor(cov: torch.Tensor, layer: str = "?") -> torch.Tensor:
    """Lower-triangular `L` with `L L^T = cov` for a positive definite `cov` (no damping added), in float64."""
    return whitening(cov, 0.0, layer)[1]


def resolve_eig_method(method: str, cov: torch.Tensor, count: int) -> str:
    """`"auto"`: subspace iteration on CUDA when the wanted columns are well below the dimension (a full `eigh`
    there costs far more than a few GEMMs and QRs), the exact `eigh` otherwise (the CPU always)."""
    check_choice(method, EIG_METHODS, "eig_method")
    if method != "auto":
        return method
    return "subspace" if cov.is_cuda and count + SUBSPACE_OVERSAMPLE <= cov.shape[0] // 3 else "eigh"


def top_eigenvectors(cov: torch.Tensor, count: int, layer: str = "?", method: str = "auto") -> torch.Tensor:
    """The `count` eigenvectors of a symmetric matrix with the largest eigenvalues, as columns, in its dtype.

    method: `eigh` (exact), `subspace` (subspace iteration: `Q = qr(S Q)` from a seeded random start with
    `SUBSPACE_OVERSAMPLE` extra columns, `SUBSPACE_ITERATIONS` times, then Rayleigh-Ritz to order the columns; accurate
    when the spectrum has a gap after the wanted eigenvalues; the exact `eigh` when the oversampled block would
    reach the dimension), `auto` (`resolve_eig_method`).
    """
    check_finite(cov, "covariance", layer)
    method = resolve_eig_method(method, cov, count)
    if count <= 0:
        return cov.new_zeros(cov.shape[0], 0)
    if method == "eigh" or count + SUBSPACE_OVERSAMPLE >= cov.shape[0]:
        _, vectors = torch.linalg.eigh((cov + cov.T) / 2)
        return vectors[:, -count:].flip(-1)
    generator = torch.Generator(device=cov.device).manual_seed(SUBSPACE_SEED)
    block = torch.randn(cov.shape[0], count + SUBSPACE_OVERSAMPLE, generator=generator, device=cov.device,
                        dtype=cov.dtype)
    for _ in range(SUBSPACE_ITERATIONS):
        block = torch.linalg.qr(cov @ block).Q
    _, ritz = torch.linalg.eigh(block.T @ cov @ block)
    return block @ ritz[:, -count:].flip(-1)


def orthonormal_union(candidates: torch.Tensor, rank: int, tol: float | None = None) -> torch.Tensor:
    """`rank` orthonormal columns spanning the first candidate columns, in order of preference.

    Candidates are taken left to right; one that is numerically dependent on those already kept (relative residual
    below `tol`, default `DEPENDENCE_TOL` of their dtype, after two Gram-Schmidt sweeps) is skipped, so later
    candidates replace it. When the candidates run out first (directions of a rank-deficient weight carry no
    information), standard basis vectors complete the basis, in order. The fast path is one QR of the first `rank`
    (normalised) candidates when none of them is dependent. Computes in float32 or float64 (others: float64).
    """
    if candidates.dtype not in DEPENDENCE_TOL:
        candidates = candidates.to(torch.float64)
    tol = DEPENDENCE_TOL[candidates.dtype] if tol is None else tol
    size = candidates.shape[0]
    if not 0 < rank <= size:
        raise ValueError(f"rank {rank} outside [1, {size}] for {size}-dimensional candidates")
    columns = candidates / candidates.norm(dim=0).clamp_min(torch.finfo(candidates.dtype).tiny)
    q, r = torch.linalg.qr(columns[:, :rank])
    if columns.shape[1] >= rank and bool((r.diagonal().abs() > tol).all()):
        return q
    kept: list[torch.Tensor] = []

    def standard_basis():
        for index in range(size):
            unit = columns.new_zeros(size)
            unit[index] = 1
            yield unit

    for v in itertools.chain(columns.unbind(1), standard_basis()):
        if kept:
            basis = torch.stack(kept, dim=1)
            v = v - basis @ (basis.T @ v)
            v = v - basis @ (basis.T @ v)
        norm = float(v.norm())
        if norm > tol:
            kept.append(v / norm)
            if len(kept) == rank:
                break
    return torch.stack(kept, dim=1)
