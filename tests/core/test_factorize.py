import pytest
import torch

from jactus.core import (
    FactorizedLinear,
    LowRankLinear,
    apply_rank_map,
    calibrate,
    count_params,
    factorize,
    plan_ranks,
)
from jactus.core.params import deployed_params


@pytest.fixture
def factorized_vit(tiny_vit, vision_batches, losses):
    stats = calibrate(tiny_vit, vision_batches, losses["vision"], progress=False)
    plan = plan_ranks(tiny_vit, stats, 0.8, rank_multiple=8)
    return factorize(tiny_vit, stats, plan, head_names=["head"], progress=False), plan


def test_only_cores_biases_norms_and_head_train(factorized_vit):
    model, plan = factorized_vit
    factorized = {n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert factorized == {n for n, r in plan.ranks.items() if r is not None} and factorized
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        expected = (owner in factorized and leaf in ("C", "bias")) or owner in norms or owner == "head"
        assert param.requires_grad == expected, name
    assert deployed_params(model) == plan.params_deployed
    assert count_params(model, trainable_only=True) < count_params(model)


def test_factorized_model_trains_cores(factorized_vit, vision_batches, losses):
    model, _ = factorized_vit
    model.train()
    losses["vision"](model, vision_batches[0]).backward()
    layer = next(m for m in model.modules() if isinstance(m, FactorizedLinear))
    assert layer.C.grad is not None and layer.U.grad is None


def test_apply_rank_map_rebuilds_structure_for_checkpoints(factorized_vit, vit_factory, vision_batches):
    model, plan = factorized_vit
    fresh = apply_rank_map(vit_factory(seed=1), plan.ranks, layer_cls="factorized")
    fresh.load_state_dict(model.state_dict(), strict=True)
    images = vision_batches[0][0]
    torch.testing.assert_close(fresh(images), model(images))
    deployed = apply_rank_map(vit_factory(seed=1), plan.ranks, layer_cls=LowRankLinear)
    name = next(n for n, r in plan.ranks.items() if r is not None)
    layer = deployed.get_submodule(name)
    assert isinstance(layer, LowRankLinear) and layer.rank == plan.ranks[name]
    assert (layer.in_features, layer.out_features) == (32, model.get_submodule(name).out_features)
    with pytest.raises(ValueError, match="blocks.9.mlp.fc1"):
        apply_rank_map(vit_factory(), {"blocks.9.mlp.fc1": 8})
    with pytest.raises(ValueError, match="valid: factorized, lowrank"):
        apply_rank_map(vit_factory(), plan.ranks, layer_cls="dense")


def test_fold_and_both_forward_paths_agree():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 4))
    V, _ = torch.linalg.qr(torch.randn(10, 4))
    layer = FactorizedLinear(U, torch.randn(4, 4), V, torch.randn(12))
    assert (layer.in_features, layer.out_features, layer.rank) == (10, 12, 4)
    dense = U @ layer.C.detach() @ V.T
    for shape in ((2, 3, 10), (5, 10, 10)):  # 6 tokens (< m: per token) and 50 tokens (> m: U C formed)
        x = torch.randn(*shape)
        expected = x @ dense.T + layer.bias.detach()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.fold()(x), expected, rtol=1e-5, atol=1e-5)
    folded = layer.fold()
    assert sum(p.numel() for p in folded.parameters()) == (12 + 10) * 4 + 12


def test_count_params_counts_tied_once(tiny_llama):
    embed = tiny_llama.model.embed_tokens.weight
    assert tiny_llama.lm_head.weight is embed
    assert count_params(tiny_llama) == sum(p.numel() for p in tiny_llama.parameters())
    assert count_params(tiny_llama) == sum(p.numel() for n, p in tiny_llama.state_dict().items()) - embed.numel()
