"""Error-aware (sequential) compression (`compress_model(compensation=...)`, docs/METHOD.md section 12.1)."""

from __future__ import annotations

import copy

import pytest
import torch

from jactus.core import FactorizedLinear, compress_model, deployed_params
from jactus.core.error_aware import check_compensation, target_blocks

from .conftest import lm_loss, make_lm_data

BATCHES = [make_lm_data(rows=4, length=9, seed=s) for s in range(3)]


def _compress(model, **kwargs):
    options = dict(rank_multiple=2, rho=0.0, progress=False, damping=1e-6, stats_mode="input")
    options.update(kwargs)
    return compress_model(model, BATCHES, lm_loss, 0.6, **options)


def _captured_inputs(model, name):
    """Per token, the rows `name` reads over the calibration batches (the mask's tokens)."""
    rows = []

    def hook(module, args):
        rows.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        for batch in BATCHES:
            lm_loss(model, batch)
    handle.remove()
    masks = [batch["attention_mask"].bool().reshape(-1) for batch in BATCHES]
    return torch.cat([r[m] for r, m in zip(rows, masks, strict=True)])


def test_first_block_is_one_shot_and_later_blocks_fit_the_dense_output_better(tiny_llama):
    dense = copy.deepcopy(tiny_llama)
    one_shot, plan = _compress(copy.deepcopy(tiny_llama))
    aware, aware_plan = _compress(tiny_llama, compensation=1.0)
    assert aware_plan.ranks == plan.ranks and deployed_params(aware) == plan.params_deployed
    # block 0 reads the dense inputs either way: the same layers
    for name, rank in plan.ranks.items():
        if name.startswith("model.layers.0.") and rank is not None:
            a, b = one_shot.get_submodule(name), aware.get_submodule(name)
            torch.testing.assert_close(a.U @ a.C @ a.V.T, b.U @ b.C @ b.V.T, atol=1e-5, rtol=1e-5)
    # block 1: from the inputs the compressed block 0 gives, the error-aware layer is closer to the dense output
    # (rho 0, Sg = I, tiny damping: the rank-r least-squares fit of W x from x' in the metric of x')
    checked = 0
    for name, rank in plan.ranks.items():
        if not name.startswith("model.layers.1.") or rank is None or name.endswith(("o_proj", "down_proj")):
            continue  # o/down read inputs made inside the block (block-sequential): not what the fit targets
        x = _captured_inputs(dense, name)
        W = dense.get_submodule(name).weight.detach()
        errors = {}
        for label, model in (("one_shot", one_shot), ("aware", aware)):
            layer = model.get_submodule(name)
            x_prime = _captured_inputs(model, name)
            errors[label] = float(((x @ W.T) - x_prime @ (layer.U @ layer.C @ layer.V.T).T.detach()).pow(2).sum())
        assert errors["aware"] < errors["one_shot"], (name, errors)
        checked += 1
    assert checked >= 3


def test_compensation_zero_keeps_the_weight_and_uses_the_prefix_statistics(tiny_llama):
    one_shot, plan = _compress(copy.deepcopy(tiny_llama))
    own, _ = _compress(tiny_llama, compensation=0.0)
    later = [name for name, rank in plan.ranks.items() if rank is not None and name.startswith("model.layers.1.")]
    differs = [name for name in later if not torch.allclose(one_shot.get_submodule(name).C.abs().sum(),
                                                            own.get_submodule(name).C.abs().sum(), rtol=1e-6)]
    assert differs  # block 1's statistics are the compressed prefix's
    assert all(isinstance(own.get_submodule(name), FactorizedLinear) for name in later)


def test_error_aware_with_shared_bases_and_kfac(tiny_llama):
    model, plan = _compress(tiny_llama, compensation=0.5, stats_mode="kfac", share_bases=["gate_proj", "up_proj"],
                            rho=0.25)
    assert plan.shared and deployed_params(model) == plan.params_deployed
    for gate, up in plan.shared:
        if plan.ranks[gate] is not None:
            assert model.get_submodule(gate).V is model.get_submodule(up).V
    with torch.no_grad():
        assert torch.isfinite(lm_loss(model, BATCHES[0]))


def test_bad_settings_fail_before_calibrating(tiny_llama, tiny_vit):
    with pytest.raises(ValueError, match="compensation=1.5"):
        check_compensation(1.5)
    with pytest.raises(ValueError, match="nested"):
        compress_model(tiny_llama, BATCHES, lm_loss, [0.6, 0.8], nested=True, compensation=1.0, progress=False)
    with pytest.raises(ValueError, match="lm_head"):
        target_blocks(tiny_llama, ["model.layers.0.mlp.up_proj", "lm_head"])
    blocks = target_blocks(tiny_vit, ["blocks.1.mlp.fc1", "blocks.0.attn.qkv", "blocks.0.mlp.fc2"])
    assert [(name, targets) for name, _, targets in blocks] == [
        ("blocks.0", ["blocks.0.attn.qkv", "blocks.0.mlp.fc2"]), ("blocks.1", ["blocks.1.mlp.fc1"])]
    with pytest.raises(ValueError, match="one pass"):
        compress_model(tiny_llama, BATCHES, lm_loss, 0.6, max_stats_bytes=80000, compensation=1.0, progress=False)


def test_vit_blocks_run_error_aware(tiny_vit, vision_batches, losses):
    model, plan = compress_model(tiny_vit, vision_batches, losses["vision"], 0.7, rank_multiple=2,
                                 compensation=1.0, progress=False)
    assert deployed_params(model) == plan.params_deployed
    with torch.no_grad():
        assert torch.isfinite(losses["vision"](model, vision_batches[0]))
