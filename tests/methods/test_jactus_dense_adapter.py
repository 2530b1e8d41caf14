"""`method.dense_adapter_r`: LoRA on the targets a JACTUS plan keeps dense, trained with the cores, merged at export."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from jactus.core import count_params, load_compact, save_compact
from jactus.methods import MethodContext
from jactus.methods.jactus import Jactus

from ..core.test_sparse import _llama_setup, _logits, _loss, assert_jactus_rebuilds_for_resume


def _apply(method: Jactus):
    model, batches = _llama_setup()
    ctx = MethodContext(model=model, loss_fn=_loss, calibration_batches=batches, family="causal_lm")
    return method.apply(ctx), batches


def _train(model, batches, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        for batch in batches:
            optimizer.zero_grad()
            _loss(model, batch).backward()
            optimizer.step()


def test_dense_targets_get_adapters_that_train_and_merge_into_the_deployed_size(tmp_path):
    method = Jactus(budget=0.7, rank_multiple=1, dense_adapter_r=2, dense_adapter_alpha=4)
    model, batches = _apply(method)
    dense = sorted(name for name, rank in method.plan.ranks.items() if rank is None)
    assert dense and method.dense_adapted == dense  # the budget keeps some targets dense (v_proj, o_proj here)
    adapted = sorted(name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    assert adapted == dense  # exactly the dense-kept targets, never a factorized one
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.endswith(".C") for name in trainable)
    lora = [name for name in trainable if "lora_" in name]
    assert len(lora) == 2 * len(dense)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert not any(name.endswith("base_layer.weight") for name in trainable)  # the dense weight itself stays frozen
    plain_method = Jactus(budget=0.7, rank_multiple=1)
    plain, _ = _apply(plain_method)
    torch.testing.assert_close(_logits(model, batches), _logits(plain, batches))  # B = 0: the same model at init
    before = {name: model.get_submodule(name).get_base_layer().weight.detach().clone() for name in dense}
    _train(model, batches)
    for name in dense:
        assert model.get_submodule(name).lora_B["default"].weight.abs().sum() > 0
        torch.testing.assert_close(model.get_submodule(name).get_base_layer().weight, before[name])
    trained = _logits(model, batches)
    deployed = method.export(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in deployed.modules())
    assert all(type(deployed.get_submodule(name)) is nn.Linear for name in dense)
    assert count_params(deployed) == count_params(plain_method.export(plain))  # the adapters merged: same size
    torch.testing.assert_close(_logits(deployed, batches), trained, rtol=1e-4, atol=1e-5)
    save_compact(deployed, tmp_path / "compact")
    torch.testing.assert_close(_logits(load_compact(tmp_path / "compact"), batches), trained, rtol=1e-4, atol=1e-5)
    assert method.summary()["dense_adapter"] == {"r": 2, "alpha": 4.0, "layers": len(dense)}


def test_dense_adapter_structure_rebuilds_for_resume():
    assert_jactus_rebuilds_for_resume(dict(budget=0.7, rank_multiple=1, dense_adapter_r=2),
                                      train=lambda model, batches: _train(model, batches, steps=1))


@pytest.mark.parametrize("r,match", [(-1, r"dense_adapter_r=-1"), (True, r"dense_adapter_r=True"),
                                     (2.5, r"dense_adapter_r=2.5.*rank >= 0")])
def test_bad_dense_adapter_rank_fails_early(r, match):
    with pytest.raises(ValueError, match=match):
        Jactus(dense_adapter_r=r)
