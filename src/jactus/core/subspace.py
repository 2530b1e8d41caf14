"""One layer of JACTUS: the metric from calibration statistics, the whitened weight's SVD, the task-aware union
subspace, the projected core.

Everything here computes in the metric's dtype (float64 unless asked otherwise) on the device of the weight; a side of
the metric that is `None` is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linalg import (
    DEFAULT_DAMPING,
    check_choice,
    check_finite,
    damp,
    jittered_cholesky,
    orthonormal_union,
    resolve_eig_method,
    top_eigenvectors,
)

STATS_MODES = ("kfac", "input", "gradient", "none", "asvd")
WEIGHT_BASES = ("whitened", "plain")
ASVD_ALPHA = 0.5


class CovarianceSide:
    """One side of a layer's metric: the damped covariance `S` and, computed on first use and then kept, its lower
    Cholesky factor `L` (`L L^T = S`) and its top eigenvectors. Layers that read one input share one input side.

    In float64 a failing Cholesky retries with jitter (`jittered_cholesky`); in float32 it raises at once, so that
    the caller redoes the layer in float64.
    """

    def __init__(self, cov: torch.Tensor, factor: torch.Tensor | None = None, layer: str = "?"):
        self.cov, self._factor, self.layer = cov, factor, layer
        self._eigenvectors: dict[int | str, torch.Tensor] = {}

    @classmethod
    def damped(cls, cov: torch.Tensor, damping: float, layer: str, dtype: torch.dtype,
               device: torch.device | str | None = None) -> CovarianceSide:
        side = cls(damp(cov.to(device=device, dtype=dtype), damping, layer, dtype), layer=layer)
        if damping == 0:
            # Positive definite only when damped (its smallest eigenvalue is then >= damping * mean(diag S)): certify
            # it now, so that a Cholesky jitter reaches every use of S, not only the later ones.
            side.factor  # noqa: B018
        return side

    @property
    def factor(self) -> torch.Tensor:
        if self._factor is None:
            retries = 6 if self.cov.dtype == torch.float64 else 0
            self.cov, self._factor = jittered_cholesky(self.cov, self.layer, retries)
        return self._factor

    def top_eigenvectors(self, count: int, method: str = "auto") -> torch.Tensor:
        """The `count` top eigenvectors; an exact `eigh` is done once and sliced for any count."""
        method = resolve_eig_method(method, self.cov, count)
        key = "all" if method == "eigh" else count
        if key not in self._eigenvectors:
            self._eigenvectors[key] = top_eigenvectors(self.cov, self.cov.shape[0] if key == "all" else count,
                                                       self.layer, method)
        return self._eigenvectors[key][:, :count]


class Metric:
    """The K-FAC metric of one layer: damped covariances `S = L L^T` of the input and the output gradient.

    `Metric(input_cov, grad_cov, input_factor, grad_factor)` wraps given matrices (a factor left out is computed on
    first use); a covariance left out is the identity. `dtype` is what the layer's decompositions compute in.
    """

    def __init__(self, input_cov: torch.Tensor | None = None, grad_cov: torch.Tensor | None = None,
                 input_factor: torch.Tensor | None = None, grad_factor: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None):
        if (input_cov is None and input_factor is not None) or (grad_cov is None and grad_factor is not None):
            raise ValueError("a Cholesky factor needs its covariance")
        self.input = None if input_cov is None else CovarianceSide(input_cov, input_factor)
        self.grad = None if grad_cov is None else CovarianceSide(grad_cov, grad_factor)
        given = [cov.dtype for cov in (input_cov, grad_cov) if cov is not None]
        self.dtype = dtype or (given[0] if given else torch.float64)

    @classmethod
    def from_sides(cls, input_side: CovarianceSide | None, grad_side: CovarianceSide | None,
                   dtype: torch.dtype) -> Metric:
        metric = cls(dtype=dtype)
        metric.input, metric.grad = input_side, grad_side
        return metric

    @property
    def input_cov(self) -> torch.Tensor | None:
        return None if self.input is None else self.input.cov

    @property
    def grad_cov(self) -> torch.Tensor | None:
        return None if self.grad is None else self.grad.cov

    @property
    def input_factor(self) -> torch.Tensor | None:
        return None if self.input is None else self.input.factor

    @property
    def grad_factor(self) -> torch.Tensor | None:
        return None if self.grad is None else self.grad.factor


def layer_metric(layer_stats, stats_mode: str = "kfac", damping: float = DEFAULT_DAMPING, layer: str = "?",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float64,
                 input_side: CovarianceSide | None = None) -> Metric:
    """The metric `stats_mode` asks for, from a `LayerStats` (or None for `stats_mode="none"`).

    kfac: Sx and Sg; input: Sx only (SVD-LLM); gradient: Sg only; none: plain weight;
    asvd: diagonal input scaling `Lx = diag(diag(Sx))^(alpha / 2)` with alpha = 0.5 (ASVD), Sg = I.
    `input_side`: the (damped) input side already built for a layer that reads the same input.
    """
    check_choice(stats_mode, STATS_MODES, "stats_mode")
    if stats_mode == "none":
        return Metric(dtype=dtype)
    if layer_stats is None:
        raise ValueError(f"layer {layer!r}: stats_mode={stats_mode!r} needs calibration statistics, got none")
    if stats_mode in ("kfac", "input"):
        input_side = input_side or CovarianceSide.damped(layer_stats.input_cov, damping, layer, dtype, device)
    elif stats_mode == "asvd":
        input_side = input_side or _asvd_side(layer_stats.input_cov, damping, layer, dtype, device)
    else:
        input_side = None
    grad_side = None
    if stats_mode in ("kfac", "gradient"):
        if layer_stats.grad_cov is None:
            raise ValueError(f"layer {layer!r}: stats_mode={stats_mode!r} needs the output-gradient covariance; "
                             f"calibrate with need_gradients=True")
        grad_side = CovarianceSide.damped(layer_stats.grad_cov, damping, layer, dtype, device)
    return Metric.from_sides(input_side, grad_side, dtype)


def _asvd_side(cov: torch.Tensor, damping: float, layer: str, dtype: torch.dtype, device) -> CovarianceSide:
    """ASVD's diagonal input scaling as a metric side: `S = diag(d)^alpha`, `L = diag(d)^(alpha / 2)`."""
    scale = damp(cov.to(device=device, dtype=dtype), damping, layer, dtype).diagonal()
    return CovarianceSide(torch.diag(scale ** ASVD_ALPHA), torch.diag(scale ** (ASVD_ALPHA / 2)), layer)


@dataclass
class WhitenedSVD:
    """Thin SVD of the whitened weight `M = Lg^T W Lx` (m x n) from one eigendecomposition of its smaller Gram matrix.

    `values`: the min(m, n) singular values, descending. `side`: "input" when the Gram matrix is `M^T M` (n x n,
    n <= m), "output" when it is `M M^T` (m x m); `gram_vectors`: its eigenvectors in the order of `values` (`V_M`
    or `U_M`), None when only the values were computed.
    """

    values: torch.Tensor
    side: str
    gram_vectors: torch.Tensor | None = None


def whitened_svd(weight: torch.Tensor, metric: Metric, layer: str = "?", vectors: bool = True) -> WhitenedSVD:
    """Singular values (and with `vectors` the singular vectors of the smaller side) of `M = Lg^T W Lx`.

    The Gram matrix needs the Cholesky factor of that side only: `M^T M = Lx^T (W^T Sg W) Lx` (n <= m), else
    `M M^T = Lg^T (W Sx W^T) Lg`; `s = sqrt(max(eigenvalue, 0))`. Squaring costs accuracy only in singular values
    far below the largest (below about sqrt(eps) of it), whose gains are negligible in the allocation.
    """
    W = weight.detach().to(metric.dtype)
    m, n = W.shape
    if n <= m:
        inner = W.T @ (W if metric.grad is None else metric.grad_cov @ W)
        factor, side = metric.input_factor, "input"
    else:
        inner = W @ (W.T if metric.input is None else metric.input_cov @ W.T)
        factor, side = metric.grad_factor, "output"
    gram = inner if factor is None else factor.T @ inner @ factor
    values, gram_vectors = _gram_svd(gram, "Gram matrix of the whitened weight", layer, vectors)
    return WhitenedSVD(values, side, gram_vectors)


def _gram_svd(gram: torch.Tensor, what: str, layer: str, vectors: bool):
    """Singular values `sqrt(max(eigenvalue, 0))` of the matrix whose Gram matrix is `gram`, descending, and (with
    `vectors`) the eigenvectors in that order."""
    gram = (gram + gram.T) / 2
    check_finite(gram, what, layer)
    if vectors:
        eigenvalues, gram_vectors = torch.linalg.eigh(gram)
        gram_vectors = gram_vectors.flip(-1)
    else:
        eigenvalues, gram_vectors = torch.linalg.eigvalsh(gram), None
    return eigenvalues.flip(-1).clamp_min(0).sqrt(), gram_vectors


def spectrum(weight: torch.Tensor, metric: Metric, layer: str = "?") -> torch.Tensor:
    """Singular values of the whitened weight, descending (the metric's dtype)."""
    return whitened_svd(weight, metric, layer, vectors=False).values


def _floored_inverse(s: torch.Tensor) -> torch.Tensor:
    """`1 / s` for descending singular values, each floored at `eps * s_max`: directions with s ~ 0 stay finite."""
    return 1 / s.clamp_min(max(float(s[0]) * torch.finfo(s.dtype).eps, torch.finfo(s.dtype).tiny))


def _unwhiten(vectors: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """`L^{-T} vectors`: a whitened-space direction mapped back to the original space."""
    if factor is None:
        return vectors
    return torch.linalg.solve_triangular(factor.T, vectors, upper=True)


def weight_bases(weight: torch.Tensor, metric: Metric, svd: WhitenedSVD,
                 layer: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """All min(m, n) weight directions in the original space, `Ua = Lg^{-T} U_M` (m x k) and `Va = Lx^{-T} V_M`.

    The side that was not decomposed follows from the other without its Cholesky factor: `U_M = M V_M / s` gives
    `Ua = W Lx V_M / s`, and `V_M = M^T U_M / s` gives `Va = W^T Lg U_M / s`. Singular values are floored at
    `eps * s_max` in that division: directions with s ~ 0 (last in order) stay finite, carry no weight, and the
    union replaces them if they are dependent.
    """
    if svd.gram_vectors is None:
        raise ValueError(f"layer {layer!r}: the whitened SVD was computed without vectors")
    W = weight.detach().to(metric.dtype)
    inverse = _floored_inverse(svd.values)
    if svd.side == "input":
        factor = metric.input_factor
        right = _unwhiten(svd.gram_vectors, factor)
        left = (W @ (svd.gram_vectors if factor is None else factor @ svd.gram_vectors)) * inverse
    else:
        factor = metric.grad_factor
        left = _unwhiten(svd.gram_vectors, factor)
        right = (W.T @ (svd.gram_vectors if factor is None else factor @ svd.gram_vectors)) * inverse
    check_finite(left, "weight subspace", layer)
    check_finite(right, "weight subspace", layer)
    return left, right


def task_directions(rank: int, rho: float) -> int:
    """b = round(rho r), rounding halves up."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho}: expected a fraction in [0, 1]")
    return int(math.floor(rho * rank + 0.5))


def union_subspace(weight: torch.Tensor, metric: Metric, rank: int, rho: float = 0.25,
                   weight_basis: str = "whitened", layer: str = "?", svd: WhitenedSVD | None = None,
                   eig_method: str = "auto", nested: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases `U` (m x r) and `V` (n x r) of the task-aware union (docs/METHOD.md section 2).

    Weight directions: top singular vectors of the whitened weight mapped back (or of `W` for `plain`); `svd` is a
    precomputed `whitened_svd` with vectors. Task directions: top-b eigenvectors of Sg (output side) and Sx (input
    side), by `eig_method` (`top_eigenvectors`); a side without statistics takes weight directions only. Dependent
    directions are replaced by the next weight directions, so each basis has `rank` columns.

    `nested=True` (palette fine-tuning, docs/METHOD.md section 11): the bases of every smaller rank are the first
    columns. The candidates interleave the two kinds so that each prefix of length j holds `j - b(j)` weight and
    `b(j)` task directions (`b = task_directions`): the set the union at rank j is built from. The columns are orthogonal in
    each side's metric (`U^T Sg U` and `V^T Sx V` diagonal, Gram-Schmidt in the whitened space) and of unit
    Euclidean norm, instead of orthonormal: then the projected core of the first j columns is the leading j x j block
    of the projected core at rank `rank`, so truncating `U C V^T` gives the product of the rank-j factorization (the
    basis differs from the orthonormal one by an invertible j x j map). Exactly, up to rounding, when the task
    directions are exact eigenvectors (`eig_method="eigh"`, or `"auto"` where it resolves to `eigh`: always on the
    CPU): the b(j) leading ones are then the same at both ranks. Where `"auto"` runs subspace iteration (CUDA;
    `resolve_eig_method`), the leading b(j) of the b(`rank`) iterated directions match those a rank-j iteration
    returns only to the iteration's accuracy, and so does the truncation; the weight directions nest exactly either way.
    """
    check_choice(weight_basis, WEIGHT_BASES, "weight_basis")
    m, n = weight.shape
    if not 0 < rank <= min(m, n):
        raise ValueError(f"layer {layer!r}: rank {rank} outside [1, {min(m, n)}] for a {m}x{n} weight")
    b = task_directions(rank, rho)
    basis_metric = metric if weight_basis == "whitened" else Metric(dtype=metric.dtype)
    if svd is None or weight_basis == "plain":
        svd = whitened_svd(weight, basis_metric, layer)
    left, right = weight_bases(weight, basis_metric, svd, layer)

    def union(weight_dirs: torch.Tensor, side: CovarianceSide | None) -> torch.Tensor:
        count = b if side is not None else 0
        task = side.top_eigenvectors(count, eig_method) if count else weight_dirs[:, :0]
        if not nested:
            a = rank - count
            return orthonormal_union(torch.cat([weight_dirs[:, :a], task, weight_dirs[:, a:]], dim=1), rank)
        order, used_weight, used_task = [], 0, 0
        for j in range(1, rank + 1):
            if side is not None and task_directions(j, rho) > used_task:
                order.append(task[:, used_task])
                used_task += 1
            else:
                order.append(weight_dirs[:, used_weight])
                used_weight += 1
        candidates = torch.cat([torch.stack(order, dim=1), weight_dirs[:, used_weight:]], dim=1)
        if side is None:
            return orthonormal_union(candidates, rank)
        whitened = orthonormal_union(side.factor.T @ candidates, rank)
        basis = _unwhiten(whitened, side.factor)
        return basis / basis.norm(dim=0)

    return union(left, metric.grad), union(right, metric.input)


def projected_core(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, metric: Metric) -> torch.Tensor:
    """`C* = argmin_C ||Sg^{1/2} (W - U C V^T) Sx^{1/2}||_F = (U^T Sg U)^{-1} U^T Sg W Sx V (V^T Sx V)^{-1}`.

    Solved with Cholesky solves, never explicit inverses; with identity statistics (and orthonormal U, V) it is
    `U^T W V`.
    """
    W = weight.detach().to(metric.dtype)
    U, V = U.to(metric.dtype), V.to(metric.dtype)
    SgU = U if metric.grad_cov is None else metric.grad_cov @ U
    SxV = V if metric.input_cov is None else metric.input_cov @ V
    core = SgU.T @ W @ SxV
    if metric.grad_cov is not None:
        core = torch.cholesky_solve(core, torch.linalg.cholesky(U.T @ SgU))
    if metric.input_cov is not None:
        core = torch.cholesky_solve(core.T, torch.linalg.cholesky(V.T @ SxV)).T
    return core


def factorize_layer(weight: torch.Tensor, metric: Metric, rank: int, rho: float = 0.25,
                    weight_basis: str = "whitened", layer: str = "?", svd: WhitenedSVD | None = None,
                    eig_method: str = "auto", nested: bool = False):
    """`(U, C, V)` in the metric's dtype with `U C V^T` the JACTUS approximation of `weight` at `rank`; `nested`:
    the bases whose truncations give every smaller rank's approximation (`union_subspace`)."""
    U, V = union_subspace(weight, metric, rank, rho, weight_basis, layer, svd, eig_method, nested)
    core = projected_core(weight, U, V, metric)
    check_finite(core, "projected core", layer)
    return U, core, V


# Shared input bases (docs/METHOD.md section 3.3): layers that read one input (q/k/v, gate/up) keep one `V`.


def stacked_whitened_svd(weights: list[torch.Tensor], metrics: list[Metric], layer: str = "?",
                         vectors: bool = True) -> WhitenedSVD:
    """Thin SVD of the stacked whitened weights `M = [Lg_1^T W_1 Lx; ...; Lg_k^T W_k Lx]` of layers that read one
    input (one input side `Lx`, each layer its own gradient side): `s_j^2` is what the K-FAC proxy of the group loses
    without rank j of a shared `V`. From the n x n Gram matrix `Lx^T (sum_i W_i^T Sg_i W_i) Lx` when n <= sum m_i
    (side "input", `gram_vectors` = `V_M`), else from `M M^T` (side "output", `gram_vectors` = `U_M`, stacked)."""
    dtype = metrics[0].dtype
    Ws = [weight.detach().to(dtype) for weight in weights]
    n = Ws[0].shape[1]
    if any(W.shape[1] != n for W in Ws):
        raise ValueError(f"group {layer!r}: layers sharing an input basis need one input width, got "
                         f"{[tuple(W.shape) for W in Ws]}")
    input_factor = metrics[0].input_factor
    if n <= sum(W.shape[0] for W in Ws):
        inner = sum(W.T @ (W if metric.grad is None else metric.grad_cov @ W)
                    for W, metric in zip(Ws, metrics, strict=True))
        gram, side = inner if input_factor is None else input_factor.T @ inner @ input_factor, "input"
    else:
        stacked = torch.cat([W if metric.grad is None else metric.grad_factor.T @ W
                             for W, metric in zip(Ws, metrics, strict=True)])
        stacked = stacked if input_factor is None else stacked @ input_factor
        gram, side = stacked @ stacked.T, "output"
    values, gram_vectors = _gram_svd(gram, "Gram matrix of the stacked whitened weights", layer, vectors)
    values = values[: min(n, gram.shape[0])]
    return WhitenedSVD(values, side, None if gram_vectors is None else gram_vectors[:, : values.numel()])


def _shared_input_directions(weights: list[torch.Tensor], metrics: list[Metric], svd: WhitenedSVD) -> torch.Tensor:
    """The stacked whitened weight's right singular directions in the original space, `Lx^{-T} V_M` (n x k)."""
    input_factor = metrics[0].input_factor
    if svd.side == "input":
        return _unwhiten(svd.gram_vectors, input_factor)
    # V_M = M^T U_M / s, so Lx^{-T} V_M = (sum_i W_i^T Lg_i U_M,i) / s
    inverse = _floored_inverse(svd.values)
    blocks = torch.split(svd.gram_vectors, [weight.shape[0] for weight in weights])
    right = sum(weight.detach().to(metric.dtype).T @ (block if metric.grad is None else metric.grad_factor @ block)
                for weight, metric, block in zip(weights, metrics, blocks, strict=True))
    return right * inverse


def _with_task_directions(weight_dirs: torch.Tensor, side: CovarianceSide | None, rank: int, rho: float,
                          eig_method: str) -> torch.Tensor:
    """`rank` orthonormal columns: the first `rank - b` weight directions and the side's top-b eigenvectors (b =
    `task_directions(rank, rho)`; none without the side), dependent ones replaced by the next weight directions."""
    count = task_directions(rank, rho) if side is not None else 0
    task = side.top_eigenvectors(count, eig_method) if count else weight_dirs[:, :0]
    a = rank - count
    return orthonormal_union(torch.cat([weight_dirs[:, :a], task.to(weight_dirs.dtype), weight_dirs[:, a:]], dim=1),
                             rank)


def factorize_group(weights: list[torch.Tensor], metrics: list[Metric], rank: int, rho: float = 0.25,
                    weight_basis: str = "whitened", layer: str = "?", svd: WhitenedSVD | None = None,
                    eig_method: str = "auto") -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One input basis `V` (n x rank) for layers that read one input, and per layer `(U_i, C_i)` with `U_i` m_i x
    min(rank, m_i) and `C_i` min(rank, m_i) x rank: layer i is `U_i C_i V^T` (docs/METHOD.md section 3.3).

    `V`: the union of the stacked whitened weights' input directions (`stacked_whitened_svd`, which `svd` may give)
    with the top-b eigenvectors of the shared Sx. Given `V`, the best `m_i x rank` map in layer i's metric is
    `B_i = W_i Sx V (V^T Sx V)^{-1}`, whatever Sg_i (the map is unconstrained); `U_i` is the union of `B_i`'s output
    directions in the Sg_i metric (`B_i Q / s`, from the eigendecomposition of `B_i^T Sg_i B_i`) with Sg_i's top-b
    eigenvectors, and `C_i` the projected core of `(U_i, V)`. With rho = 0 and rank <= m_i, `U_i C_i = B_i`: each
    layer is the best it can be on the shared basis. A group whose layers' weights lie in one rank-k input subspace
    is exact from rank k on."""
    check_choice(weight_basis, WEIGHT_BASES, "weight_basis")
    n = weights[0].shape[1]
    if not 0 < rank <= n:
        raise ValueError(f"group {layer!r}: rank {rank} outside [1, {n}] for a shared input of width {n}")
    basis_metrics = metrics if weight_basis == "whitened" else [Metric(dtype=m.dtype) for m in metrics]
    if svd is None or weight_basis == "plain":
        svd = stacked_whitened_svd(weights, basis_metrics, layer)
    V = _with_task_directions(_shared_input_directions(weights, basis_metrics, svd), metrics[0].input, rank, rho,
                              eig_method)
    factors = []
    for weight, metric, basis_metric in zip(weights, metrics, basis_metrics, strict=True):
        W = weight.detach().to(metric.dtype)
        SxV = V if basis_metric.input_cov is None else basis_metric.input_cov @ V
        B = torch.cholesky_solve((W @ SxV).T, torch.linalg.cholesky(V.T @ SxV)).T  # W Sx V (V^T Sx V)^{-1}
        SgB = B if basis_metric.grad_cov is None else basis_metric.grad_cov @ B
        s, Q = _gram_svd(B.T @ SgB, "Gram matrix of the shared-basis map", layer, vectors=True)
        out_dirs = (B @ Q) * _floored_inverse(s)
        U = _with_task_directions(out_dirs, metric.grad, min(rank, W.shape[0]), rho, eig_method)
        core = projected_core(weight, U, V, metric)
        check_finite(core, "projected core", layer)
        factors.append((U, core))
    return V, factors
