import pytest
import torch

from jactus.core import FactorizedLinear
from jactus.core.calibration import LayerStats
from jactus.core.linalg import check_finite, cholesky_factor, damp, orthonormal_union
from jactus.core.subspace import Metric, factorize_layer, layer_metric, projected_core, union_subspace


def spd(size: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(size, rank or size + 2, generator=generator, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def sqrtm(S: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(S)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def kfac_metric(Sx, Sg) -> Metric:
    return Metric(Sx, Sg, torch.linalg.cholesky(Sx), torch.linalg.cholesky(Sg))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_relative_damping_and_zero_matrix():
    S = torch.diag(torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(damp(S, 0.5), S + 0.5 * 2.0 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(damp(torch.zeros(3, 3)), torch.eye(3, dtype=torch.float64))


def test_cholesky_whitening_equals_symmetric_square_root(gen):
    Sx, Sg, E = spd(5, gen), spd(4, gen), torch.randn(4, 5, generator=gen, dtype=torch.float64)
    Lx, Lg = cholesky_factor(Sx), cholesky_factor(Sg)
    torch.testing.assert_close(torch.linalg.norm(Lg.T @ E @ Lx), torch.linalg.norm(sqrtm(Sg) @ E @ sqrtm(Sx)))


def test_identity_statistics_core_is_projection(gen):
    W = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(7, 3, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(projected_core(W, U, V, Metric()), U.T @ W @ V)
    eye = kfac_metric(torch.eye(5, dtype=torch.float64), torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(projected_core(W, U, V, eye), U.T @ W @ V)
    U, C, V = factorize_layer(W.float(), layer_metric(None, "none"), 3, rho=0.25)
    torch.testing.assert_close(C, U.T @ W @ V, rtol=1e-6, atol=1e-6)


def test_projected_core_minimises_kfac_proxy(gen):
    m, n, r = 6, 5, 3
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    Sx, Sg = spd(n, gen), spd(m, gen)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    C = projected_core(W, U, V, kfac_metric(Sx, Sg))
    # vec(Sg^1/2 U C V^T Sx^1/2) = (Sx^1/2 V kron Sg^1/2 U) vec(C), column-major vec.
    A = torch.kron(sqrtm(Sx) @ V, sqrtm(Sg) @ U)
    target = (sqrtm(Sg) @ W @ sqrtm(Sx)).T.reshape(-1)
    vec_c = torch.linalg.lstsq(A, target.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(C, vec_c.reshape(r, r).T, rtol=1e-9, atol=1e-9)

    def proxy(core):
        return torch.linalg.norm(sqrtm(Sg) @ (W - U @ core @ V.T) @ sqrtm(Sx)) ** 2
    assert proxy(C) < proxy(C + 1e-3 * torch.randn(r, r, generator=gen, dtype=torch.float64))


def test_union_keeps_task_directions_and_rank(gen):
    m, n, r = 10, 8, 4
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    metric = kfac_metric(spd(n, gen), spd(m, gen))
    U, V = union_subspace(W, metric, r, rho=0.5)
    assert U.shape == (m, r) and V.shape == (n, r)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=torch.float64))
    torch.testing.assert_close(V.T @ V, torch.eye(r, dtype=torch.float64))
    top_g = torch.linalg.eigh(metric.grad_cov).eigenvectors[:, -2:]
    assert torch.linalg.norm(top_g - U @ (U.T @ top_g)) < 1e-8  # the b = 2 task directions are in span(U)
    # Whitened weight directions: the first a = 2 of Lg^{-T} U_M are in span(U).
    left = torch.linalg.svd(metric.grad_factor.T @ W @ metric.input_factor).U
    Ua = torch.linalg.solve_triangular(metric.grad_factor.T, left[:, :2], upper=True)
    assert torch.linalg.norm(Ua - U @ (U.T @ Ua)) < 1e-8


def test_dependent_task_directions_are_replaced(gen):
    # Sg's top eigenvectors are W's top left singular vectors: the task directions add nothing new.
    m, r = 6, 4
    W = torch.diag(torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64))
    Sg = torch.diag(torch.tensor([9.0, 8, 1, 1, 1, 1], dtype=torch.float64))
    metric = Metric(grad_cov=Sg, grad_factor=Sg.sqrt())
    U, _ = union_subspace(W, metric, r, rho=0.5, weight_basis="plain")
    assert U.shape == (m, r)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=torch.float64))
    spanned = (U @ U.T).diagonal()  # the next weight directions e3, e4 filled in
    torch.testing.assert_close(spanned, torch.tensor([1.0, 1, 1, 1, 0, 0], dtype=torch.float64))
    dup = torch.eye(5, dtype=torch.float64)[:, [0, 0, 1, 1, 2]]
    assert orthonormal_union(dup, 3).shape == (5, 3)


def test_full_rank_reproduces_dense_layer(gen):
    linear = torch.nn.Linear(8, 8).double()
    metric = kfac_metric(spd(8, gen), spd(8, gen))
    U, C, V = factorize_layer(linear.weight, metric, 8, rho=0.25)
    torch.testing.assert_close(U @ C @ V.T, linear.weight.detach(), rtol=1e-9, atol=1e-9)
    layer = FactorizedLinear(U, C, V, linear.bias.detach().clone())
    for tokens in (3, 40):  # both forward paths (per token, and U C formed once)
        x = torch.randn(tokens, 8, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(layer(x), linear(x))
        torch.testing.assert_close(layer.fold()(x), linear(x))


def test_rank_deficient_statistics_are_damped(gen):
    x = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 1, generator=gen, dtype=torch.float64)
    stats = LayerStats(x @ x.T, g @ g.T, tokens=1)  # rank one
    W = torch.randn(6, 8, generator=gen)
    for damping in (1e-2, 0.0):  # 0: the Cholesky jitter fallback
        U, C, V = factorize_layer(W, layer_metric(stats, "kfac", damping), 3)
        assert torch.isfinite(U).all() and torch.isfinite(C).all() and torch.isfinite(V).all()


def test_non_finite_statistics_name_the_layer():
    bad = torch.eye(3, dtype=torch.float64)
    bad[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="blocks.3.mlp.fc1"):
        layer_metric(LayerStats(bad, torch.eye(2, dtype=torch.float64), 5), "kfac", layer="blocks.3.mlp.fc1")
    with pytest.raises(FloatingPointError, match="'my.layer'"):
        check_finite(torch.tensor([1.0, float("inf")]), "x", "my.layer")
