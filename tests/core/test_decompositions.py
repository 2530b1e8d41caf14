"""The shared per-layer decompositions: the whitened SVD from the Gram matrix, subspace iteration for task
directions, and the checked float32 -> float64 fallback."""

import pytest
import torch

from jactus.core import Decompositions
from jactus.core.calibration import CalibrationStats, LayerStats
from jactus.core.linalg import orthonormal_union, top_eigenvectors
from jactus.core.subspace import Metric, union_subspace, weight_bases, whitened_svd


def spd(size: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(size, size + 2, generator=generator, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def assert_same_columns(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-8):
    """Equal up to the sign of each column (singular vectors and eigenvectors are defined up to sign)."""
    signs = torch.sign((actual * expected).sum(dim=0))
    torch.testing.assert_close(actual * signs, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(9, 6), (6, 9)], ids=["n<=m: input-side Gram", "m<n: output-side Gram"])
def test_whitened_svd_from_gram_equals_svd_of_whitened_weight(shape):
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    Sx, Sg = spd(n, gen), spd(m, gen)
    Lx, Lg = torch.linalg.cholesky(Sx), torch.linalg.cholesky(Sg)
    U_M, s, Vh_M = torch.linalg.svd(Lg.T @ W @ Lx, full_matrices=False)
    svd = whitened_svd(W, Metric(Sx, Sg))
    assert svd.side == ("input" if n <= m else "output")
    torch.testing.assert_close(svd.values, s, rtol=1e-10, atol=1e-12)
    values_only = whitened_svd(W, Metric(Sx, Sg), vectors=False)
    assert values_only.gram_vectors is None
    torch.testing.assert_close(values_only.values, s, rtol=1e-10, atol=1e-12)
    left, right = weight_bases(W, Metric(Sx, Sg), svd)
    assert left.shape == (m, min(m, n)) and right.shape == (n, min(m, n))
    assert_same_columns(left, torch.linalg.solve_triangular(Lg.T, U_M, upper=True))  # Lg^{-T} U_M
    assert_same_columns(right, torch.linalg.solve_triangular(Lx.T, Vh_M.T, upper=True))  # Lx^{-T} V_M


def test_rank_deficient_weight_still_gives_a_full_orthonormal_basis():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(10, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 8, generator=gen,
                                                                              dtype=torch.float64)
    metric = Metric(spd(8, gen), spd(10, gen))
    svd = whitened_svd(W, metric)
    assert float(svd.values[2:].max()) < 1e-6 * float(svd.values[0])  # rank 2
    left, right = weight_bases(W, metric, svd)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    U, V = union_subspace(W, metric, 6, rho=0.0)  # more directions than the weight has
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(V.T @ V, torch.eye(6, dtype=torch.float64))
    # Candidates that run out are completed with standard basis vectors.
    assert orthonormal_union(torch.zeros(5, 2, dtype=torch.float64), 3).shape == (5, 3)


def test_subspace_iteration_recovers_top_eigenvectors_across_a_gap():
    gen = torch.Generator().manual_seed(2)
    dim, count = 60, 5
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    values = torch.ones(dim, dtype=torch.float64)
    values[:count] = torch.tensor([100.0, 90, 80, 70, 60])
    cov = basis @ torch.diag(values) @ basis.T
    found = top_eigenvectors(cov, count, method="subspace")
    cosines = torch.linalg.svdvals(basis[:, :count].T @ found)  # cosines of the principal angles
    assert float(cosines.min()) > 1 - 1e-10
    assert_same_columns(found, basis[:, :count], tol=1e-6)  # ordered by eigenvalue (Rayleigh-Ritz)
    exact = top_eigenvectors(cov, count, method="eigh")
    assert torch.equal(top_eigenvectors(cov, count), exact)  # auto on the CPU: the exact eigh
    with pytest.raises(ValueError, match="eigh, subspace"):
        top_eigenvectors(cov, count, method="lanczos")


def single_layer_stats(name: str, input_cov: torch.Tensor, grad_cov: torch.Tensor | None = None):
    return CalibrationStats({name: LayerStats(input_cov, grad_cov, tokens=10)})


def test_float32_overflow_is_redone_in_float64():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64) * 1e20  # its Gram matrix overflows float32
    decompositions = Decompositions(None, "none", compute_dtype=torch.float32)
    values = decompositions.spectrum("big", weight)
    assert decompositions.fp64_fallbacks == ["big"]
    torch.testing.assert_close(values, torch.linalg.svdvals(weight), rtol=1e-10, atol=0)


def test_float32_cholesky_failure_is_redone_in_float64():
    name = "blocks.0.mlp.fc1"
    singular = torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64))  # undamped: not definite
    stats = single_layer_stats(name, singular)
    weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    decompositions = Decompositions(stats, "input", damping=0.0, compute_dtype=torch.float32)
    U, C, V = decompositions.factorize_layer(name, weight, 2, rho=0.5)
    assert decompositions.fp64_fallbacks == [name] and U.dtype == torch.float64
    assert torch.isfinite(U).all() and torch.isfinite(C).all() and torch.isfinite(V).all()
    reference = Decompositions(stats, "input", damping=0.0, compute_dtype=torch.float64)
    U64, C64, V64 = reference.factorize_layer(name, weight, 2, rho=0.5)
    torch.testing.assert_close(U @ C @ V.T, U64 @ C64 @ V64.T)


def test_float32_decompositions_are_close_to_float64_and_errors_name_the_layer():
    gen = torch.Generator().manual_seed(5)
    name = "layers.3.mlp.down_proj"
    stats = single_layer_stats(name, spd(8, gen), spd(6, gen))
    weight = torch.randn(6, 8, generator=gen)
    exact = Decompositions(stats, compute_dtype=torch.float64)
    single = Decompositions(stats, compute_dtype=torch.float32)
    torch.testing.assert_close(single.spectrum(name, weight), exact.spectrum(name, weight), rtol=1e-4, atol=1e-6)
    U, C, V = single.factorize_layer(name, weight, 4)
    assert U.dtype == torch.float32 and single.fp64_fallbacks == []
    U64, C64, V64 = exact.factorize_layer(name, weight, 4)
    torch.testing.assert_close(U @ C @ V.T, (U64 @ C64 @ V64.T).float(), rtol=1e-4, atol=1e-5)
    stats.layers[name].grad_cov[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=name):  # float64 cannot help: the statistics are broken
        Decompositions(stats, compute_dtype=torch.float32).spectrum(name, weight)
    with pytest.raises(ValueError, match="no calibration statistics"):
        exact.spectrum("not.a.layer", weight)
    with pytest.raises(ValueError, match="compute_dtype"):
        Decompositions(stats, compute_dtype=torch.float16)


def test_kept_svd_serves_factorization_without_another_eigh(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    name = "q"
    stats = single_layer_stats(name, spd(8, gen), spd(8, gen))
    weight = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or eigh(*a, **k))
    fresh = Decompositions(stats).factorize_layer(name, weight, 4)
    assert len(calls) == 3  # the Gram matrix, and the task directions of Sg and of Sx
    decompositions = Decompositions(stats)
    decompositions.spectrum(name, weight, keep=True)
    decompositions.release([name], keep_svd=True)
    calls.clear()
    kept = decompositions.factorize_layer(name, weight, 4)
    assert len(calls) == 2  # the Gram matrix's eigh is not redone
    for a, b in zip(kept, fresh, strict=True):
        assert torch.equal(a, b)
