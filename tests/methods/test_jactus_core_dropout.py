"""`method.core_dropout`: dropout on each core's change since the first step, as LoRA's dropout acts on its branch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jactus.core import FactorizedLinear
from jactus.methods import MethodContext
from jactus.methods.jactus import Jactus

from ..core.test_sparse import _llama_setup, _logits, _loss


def _layer(seed: int = 0, m: int = 6, n: int = 5, r: int = 3) -> FactorizedLinear:
    g = torch.Generator().manual_seed(seed)
    return FactorizedLinear(torch.randn(m, r, generator=g), torch.randn(r, r, generator=g),
                            torch.randn(n, r, generator=g), torch.randn(m, generator=g))


@pytest.mark.parametrize("tokens", [2, 40])  # below and above the out width: both forward paths
def test_the_anchor_leaves_the_layer_as_it_is_and_the_change_sees_dropout(tokens):
    layer = _layer()
    x = torch.randn(tokens, 5)
    expected = x @ layer.V @ layer.C.T @ layer.U.T + layer.bias
    layer.anchor_core_dropout(0.5)
    layer.train()
    torch.testing.assert_close(layer(x), expected)  # C = C0: the change branch is zero whatever is dropped
    with torch.no_grad():
        layer.C.add_(torch.randn(3, 3))
    changed = x @ layer.V @ layer.C.T @ layer.U.T + layer.bias
    torch.manual_seed(0)
    draws = torch.stack([layer(x) for _ in range(4000)])
    assert not torch.allclose(draws[0], draws[1])  # train mode drops
    torch.testing.assert_close(draws.mean(0), changed, rtol=0.05, atol=0.15 * changed.abs().mean().item())
    layer.eval()
    torch.testing.assert_close(layer(x), changed)  # eval mode: U C V^T x + b
    torch.testing.assert_close(layer.fold()(x), changed, rtol=1e-5, atol=1e-5)  # the deployed form has no anchor
    assert "C0" not in layer.state_dict()  # the anchor never reaches a checkpoint or a compact model


def test_only_the_core_trains_and_its_gradient_sees_the_dropped_input():
    layer = _layer()
    layer.anchor_core_dropout(0.5)
    layer.train()
    x = torch.randn(8, 5)
    torch.manual_seed(1)
    layer(x).sum().backward()
    assert layer.C0.grad is None and not layer.C0.requires_grad
    torch.manual_seed(1)
    h = x @ layer.V
    dropped = torch.nn.functional.dropout(h, 0.5, training=True)  # the same draw as inside the forward
    expected = layer.U.T @ torch.ones(8, 6).T @ dropped  # d/dC of sum(U (C - C0) dropped^T)
    torch.testing.assert_close(layer.C.grad, expected)


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.1"])
def test_a_bad_probability_names_the_value(bad):
    with pytest.raises(ValueError, match="core_dropout"):
        Jactus(budget=0.7, core_dropout=bad)
    with pytest.raises(ValueError, match="core dropout"):
        _layer().anchor_core_dropout(bad)


def test_the_method_anchors_every_core_at_the_first_batch_and_reports_it():
    method = Jactus(budget=0.7, rank_multiple=1, core_dropout=0.1)
    assert not method.shardable and "core_dropout" in method.unshardable_reason
    model, batches = _llama_setup()
    model = method.apply(MethodContext(model=model, loss_fn=_loss, calibration_batches=batches, family="causal_lm"))
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert layers and all(layer.C0 is None for layer in layers)  # nothing changes before training
    before = _logits(model, batches)
    with torch.no_grad():
        layers[0].C.mul_(1.5)  # a resumed run's cores differ from the fresh ones: the anchor is what is there
    method.on_train_batch_start(model, 0, 10)
    assert all(layer.core_dropout == 0.1 and torch.equal(layer.C0, layer.C) for layer in layers)
    method.on_train_batch_start(model, 1, 10)  # anchored once, not at every step
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
    assert all(not torch.equal(layer.C0, layer.C) for layer in layers)
    assert not torch.allclose(_logits(model, batches), before)
    assert method.summary()["core_dropout"] == 0.1
    assert "core_dropout" not in Jactus(budget=0.7).summary()
    plain = Jactus(budget=0.7)
    assert plain.shardable
    plain.on_train_batch_start(nn.Linear(2, 2), 0, 1)  # off: nothing to anchor, no error
