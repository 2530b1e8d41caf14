"""RoSA (LoRA + a sparse adapter whose support is chosen by the weight Fisher after a LoRA warm-up) on a tiny timm ViT
and a tiny Llama: exact non-zeros per layer, LoRA alone during the warm-up, the support from the scored steps, the
sparse values' AdamW state starting at selection, exact merge at export, resume, bf16 backbones, and clear errors for
bad options."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from jactus.core import count_params, upcast_trainable
from jactus.core import sparse as core_sparse
from jactus.core.sparse import dense_matrix, sparse_linear, top_support
from jactus.core.sparse_adapter import SparseAdaptedLinear, density_nnz
from jactus.methods import REGISTRY, MethodContext
from jactus.methods.rosa import RoSA

from .test_baselines import BACKBONES, outputs, train, trainable
from .test_baselines import setup as apply_method


def sparse_layers(model) -> dict[str, SparseAdaptedLinear]:
    return {name.removesuffix(".base_layer"): module for name, module in model.named_modules()
            if isinstance(module, SparseAdaptedLinear)}


def values_of(model) -> dict[str, torch.Tensor]:
    return {name: layer.sparse.values.detach().clone() for name, layer in sparse_layers(model).items()}


def lora_b_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}


# ---- the sparse product ------------------------------------------------------------------------------------------
def test_sparse_linear_gradients_in_row_blocks(monkeypatch):
    """x S^T and its gradients (values gathered from row blocks of g^T x) equal autograd through the dense S."""
    monkeypatch.setattr(core_sparse, "BLOCK_ELEMENTS", 7)  # 1 row per block: every block boundary is crossed
    torch.manual_seed(0)
    index = torch.tensor([3, 0, 19, 7, 12, 8])
    values = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: sparse_linear(x, v, index, 5, 4), (x, values))
    expected = x @ dense_matrix(values, index, 5, 4, torch.float64).T
    torch.testing.assert_close(sparse_linear(x, values, index, 5, 4), expected)
    # bf16 input, fp32 values and compute: the output in the input's dtype, the values' gradient in fp32
    values32 = values.detach().float().requires_grad_()
    y = sparse_linear(x.detach().bfloat16(), values32, index, 5, 4, torch.float32)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and values32.grad.dtype == torch.float32


def test_density_nnz_rule():
    assert density_nnz(0.006, 96, 32) == 18  # floor(18.432)
    assert density_nnz(0.29, 10, 10) == 29  # not 28 from 28.999999999999996
    assert density_nnz(1e-6, 4, 4) == 1  # every adapted layer keeps at least one value


# ---- structure: exact non-zeros per layer, what trains -----------------------------------------------------------
def test_nnz_per_layer_with_a_density_pattern():
    method = RoSA(r=2, density=0.02, density_pattern={"mlp.fc1": 0.1}, warmup_steps=1)
    model, original, *_ = apply_method("vit", method)
    layers = sparse_layers(model)
    assert set(layers) == set(method.adapted_layers) and len(layers) == 8
    for name, layer in layers.items():
        m, n = original.get_submodule(name).weight.shape
        density = 0.1 if name.endswith("mlp.fc1") else 0.02
        assert layer.sparse.nnz == layer.sparse.values.numel() == max(1, int(density * m * n)) == method.nnz[name]
        assert layer.sparse.values.dtype == torch.float32 and not layer.active
    summary = method.summary()
    assert summary["params_sparse"] == sum(method.nnz.values())
    assert summary["sparse_density_max"] == pytest.approx(0.1, rel=0.01)
    assert summary["sparse_density_min"] == pytest.approx(0.02, rel=0.01)
    assert summary["sparse_selected_at_step"] is None


@pytest.mark.parametrize("backbone", ["vit", "llama"])
def test_trainable_params_are_lora_sparse_values_and_head(backbone):
    method = RoSA(r=2, density=0.05, warmup_steps=1)
    model, original, batches, _ = apply_method(backbone, method)
    # At init (LoRA B = 0, S not applied) the model computes the base model.
    torch.testing.assert_close(outputs(model, batches), outputs(original, batches), atol=1e-5, rtol=1e-5)
    names = trainable(model)
    assert all("lora_" in n or n.endswith(".sparse.values") or n.startswith("head.") for n in names)
    head = sum(p.numel() for n, p in original.named_parameters() if n.startswith("head.")) if backbone == "vit" else 0
    assert count_params(model, trainable_only=True) == method.params_adapter + sum(method.nnz.values()) + head


# ---- training: LoRA alone during the warm-up, then the support, then the sparse values train ----------------------
@pytest.mark.parametrize("backbone", ["vit", "llama"])
def test_warmup_trains_lora_alone_then_the_sparse_values(backbone):
    method = RoSA(r=2, lora_alpha=4, lora_dropout=0.0, density=0.05, warmup_steps=3, grad_batches=2)
    model, original, batches, loss_fn = apply_method(backbone, method)
    lora_at_init = lora_b_of(model)
    train(method, model, batches, loss_fn, steps=3)  # steps 0, 1, 2: the warm-up (1 and 2 scored)
    assert method.selected_at_step is None and method.fisher is not None
    assert method.fisher.batches == dict.fromkeys(method.adapted_layers, 2)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in values_of(model).values())  # S untouched
    assert any(not torch.equal(b, lora_at_init[n]) for n, b in lora_b_of(model).items())  # LoRA trained

    method.on_train_batch_start(model, 3, 5)  # the support is chosen here; the scoring hooks go
    assert method.selected_at_step == 3 and method.fisher is None
    layers = sparse_layers(model)
    assert all(layer.active for layer in layers.values())
    assert not any(model.get_submodule(name)._forward_hooks for name in method.adapted_layers)
    for layer in layers.values():
        assert layer.sparse.index.unique().numel() == layer.sparse.nnz  # distinct positions
    assert "sparse.index" in next(k for k in model.state_dict() if k.endswith("sparse.index"))

    model.train()
    model.zero_grad()
    loss_fn(model, batches[0]).backward()
    assert all(layer.sparse.values.grad is not None and layer.sparse.values.grad.abs().sum() > 0
               for layer in layers.values())
    before = values_of(model)
    train(method, model, batches, loss_fn, steps=2)  # steps 0, 1 of a fresh loop: selection is not repeated
    assert method.selected_at_step == 3
    assert all(not torch.equal(v, before[n]) for n, v in values_of(model).items())


def adamw_steps(method, model, optimizer, batches, loss_fn, steps: range, max_steps: int):
    """The plain loop of `train` on a given optimizer, so a test can read its state and carry it over a resume."""
    model.train()
    for step in steps:
        method.on_train_batch_start(model, step, max_steps)
        optimizer.zero_grad()
        loss_fn(model, batches[step % len(batches)]).backward()
        optimizer.step()


def test_sparse_values_take_a_fresh_adamw_first_step_after_selection():
    """Through the warm-up the sparse values get zero gradients and AdamW counts those steps; at selection their state
    starts afresh, so the first update after it is a fresh AdamW's first, lr * g / (|g| + eps), not one scaled by the
    bias correction of a step count that includes the warm-up (about 0.5x here)."""
    warmup, lr, eps = 5, 1e-2, 1e-8
    method = RoSA(r=2, lora_alpha=4, lora_dropout=0.0, density=0.05, warmup_steps=warmup, grad_batches=1)
    model, _, batches, loss_fn = apply_method("llama", method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps)
    values = {name: layer.sparse.values for name, layer in sparse_layers(model).items()}
    adamw_steps(method, model, optimizer, batches, loss_fn, range(warmup), max_steps=10)
    assert all(int(optimizer.state[v]["step"]) == warmup for v in values.values())  # the zero gradients counted

    adamw_steps(method, model, optimizer, batches, loss_fn, range(warmup, warmup + 1), max_steps=10)
    assert method.selected_at_step == warmup
    for name, value in values.items():
        grad = value.grad
        assert grad.abs().sum() > 0, name
        assert int(optimizer.state[value]["step"]) == 1, name
        torch.testing.assert_close(value.detach(), -lr * grad / (grad.abs() + eps))  # from S = 0
    adamw_steps(method, model, optimizer, batches, loss_fn, range(warmup + 1, warmup + 2), max_steps=10)
    assert all(int(optimizer.state[v]["step"]) == 2 for v in values.values())  # reset once, not every step


@pytest.mark.parametrize("resume_at", [3, 7], ids=["during_warmup", "after_selection"])
def test_sparse_values_adamw_state_starts_at_selection_across_a_resume(resume_at):
    """A run resumed from (model, optimizer, structure) state, as a Lightning checkpoint holds it: resumed in the
    warm-up, the state still restarts at selection; resumed after it, the restored state is kept (not restarted)."""
    def make():
        return RoSA(r=2, lora_dropout=0.0, density=0.05, warmup_steps=4, grad_batches=1)

    def adamw(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    method = make()
    model, original, batches, loss_fn = apply_method("vit", method)
    optimizer = adamw(model)
    adamw_steps(method, model, optimizer, batches, loss_fn, range(resume_at), max_steps=9)
    resumed_method = make()
    resumed = resumed_method.rebuild(original, method.structure())
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = adamw(resumed)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    adamw_steps(resumed_method, resumed, resumed_optimizer, batches, loss_fn, range(resume_at, 9), max_steps=9)
    assert resumed_method.selected_at_step == 4
    steps = {int(resumed_optimizer.state[layer.sparse.values]["step"]) for layer in sparse_layers(resumed).values()}
    assert steps == {9 - 4}  # the steps from selection (step 4) on: 4, ..., 8


def test_support_is_the_top_weight_fisher_of_the_scored_step():
    """With one scored step, each support is the top-nnz (dL/dW)^2 of the frozen base weight on that step's batch."""
    method = RoSA(r=2, lora_dropout=0.0, density=0.05, warmup_steps=1, grad_batches=1)
    model, _, batches, loss_fn = apply_method("vit", method)
    reference = copy.deepcopy(model)  # the model as step 0 sees it
    for name in method.adapted_layers:
        reference.get_submodule(name).get_base_layer().weight.requires_grad_(True)
    reference.train()
    loss_fn(reference, batches[0]).backward()

    train(method, model, batches, loss_fn, steps=2)  # step 0 scored, support chosen at step 1
    assert method.selected_at_step == 1
    for name, layer in sparse_layers(model).items():
        fisher = reference.get_submodule(name).get_base_layer().weight.grad.pow(2)
        expected = top_support(fisher, layer.sparse.nnz)
        assert torch.equal(layer.sparse.index, expected)


def test_warmup_zero_chooses_the_support_before_training():
    method = RoSA(r=2, density=0.05, warmup_steps=0, grad_batches=2)
    model, original, batches, loss_fn = apply_method("llama", method)
    assert method.selected_at_step == 0 and all(layer.active for layer in sparse_layers(model).values())
    assert not any(p.grad is not None for p in model.parameters())  # the scoring left no gradients behind
    torch.testing.assert_close(outputs(model, batches), outputs(original, batches), atol=1e-5, rtol=1e-5)
    train(method, model, batches, loss_fn, steps=2)
    assert all(v.abs().sum() > 0 for v in values_of(model).values())


# ---- deployment ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["vit", "llama"])
def test_export_merges_lora_and_sparse_into_plain_linears(backbone):
    method = RoSA(r=2, lora_alpha=4, density=0.05, warmup_steps=1)
    model, original, batches, loss_fn = apply_method(backbone, method)
    train(method, model, batches, loss_fn, steps=4)
    assert method.selected_at_step == 1
    trained = outputs(model, batches)
    assert not torch.allclose(trained, outputs(original, batches), atol=1e-4)
    deployed = method.export(model)
    assert not any(isinstance(m, (BaseTunerLayer, SparseAdaptedLinear)) for m in deployed.modules())
    assert all(type(deployed.get_submodule(name)) is nn.Linear for name in method.adapted_layers)
    assert deployed.state_dict().keys() == original.state_dict().keys()
    assert method.params_deployed(deployed) == count_params(original)
    torch.testing.assert_close(outputs(deployed, batches), trained, atol=1e-5, rtol=1e-5)


def test_bf16_backbone_keeps_trainables_in_fp32():
    """A bf16 Llama (no trainable head) trains without autocast: LoRA and S compute in fp32 and cast back."""
    model, batches, loss_fn, heads, family = BACKBONES["llama"]()
    method = RoSA(r=2, density=0.05, warmup_steps=1)
    ctx = MethodContext(model=model.to(torch.bfloat16), loss_fn=loss_fn, calibration_batches=batches,
                        head_names=heads, family=family)
    model = method.apply(ctx)
    upcast_trainable(model)  # as the Lightning callback does after apply
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(layer.weight.dtype == torch.bfloat16 for layer in sparse_layers(model).values())
    train(method, model, batches, loss_fn, steps=3)
    assert method.selected_at_step == 1
    assert all(v.dtype == torch.float32 and v.abs().sum() > 0 for v in values_of(model).values())
    trained = outputs(model, batches)
    assert trained.dtype == torch.bfloat16
    deployed = method.export(model)
    assert all(p.dtype == torch.bfloat16 for p in deployed.parameters())


# ---- resume ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3], ids=["during_warmup", "after_selection"])
def test_structure_rebuilds_for_resume(steps):
    def make():
        return RoSA(r=2, lora_dropout=0.0, density=0.05, density_pattern={"fc2": 0.1}, warmup_steps=2)

    method = make()
    model, original, batches, loss_fn = apply_method("vit", method)
    train(method, model, batches, loss_fn, steps=steps)
    resumed_method = make()
    resumed = resumed_method.rebuild(original, method.structure())
    resumed.load_state_dict(model.state_dict())
    assert trainable(resumed) == trainable(model) and resumed_method.nnz == method.nnz
    assert resumed_method.selected_at_step == method.selected_at_step
    torch.testing.assert_close(outputs(resumed, batches), outputs(model, batches))
    if steps == 1:  # resumed in the warm-up: the support is still chosen, at step 2
        train(resumed_method, resumed, batches[1:], loss_fn, steps=3)
        assert resumed_method.selected_at_step == 2


# ---- registry, config, option checking ------------------------------------------------------------------------------
def test_registered_and_configured(compose_cfg):
    assert "rosa" in REGISTRY
    method = instantiate(compose_cfg(["method=rosa"]).method, _convert_="all")
    assert isinstance(method, RoSA)
    assert (method.r, method.lora_alpha, method.density, method.warmup_steps, method.grad_batches) == (16, 16, 0.006,
                                                                                                         64, 1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"density": 0.0}, r"method.density=0.0.*\(0, 1\)"),
    ({"density": 1.0}, r"method.density=1.0"),
    ({"density_pattern": {"fc1": 1.5}}, r"density_pattern\['fc1'\]=1.5"),
    ({"warmup_steps": -1}, r"method.warmup_steps=-1.*>= 0"),
    ({"grad_batches": 0}, r"method.grad_batches=0"),
    ({"warmup_steps": 1, "grad_batches": 2}, r"warmup_steps=1.*grad_batches=2"),
    ({"r": 0}, r"method.r=0"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1.0"),
])
def test_bad_options_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoSA(**kwargs)


def test_density_pattern_must_match_an_adapted_layer():
    with pytest.raises(ValueError, match=r"density_pattern: \['nothing_here'\]"):
        apply_method("vit", RoSA(r=2, density_pattern={"nothing_here": 0.1}))
