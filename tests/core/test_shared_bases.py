"""Shared input bases (docs/METHOD.md section 3.3): layers that read one input keep one `V`, each its own `U` and core.

The factorization is exact for a group whose weights lie in one input subspace, optimal on its basis, priced at
`n + sum m_i` parameters a rank by the allocator, and carried through folding, the compact format, a checkpoint's
rebuild and jactus-export."""

from __future__ import annotations

import torch

from jactus.core import FactorizedLinear, compress_model, deployed_params, fold_factorized, plan_ranks
from jactus.core.compact import load_compact, save_compact, stored_bytes
from jactus.core.subspace import Metric, factorize_group, stacked_whitened_svd

from .conftest import lm_loss, make_lm_data


def _spd(size: int, generator: torch.Generator) -> torch.Tensor:
    A = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return A @ A.T / size + 0.1 * torch.eye(size, dtype=torch.float64)


def _group(outs=(16, 8, 8), n=16, k=4, seed=0):
    """Weights `W_i = A_i B^T` on one rank-k input subspace, one shared Sx and a Sg per layer."""
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(n, k, generator=generator, dtype=torch.float64)
    weights = [torch.randn(m, k, generator=generator, dtype=torch.float64) @ B.T for m in outs]
    Sx = _spd(n, generator)
    metrics = [Metric(Sx, _spd(m, generator)) for m in outs]
    for metric in metrics[1:]:
        metric.input = metrics[0].input  # one input side, as Decompositions builds it for a shared-input group
    return weights, metrics


def _proxy(weights, metrics, V, factors) -> float:
    """The group's K-FAC proxy: sum_i ||Lg_i^T (W_i - U_i C_i V^T) Lx||^2."""
    total = 0.0
    for W, metric, (U, C) in zip(weights, metrics, factors, strict=True):
        error = W - U @ C @ V.T
        total += float(torch.trace(metric.grad_cov @ error @ metric.input_cov @ error.T))
    return total


def test_a_group_on_one_input_subspace_is_exact_at_that_rank():
    weights, metrics = _group()
    for rank, rho in ((4, 0.0), (8, 0.25)):  # rho 0.25 at rank 8: 6 weight directions, 2 task directions
        V, factors = factorize_group(weights, metrics, rank, rho)
        assert V.shape == (16, rank)
        for W, (U, C) in zip(weights, factors, strict=True):
            assert U.shape[1] == min(rank, W.shape[0]) and C.shape == (U.shape[1], rank)
            torch.testing.assert_close(U @ C @ V.T, W, atol=1e-9, rtol=0)


def test_stacked_spectrum_is_the_stacked_whitened_weights_svd_on_either_side():
    for outs, n in (((16, 8, 8), 16), ((4, 3), 16)):  # n <= sum m (input Gram) and n > sum m (output Gram)
        generator = torch.Generator().manual_seed(3)
        weights = [torch.randn(m, n, generator=generator, dtype=torch.float64) for m in outs]
        Sx = _spd(n, generator)
        metrics = [Metric(Sx, _spd(m, generator)) for m in outs]
        stacked = torch.cat([torch.linalg.cholesky(metric.grad_cov).T @ W @ torch.linalg.cholesky(Sx)
                             for W, metric in zip(weights, metrics, strict=True)])
        expected = torch.linalg.svdvals(stacked)
        torch.testing.assert_close(stacked_whitened_svd(weights, metrics).values, expected, atol=1e-9, rtol=1e-9)
        # with rho 0 the truncation loses exactly the stacked spectrum beyond the rank (the layers' U are unconstrained
        # where rank <= m_i, so the shared V is the group's best)
        rank = min(outs)
        V, factors = factorize_group(weights, metrics, rank, rho=0.0)
        assert abs(_proxy(weights, metrics, V, factors) - float((expected[rank:] ** 2).sum())) < 1e-8 * float(
            (expected ** 2).sum())


def test_wider_basis_than_a_layer_keeps_that_layer_exact_on_it():
    """k/v-like layers narrower than the group's rank: U is m x m, the core m x r, and the layer is W V V^T-optimal."""
    weights, metrics = _group(outs=(16, 4, 4), n=16, k=8, seed=1)
    V, factors = factorize_group(weights, metrics, 8, rho=0.0)
    for W, (U, C) in zip(weights, factors, strict=True):
        assert U.shape == (W.shape[0], min(8, W.shape[0]))
        torch.testing.assert_close(U @ C @ V.T, W, atol=1e-9, rtol=0)


def test_allocator_prices_a_group_rank_at_its_real_cost(tiny_llama):
    spectra = {}
    names = [f"model.layers.{i}.{kind}" for i in range(2) for kind in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]
    modules = {name: tiny_llama.get_submodule(name) for name in names}
    shared = [[f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"] for i in range(2)]
    generator = torch.Generator().manual_seed(0)
    for name, module in modules.items():
        if name.endswith("up_proj"):
            continue
        size = min(module.in_features, module.out_features * (2 if name.endswith("gate_proj") else 1))
        spectra[name] = torch.rand(size, generator=generator, dtype=torch.float64).sort(descending=True).values
    plan = plan_ranks(tiny_llama, None, 0.9, scope="targets", rank_multiple=4, spectra=spectra, shared=shared)
    assert plan.shared == shared
    for gate, up in shared:
        assert plan.ranks[gate] == plan.ranks[up]
    cost = 0
    for name, module in modules.items():
        rank = plan.ranks[name]
        if rank is None:
            cost += module.in_features * module.out_features
        elif name.endswith("up_proj"):
            cost += module.out_features * rank  # the shared V is paid by gate_proj
        else:
            cost += (module.in_features + module.out_features) * rank
    assert plan.params_deployed == cost <= 0.9 * plan.params_original


def _compress(model, budget=0.7, share=True):
    batches = [make_lm_data(seed=s) for s in range(2)]
    model, plan = compress_model(model, batches, lm_loss, budget, rank_multiple=2, rho=0.25, share_bases=share,
                                 progress=False)
    return model, plan, batches


def test_compress_model_shares_one_V_per_group_and_meets_the_budget(tiny_llama):
    model, plan, _ = _compress(tiny_llama)
    groups = {tuple(group) for group in plan.shared}
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj") in groups
    assert ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in groups
    factorized = 0
    for group in plan.shared:
        layers = [model.get_submodule(name) for name in group]
        if plan.ranks[group[0]] is not None:
            factorized += 1
            assert all(isinstance(layer, FactorizedLinear) and layer.V is layers[0].V for layer in layers)
    assert factorized
    assert deployed_params(model) == plan.params_deployed <= 0.7 * plan.params_original
    # the same parameters buy more rank than separate bases do
    _, separate, _ = _compress_fresh(share=False)
    assert sum(r or 0 for r in plan.ranks.values()) > sum(r or 0 for r in separate.ranks.values())


def _compress_fresh(share):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import LLAMA_KWARGS

    torch.manual_seed(0)
    return _compress(LlamaForCausalLM(LlamaConfig(**LLAMA_KWARGS)).eval(), share=share)


def test_fold_compact_and_rebuild_keep_one_basis(tiny_llama, tmp_path):
    model, plan, batches = _compress(tiny_llama)
    with torch.no_grad():  # trained cores: move them off the start
        for layer in model.modules():
            if isinstance(layer, FactorizedLinear):
                layer.C.add_(0.01 * torch.randn_like(layer.C))
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    stored = stored_bytes(model)
    save_compact(model, tmp_path / "compact")
    loaded = load_compact(tmp_path / "compact")
    group = plan.shared[0]
    downs = [loaded.get_submodule(name).down for name in group]
    assert all(down.weight is downs[0].weight for down in downs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    # the shared V is stored (and counted) once: the file's tensor data is what stored_bytes says
    from safetensors import safe_open

    with safe_open(str(tmp_path / "compact" / "model.safetensors"), framework="pt") as handle:
        data = sum(handle.get_tensor(key).numel() * handle.get_tensor(key).element_size() for key in handle.keys())
    assert data == stored["total"] == stored_bytes(loaded)["total"]
    folded = fold_factorized(model)
    downs = [folded.get_submodule(name).down for name in group]
    assert all(down is downs[0] for down in downs)
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_rebuild_from_the_plan_ties_the_bases(tiny_llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    from jactus.methods.jactus import Jactus

    from .conftest import LLAMA_KWARGS

    model, plan, batches = _compress(tiny_llama)
    method = Jactus(budget=0.7, rank_multiple=2, share_bases=True)
    method.plan, method.head_names = plan, []
    fresh = method.rebuild(LlamaForCausalLM(LlamaConfig(**LLAMA_KWARGS)), method.structure())
    fresh.load_state_dict(model.state_dict())
    group = plan.shared[0]
    layers = [fresh.get_submodule(name) for name in group]
    assert all(layer.V is layers[0].V for layer in layers)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_share_bases_refuses_what_it_cannot_build(tiny_llama):
    import pytest

    batches = [make_lm_data()]
    with pytest.raises(ValueError, match="nested=True"):
        compress_model(tiny_llama, batches, lm_loss, [0.6, 0.8], nested=True, share_bases=True, progress=False)
    with pytest.raises(ValueError, match="share_bases"):
        from jactus.methods.jactus import Jactus

        Jactus(share_bases="yes")


def test_members_project_each_input_once_and_never_reuse_a_stale_projection():
    from jactus.core.factorize import tie_shared_bases
    from jactus.core.layers import _PROJECTIONS, LowRankLinear

    torch.manual_seed(0)
    V = torch.linalg.qr(torch.randn(8, 4))[0]
    layers = torch.nn.ModuleDict({"a": FactorizedLinear(torch.randn(6, 4), torch.randn(4, 4), V.clone()),
                                  "b": FactorizedLinear(torch.randn(3, 3), torch.randn(3, 4), V.clone())})
    tie_shared_bases(layers, [["a", "b"]])
    calls = []
    original = torch.matmul

    def counting(x, y, *args, **kwargs):
        if y is layers["a"].V:
            calls.append(1)
        return original(x, y, *args, **kwargs)

    def expected(name, x):
        layer = layers[name]
        return (x @ layer.V) @ (layer.U @ layer.C).T

    x = torch.randn(5, 8)
    torch.matmul = counting
    try:
        ya, yb = layers["a"](x), layers["b"](x)
        assert len(calls) == 1 and id(layers["a"].V) not in _PROJECTIONS  # the last member cleared it
        x.mul_(2)  # changed in place: projected again
        torch.testing.assert_close(layers["b"](x), expected("b", x))
        torch.testing.assert_close(layers["a"](x.clone()), expected("a", x))  # another tensor: projected again
        assert len(calls) == 3
    finally:
        torch.matmul = original
    torch.testing.assert_close(ya, expected("a", x / 2))
    torch.testing.assert_close(yb, expected("b", x / 2))
    want = expected("b", x)
    folded = fold_factorized(layers)
    assert isinstance(folded["a"], LowRankLinear) and folded["a"].down is folded["b"].down
    assert folded["b"].shared_members == 2
    torch.testing.assert_close(folded["b"](x), want)


def test_kinds_pick_which_members_share(tiny_llama):
    batches = [make_lm_data(seed=s) for s in range(2)]
    model, plan = compress_model(tiny_llama, batches, lm_loss, 0.7, rank_multiple=2, rho=0.0,
                                 share_bases=["gate_proj", "up_proj", "q_proj", "k_proj"], progress=False)
    assert sorted(tuple(name.rsplit(".", 1)[-1] for name in group) for group in plan.shared) == [
        ("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj")] * 2
    assert deployed_params(model) == plan.params_deployed <= 0.7 * plan.params_original
