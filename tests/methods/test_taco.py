"""TACO (OBS pruning with the task's input covariance, then masked fine-tuning): the solver against magnitude
pruning, exact budgets, N:M patterns, zeros that stay zero under AdamW, export, resume, and bad options."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from jactus.core import count_params, find_targets
from jactus.core.obs_prune import (
    global_keep_counts,
    inverse_hessian,
    inverse_hessian_factor,
    obs_prune,
    parse_pattern,
    prune_linears,
    relative_saliency,
)
from jactus.methods import MethodContext, get_method_class
from jactus.methods.taco import MASK, Taco

from .test_baselines import BACKBONES as BASELINE_BACKBONES
from .test_baselines import outputs

torch.set_num_threads(1)


# the tiny backbones of the baseline tests, without the family entry
BACKBONES = {name: (lambda build=build: build()[:4]) for name, build in BASELINE_BACKBONES.items()}


def prepare(backbone: str, **options):
    model, batches, loss_fn, heads = BACKBONES[backbone]()
    original = copy.deepcopy(model)
    method = Taco(**options)
    ctx = MethodContext(model=model, loss_fn=loss_fn, calibration_batches=batches, head_names=heads)
    return method, method.apply(ctx), original, batches, loss_fn


def train(method, model, batches, loss_fn, steps: int, weight_decay: float = 0.1, masks_each_step: bool = True):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=weight_decay)
    for step in range(steps):
        if masks_each_step:
            method.on_train_batch_start(model, step, steps)
        optimizer.zero_grad()
        loss_fn(model, batches[step % len(batches)]).backward()
        optimizer.step()
    model.eval()


# ---- the solver ------------------------------------------------------------------------------------------------
def correlated_layer(rows: int = 16, cols: int = 32, tokens: int = 512):
    """A random weight and the covariance of strongly correlated inputs (8 latent factors plus noise)."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(tokens, 8, generator=generator, dtype=torch.float64)
    inputs = latent @ torch.randn(8, cols, generator=generator, dtype=torch.float64)
    inputs += 0.3 * torch.randn(tokens, cols, generator=generator, dtype=torch.float64)
    return torch.randn(rows, cols, generator=generator), inputs.T @ inputs / tokens


def output_error(weight, pruned, input_cov):
    """trace((W - W') Sx (W - W')^T): the layer's mean squared output error on the calibration inputs."""
    delta = (weight - pruned).double()
    return float(torch.trace(delta @ input_cov @ delta.T))


def magnitude_prune(weight, keep=None, n_m=None):
    if n_m is None:
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[weight.abs().flatten().topk(keep).indices] = True
        return weight * mask.view_as(weight)
    n, m = n_m
    groups = weight.abs().view(weight.shape[0], -1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
    return weight * mask.view_as(weight)


@pytest.mark.parametrize("block_size", [8, 128])
def test_obs_beats_magnitude_at_the_same_density(block_size):
    weight, input_cov = correlated_layer()
    factor = inverse_hessian_factor(inverse_hessian(input_cov, 1e-2))
    keep = weight.numel() * 3 // 10
    pruned, mask = obs_prune(weight, factor, keep=keep, block_size=block_size)
    assert int(mask.sum()) == keep and int(torch.count_nonzero(pruned)) == keep
    assert torch.all(pruned[~mask] == 0)
    assert output_error(weight, pruned, input_cov) < 0.6 * output_error(weight, magnitude_prune(weight, keep),
                                                                         input_cov)


def test_n_m_pattern_holds_exactly_and_blocks_are_lazy_updates_only():
    weight, input_cov = correlated_layer()
    factor = inverse_hessian_factor(inverse_hessian(input_cov, 1e-2))
    pruned, mask = obs_prune(weight, factor, n_m=(2, 4), block_size=32)
    assert torch.all(mask.view(16, -1, 4).sum(dim=2) == 2)
    assert torch.all(pruned[~mask] == 0) and int(torch.count_nonzero(pruned)) == weight.numel() // 2
    assert output_error(weight, pruned, input_cov) < output_error(weight, magnitude_prune(weight, n_m=(2, 4)),
                                                                  input_cov)
    # lazy block updates change the order of the arithmetic, not the result
    small_blocks, small_mask = obs_prune(weight, factor, n_m=(2, 4), block_size=4)
    assert torch.equal(small_mask, mask)
    torch.testing.assert_close(small_blocks, pruned, rtol=1e-4, atol=1e-5)


def test_relative_saliency_ignores_the_scale_of_a_layer():
    weight, input_cov = correlated_layer()
    score = relative_saliency(weight, input_cov, inverse_hessian(input_cov, 1e-2))
    rescaled = relative_saliency(3 * weight, 5 * input_cov, inverse_hessian(5 * input_cov, 1e-2))
    torch.testing.assert_close(rescaled, score)


@pytest.mark.parametrize("rows,cols", [(16, 32), (256, 8)])
def test_relative_saliency_of_white_inputs_is_the_squared_weight_over_its_mean(rows, cols):
    """`Sx = c I`: the score is `(1 + damping) w^2 / mean(w^2)`, whatever the layer's shape or `c`."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    input_cov = 7.0 * torch.eye(cols, dtype=torch.float64)
    score = relative_saliency(weight, input_cov, inverse_hessian(input_cov, 1e-2))
    torch.testing.assert_close(score, 1.01 * weight.pow(2) / weight.pow(2).mean())


def test_global_counts_are_exact_with_ties():
    scores = {"a": torch.tensor([[3.0, 1.0], [1.0, 0.5]]), "b": torch.tensor([1.0, 5.0, 0.1])}
    assert global_keep_counts(scores, 3) == {"a": 2, "b": 1}  # 5, 3, and one of the tied 1.0s
    assert global_keep_counts(scores, 0) == {"a": 0, "b": 0}
    assert sum(global_keep_counts(scores, 7).values()) == 7


class SharedInput(nn.Module):
    """Linears of different output widths reading one input, so every one of them sees the same `Sx`."""

    def __init__(self, in_features: int, widths: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_features, width, bias=False) for width in widths)

    def forward(self, x):
        return sum(layer(x).square().mean() for layer in self.layers)


def test_global_threshold_keeps_the_same_density_in_layers_of_any_size():
    """Same `Sx`, i.i.d. weights: nothing tells the layers apart but their size, so one global threshold must keep
    every layer near the target density. Tolerance 0.05: the smallest layer (64 x 64) varies most, with a standard
    deviation of about 0.018 over seeds (the binomial spread of 4096 scores around one threshold, 0.008, plus that of
    its output energy, which the 8 latent input directions carry, so it averages some 8 * 64 terms rather than 4096),
    and 0.05 is almost three of those; the whole-energy score missed by 0.07 to 0.33 (densities 0.83, 0.69, 0.43)."""
    generator = torch.Generator().manual_seed(0)
    model = SharedInput(64, widths=(64, 256, 1024))
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
    latent = torch.randn(4, 256, 8, generator=generator)
    batches = list(latent @ torch.randn(8, 64, generator=generator) + 0.3 * torch.randn(4, 256, 64,
                                                                                        generator=generator))
    modules = {f"layers.{index}": layer for index, layer in enumerate(model.layers)}
    size = sum(layer.weight.numel() for layer in modules.values())
    masks = prune_linears(model, modules, batches, lambda model, batch: model(batch), keep_total=size // 2,
                          progress=False)
    densities = {name: float(mask.float().mean()) for name, mask in masks.items()}
    assert sum(int(mask.sum()) for mask in masks.values()) == size // 2
    assert all(abs(density - 0.5) < 0.05 for density in densities.values()), densities


# ---- the method: budgets and patterns ------------------------------------------------------------------------
def deployed_count(model, method) -> int:
    weights = [model.get_submodule(name).weight for name in method.shapes]
    return count_params(model) - sum(w.numel() for w in weights) + sum(int(torch.count_nonzero(w)) for w in weights)


@pytest.mark.parametrize("backbone,scope,allocation", [("vit", "model", "uniform"), ("vit", "targets", "global"),
                                                       ("llama", "model", "global"), ("llama", "targets", "uniform")])
def test_deployed_parameters_meet_the_budget_exactly(backbone, scope, allocation):
    model, _, _, _ = BACKBONES[backbone]()
    targets = find_targets(model)
    weights = sum(layer.weight.numel() for layer in targets.values())
    biases = sum(layer.bias.numel() for layer in targets.values() if layer.bias is not None)
    original = count_params(model) if scope == "model" else weights + biases
    method, pruned, _, _, _ = prepare(backbone, budget=0.6, scope=scope, allocation=allocation)
    assert set(method.shapes) == set(targets)
    outside = count_params(pruned) - weights  # unchanged by pruning
    in_scope = deployed_count(pruned, method) - (0 if scope == "model" else outside - biases)
    assert in_scope == math.floor(0.6 * original)  # every allowed parameter is used, none more
    assert sum(method.nnz.values()) == sum(int(getattr(pruned.get_submodule(n), MASK).sum()) for n in method.shapes)
    densities = method.summary()["density_map"].values()
    if allocation == "uniform":
        assert max(densities) - min(densities) < 1e-2
    else:  # the relative saliency keeps every layer alive (a raw threshold emptied the ViT's output projections)
        assert min(densities) > 0.05
    summary = method.summary()
    assert summary["sparse_index_format"] == "csr_int32" and summary["sparse_index_bytes"] > 0
    # what trains: the surviving weights (the pruned ones are held at zero), not the whole weight tensors
    trainable = sum(p.numel() for p in pruned.parameters() if p.requires_grad)
    assert method.params_trainable(pruned) == trainable - (weights - sum(method.nnz.values()))


def test_the_task_hessian_beats_magnitude_pruning_on_the_model_outputs():
    _, pruned, original, batches, _ = prepare("vit", budget=0.5, scope="targets")
    reference = outputs(original, batches)
    magnitude = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in find_targets(magnitude).items():
            keep = int(getattr(pruned.get_submodule(name), MASK).sum())
            layer.weight.copy_(magnitude_prune(layer.weight, keep))
    assert (outputs(pruned, batches) - reference).norm() < (outputs(magnitude, batches) - reference).norm()


def test_two_four_pattern_on_a_llama():
    method, model, _, _, _ = prepare("llama", budget=0.8, scope="model", pattern="2:4", block_size=16)
    for name in method.shapes:
        mask = getattr(model.get_submodule(name), MASK)
        assert torch.all(mask.view(mask.shape[0], -1, 4).sum(dim=2) == 2)
    assert method.summary()["density"] == 0.5 and method.summary()["sparse_index_format"] == "n:m_2bit"


def test_a_budget_that_cannot_be_met_fails_early_with_the_numbers():
    with pytest.raises(ValueError, match=r"budget.ratio=0.05 .* allows \d+ of \d+ parameters"):
        prepare("llama", budget=0.05, scope="model")  # the embeddings alone are more than 5%
    with pytest.raises(ValueError, match=r"method.pattern='2:4' keeps .* above budget.ratio=0.4"):
        prepare("vit", budget=0.4, scope="targets", pattern="2:4")


# ---- fine-tuning, export, resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("masks_each_step", [False, True])
def test_pruned_weights_stay_exactly_zero_under_adamw_with_weight_decay(masks_each_step):
    method, model, _, batches, loss_fn = prepare("vit", budget=0.5, scope="targets")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {f"{name}.weight" for name in method.shapes} <= trainable and "head.weight" in trainable
    assert "norm.weight" in trainable and "patch_embed.proj.weight" not in trainable
    before = {name: model.get_submodule(name).weight.detach().clone() for name in method.shapes}
    train(method, model, batches, loss_fn, steps=4, masks_each_step=masks_each_step)  # the gradient hook alone
    for name in method.shapes:
        layer = model.get_submodule(name)
        mask = getattr(layer, MASK)
        assert torch.all(layer.weight[~mask] == 0), name
    assert any(not torch.equal(before[n], model.get_submodule(n).weight) for n in method.shapes)  # it trained


@pytest.mark.parametrize("backbone", BACKBONES)
def test_export_is_plain_linears_that_reproduce_the_trained_outputs(backbone):
    method, model, _, batches, loss_fn = prepare(backbone, budget=0.7)
    train(method, model, batches, loss_fn, steps=3)
    trained = outputs(model, batches)
    nnz = method.nnz
    deployed = method.export(model)
    assert torch.equal(outputs(deployed, batches), trained)
    for name in method.shapes:
        layer = deployed.get_submodule(name)
        assert type(layer) is nn.Linear and MASK not in dict(layer.named_buffers())
    assert method.params_deployed(deployed) <= math.floor(0.7 * count_params(BACKBONES[backbone]()[0]))
    assert sum(int(torch.count_nonzero(deployed.get_submodule(n).weight)) for n in method.shapes) <= sum(nnz.values())


def test_rebuild_restores_the_masks_from_a_checkpoint():
    method, model, _, batches, loss_fn = prepare("vit", budget=0.5)
    train(method, model, batches, loss_fn, steps=2)
    state, structure = copy.deepcopy(model.state_dict()), method.structure()
    fresh, _, _, _ = BACKBONES["vit"]()
    resumed = Taco(budget=0.5)
    fresh = resumed.rebuild(fresh, structure)
    fresh.load_state_dict(state, strict=True)
    for name in method.shapes:
        assert torch.equal(getattr(fresh.get_submodule(name), MASK), getattr(model.get_submodule(name), MASK))
    assert torch.equal(outputs(fresh, batches), outputs(model, batches))
    assert resumed.summary()["nnz"] == method.summary()["nnz"]
    train(resumed, fresh, batches, loss_fn, steps=2)
    for name in resumed.shapes:
        layer = fresh.get_submodule(name)
        assert torch.all(layer.weight[~getattr(layer, MASK)] == 0)


# ---- options -------------------------------------------------------------------------------------------------
def test_taco_is_registered_and_distils_by_default():
    assert get_method_class("taco") is Taco and Taco.compresses and Taco.default_distill_weight > 0


@pytest.mark.parametrize("options,named", [
    ({"pattern": "4:2"}, "'4:2'"), ({"pattern": "0:4"}, "'0:4'"), ({"pattern": "2-4"}, "'2-4'"),
    ({"pattern": "2:2"}, "'2:2'"), ({"allocation": "magnitude"}, "'magnitude'"), ({"block_size": 0}, "block_size=0"),
    ({"pattern": "2:4", "block_size": 6}, "block_size=6"), ({"pattern": "2:4", "allocation": "global"}, "'global'"),
    ({"budget": 1.5}, "budget.ratio=1.5"), ({"scope": "layers"}, "'layers'"), ({"damping": -1.0}, "damping=-1.0"),
])
def test_bad_options_raise_naming_the_value(options, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        Taco(**options)


def test_parse_pattern():
    assert parse_pattern("unstructured") is None and parse_pattern("2:4") == (2, 4) and parse_pattern("1:8") == (1, 8)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_bounded_statistics_memory_gives_the_same_pruning(allocation):
    """Several calibration passes (calib.max_stats_bytes) prune exactly as one pass: every Hessian is the dense
    model's, the pruned weights are written back only after the last pass."""
    one_pass, model, _, _, _ = prepare("vit", budget=0.6, allocation=allocation)
    largest = (4 * 48) ** 2 * 8  # the fc2 input covariance (4 x 48 inputs) in float64: one group per pass
    passes, bounded, _, _, _ = prepare("vit", budget=0.6, allocation=allocation, calib={"max_stats_bytes": largest})
    assert passes.nnz == one_pass.nnz
    for name in one_pass.shapes:
        torch.testing.assert_close(bounded.get_submodule(name).weight, model.get_submodule(name).weight)
