"""Sparse corrections on low-rank layers (core.sparse) and JACTUS with a sparse share of the budget."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from jactus.core import FactorizedLinear, count_params, load_compact, save_compact
from jactus.core.sparse import (
    SparseDelta,
    csr_index_bytes,
    sparse_index_bytes,
    top_support,
    uniform_nnz,
    weight_fisher,
)
from jactus.methods import MethodContext
from jactus.methods.jactus import Jactus

from .conftest import LLAMA_KWARGS


def test_sparse_delta_is_its_dense_matrix_and_only_values_get_gradients():
    torch.manual_seed(0)
    index = torch.tensor([0, 5, 7, 11])
    delta = SparseDelta(3, 4, index, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    expected = torch.zeros(12)
    expected[index] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x = torch.randn(2, 4)
    torch.testing.assert_close(delta(x), x @ expected.view(3, 4).T)
    delta(x).sum().backward()
    assert delta.values.grad is not None and delta.values.grad.shape == (4,)
    assert not delta.index.is_floating_point() and "index" in delta.state_dict()
    # CSR: 4 column indices + 4 row pointers
    assert sparse_index_bytes([delta]) == csr_index_bytes((3, 4), 4) == 4 * 4 + 4 * 4
    with pytest.raises(ValueError, match="out of range"):
        SparseDelta(3, 4, torch.tensor([12]))


def test_top_support_and_uniform_counts():
    score = torch.tensor([[0.1, 5.0, 0.3], [4.0, 0.2, 6.0]])
    assert top_support(score, 3).tolist() == [1, 3, 5]
    assert top_support(torch.zeros(2, 2), 2).tolist() == [0, 1]  # ties: lowest positions, identical on every rank
    counts = uniform_nnz({"a": (10, 10), "b": (10, 30), "c": (5, 2)}, 57)
    assert sum(counts.values()) == 57 and counts["b"] > counts["a"] > counts["c"]
    with pytest.raises(ValueError, match="do not fit"):
        uniform_nnz({"a": (2, 2)}, 5)


def test_weight_fisher_is_the_summed_squared_weight_gradient():
    """(g^T x)^2 from hooks equals the square of autograd's per-batch weight gradient, summed over batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    batches = [(torch.randn(4, 7, 6), torch.randint(0, 3, (4, 7))) for _ in range(3)]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]).reshape(-1, 3), batch[1].reshape(-1))

    layers = {"0": model[0], "2": model[2]}
    scores = weight_fisher(model, layers, batches, loss_fn, progress=False)
    for name, layer in layers.items():
        expected = torch.zeros_like(layer.weight)
        for batch in batches:
            model.zero_grad()
            loss_fn(model, batch).backward()
            expected += layer.weight.grad.pow(2)
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-7)


def _llama_setup():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_KWARGS))
    model.jactus_arch = {"library": "transformers", "config": model.config.to_dict()}
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=generator)} for _ in range(3)]
    for batch in batches:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["labels"] = batch["input_ids"].clone()
    return model, batches


def _loss(model, batch):
    return model(**batch).loss


def _logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"]).logits for b in batches])


def test_jactus_sparse_share_meets_the_budget_trains_and_round_trips(tmp_path):
    model, batches = _llama_setup()
    original = count_params(model)
    method = Jactus(budget=0.7, rank_multiple=1, sparse_share=0.1)
    model = method.apply(MethodContext(model=model, loss_fn=_loss, calibration_batches=batches, family="causal_lm"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert layers and all(m.sparse is not None for m in layers.values())
    nnz = sum(m.sparse.nnz for m in layers.values())
    assert nnz == int(0.1 * 0.7 * original) == sum(method.sparse_nnz.values())
    # the values start at zero: the factorized model is unchanged; they train with the cores
    without = copy.deepcopy(model)
    for layer in without.modules():
        if isinstance(layer, FactorizedLinear):
            layer.sparse = None
    torch.testing.assert_close(_logits(model, batches), _logits(without, batches))
    assert all(m.sparse.values.requires_grad and m.C.requires_grad for m in layers.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
    assert any(m.sparse.values.abs().sum() > 0 for m in layers.values())
    trained = _logits(model, batches)
    deployed = method.export(model)
    assert count_params(deployed) / original <= 0.7  # low rank + the non-zeros (the index is a buffer)
    torch.testing.assert_close(_logits(deployed, batches), trained, rtol=1e-4, atol=1e-5)
    save_compact(deployed, tmp_path / "compact")
    loaded = load_compact(tmp_path / "compact")
    torch.testing.assert_close(_logits(loaded, batches), trained, rtol=1e-4, atol=1e-5)
    from jactus import export_hf

    export_hf(loaded, tmp_path / "hf")  # the corrections export too (tests/test_hf_export.py checks the logits)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["jactus_sparse_nnz"] == method.sparse_nnz
    summary = method.summary()["sparse"]
    assert summary["nnz"] == nnz and summary["index_bytes_csr_int32"] > 0


def test_jactus_sparse_share_can_start_at_the_residual():
    """sparse_init=residual: each factorized layer's non-zeros are W - U C V^T at the positions of the largest
    F * R^2 (F the weight Fisher on the factorized model, R that residual), so the layer equals the dense weight
    there and the weight error drops by exactly the residual's energy on the support."""
    model, batches = _llama_setup()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    method = Jactus(budget=0.7, rank_multiple=1, sparse_share=0.1, sparse_init="residual")
    model = method.apply(MethodContext(model=model, loss_fn=_loss, calibration_batches=batches, family="causal_lm"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    without = copy.deepcopy(model)
    for layer in without.modules():
        if isinstance(layer, FactorizedLinear):
            layer.sparse = None
    scores = weight_fisher(without, {n: without.get_submodule(n) for n in layers}, batches, _loss, progress=False)
    for name, layer in layers.items():
        low_rank = (layer.U @ layer.C @ layer.V.T).detach()
        residual = dense[name] - low_rank
        index = top_support(scores[name] * residual.square(), method.sparse_nnz[name])
        assert torch.equal(layer.sparse.index, index)
        torch.testing.assert_close(layer.sparse.values.detach(), residual.flatten()[index])
        assert layer.sparse.values.dtype == torch.float32 and layer.sparse.values.requires_grad
        after = dense[name] - low_rank - layer.sparse.matrix().detach()
        assert after.flatten()[index].abs().max() < 1e-6
        torch.testing.assert_close(after.square().sum(), residual.square().sum() - residual.flatten()[index].square().sum())
    # the start moved: unlike zero values, the corrections change the model's output
    assert not torch.allclose(_logits(model, batches), _logits(without, batches))


def test_bad_sparse_init_fails_early():
    with pytest.raises(ValueError, match=r"method.sparse_init='svd'.*zero.*residual"):
        Jactus(sparse_share=0.1, sparse_init="svd")


def assert_jactus_rebuilds_for_resume(options: dict, train=None) -> None:
    """A `Jactus(**options)` model (optionally trained by `train(model, batches)`) and the model its structure rebuilds
    from a fresh backbone, with the first's state loaded: the same logits and the same trainable parameters."""
    model, batches = _llama_setup()
    method = Jactus(**options)
    model = method.apply(MethodContext(model=model, loss_fn=_loss, calibration_batches=batches, family="causal_lm"))
    if train is not None:
        train(model, batches)
    state = model.state_dict()
    fresh, _ = _llama_setup()
    fresh = Jactus(**options).rebuild(fresh, method.structure())
    fresh.load_state_dict(state)
    torch.testing.assert_close(_logits(fresh, batches), _logits(model, batches))
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_jactus_sparse_structure_rebuilds_for_resume():
    assert_jactus_rebuilds_for_resume(dict(budget=0.7, rank_multiple=1, sparse_share=0.1))


@pytest.mark.parametrize("share,match", [(1.0, r"sparse_share=1.0.*\[0, 1\)"), (-0.1, r"sparse_share=-0.1"),
                                         (True, r"sparse_share=True")])
def test_bad_sparse_share_fails_early(share, match):
    with pytest.raises(ValueError, match=match):
        Jactus(sparse_share=share)


def test_sparse_share_that_leaves_no_low_rank_budget_fails_with_the_share():
    model, batches = _llama_setup()
    method = Jactus(budget=0.5, rank_multiple=1, sparse_share=0.95)
    with pytest.raises(ValueError, match=r"sparse_share=0.95 leaves"):
        method.apply(MethodContext(model=model, loss_fn=_loss, calibration_batches=batches, family="causal_lm"))
