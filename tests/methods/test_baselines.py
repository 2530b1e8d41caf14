"""The baselines on a tiny timm ViT and a tiny Llama: init equivalence, training, exact merge/export, budgets,
TuneComp's schedule, resume structure, and clear errors for bad options."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import LlamaConfig, LlamaForCausalLM

from jactus.core import LowRankLinear, count_params
from jactus.methods import REGISTRY, MethodContext
from jactus.methods.cersa import CERSA
from jactus.methods.compress_then_adapt import CompressThenAdapt
from jactus.methods.peft_adapters import DoRA, LoRA, PiSSA
from jactus.methods.tunecomp import TuneComp, TwoBranchLinear, teacher_weight


# ---- tiny backbones, data, and a plain training loop -------------------------------------------------------------
def vision_loss(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def lm_loss(model, batch):
    return model(**batch).loss


def tiny_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3, num_classes=5)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4,), generator=generator))
               for _ in range(3)]
    return model, batches, vision_loss, ["head"], "vision"


def tiny_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        input_ids = torch.randint(0, 64, (2, 8), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 6:] = 0
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return model, batches, lm_loss, [], "causal_lm"


BACKBONES = {"vit": tiny_vit, "llama": tiny_llama}


def outputs(model, batches):
    model.eval()
    with torch.no_grad():
        if isinstance(batches[0], tuple):
            return torch.cat([model(images) for images, _ in batches])
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                          for b in batches])


def setup(backbone: str, method):
    model, batches, loss_fn, heads, family = BACKBONES[backbone]()
    original = copy.deepcopy(model)
    ctx = MethodContext(model=model, loss_fn=loss_fn, calibration_batches=batches, head_names=heads, family=family)
    return method.apply(ctx), original, batches, loss_fn


def train(method, model, batches, loss_fn, steps: int, lr: float = 1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        method.on_train_batch_start(model, step, steps)
        optimizer.zero_grad()
        batch = batches[step % len(batches)]
        loss = loss_fn(model, batch) + sum(method.loss_terms(model, batch).values())  # as TaskModule.training_step
        loss.backward()
        optimizer.step()
    model.eval()


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


# ---- LoRA / DoRA / PiSSA ---------------------------------------------------------------------------------------
PEFT_METHODS = {"lora": LoRA, "dora": DoRA, "pissa": PiSSA}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", PEFT_METHODS)
def test_peft_adapter_init_train_merge(name, backbone):
    method = PEFT_METHODS[name](r=4, lora_alpha=8, lora_dropout=0.1)
    model, original, batches, loss_fn = setup(backbone, method)
    # At init the adapted model computes exactly the base model (PiSSA: residual + principal part).
    torch.testing.assert_close(outputs(model, batches), outputs(original, batches), atol=1e-5, rtol=1e-5)
    names = trainable(model)
    assert names and all("lora_" in n or n.startswith("head.") for n in names)
    assert any(n.startswith("head.") for n in names) == (backbone == "vit")
    if name == "dora":
        assert any("lora_magnitude_vector" in n for n in names)

    train(method, model, batches, loss_fn, steps=3)
    trained = outputs(model, batches)
    assert not torch.allclose(trained, outputs(original, batches), atol=1e-4)  # training changed the model
    deployed = method.export(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in deployed.modules())
    assert type(deployed) is type(original) and count_params(deployed) == count_params(original)
    assert deployed.state_dict().keys() == original.state_dict().keys()
    torch.testing.assert_close(outputs(deployed, batches), trained, atol=1e-5, rtol=1e-5)


def test_peft_adapters_target_the_jactus_layers_only():
    method = LoRA(r=2)
    model, *_ = setup("vit", method)
    adapted = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    assert adapted == set(method.adapted_layers)
    assert "patch_embed.proj" not in adapted and "blocks.0.attn.qkv" in adapted and len(adapted) == 8


def test_peft_rank_pattern_passthrough():
    method = LoRA(r=2, rank_pattern={"blocks.0.mlp.fc1": 6})
    model, *_ = setup("vit", method)
    assert model.get_submodule("blocks.0.mlp.fc1").lora_A["default"].weight.shape[0] == 6
    assert model.get_submodule("blocks.1.mlp.fc1").lora_A["default"].weight.shape[0] == 2


# ---- compress then adapt ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backbone", "compressor", "allocator"), [
    ("vit", "svd", "uniform"), ("vit", "asvd", "marginal_gain"), ("llama", "svdllm", "marginal_gain"),
])
def test_compress_then_adapt(backbone, compressor, allocator):
    method = CompressThenAdapt(budget=0.7, compressor=compressor, allocator=allocator, rank_multiple=2, r=2,
                               lora_alpha=4, lora_dropout=0.0)
    model, original, batches, loss_fn = setup(backbone, method)
    names = trainable(model)
    assert names and all("lora_" in n or n.startswith("head.") for n in names)
    assert all(n.endswith((".down", ".up")) for n in method.adapted_layers)
    train(method, model, batches, loss_fn, steps=3)
    trained = outputs(model, batches)
    deployed = method.export(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in deployed.modules())
    assert any(isinstance(m, LowRankLinear) for m in deployed.modules())
    torch.testing.assert_close(outputs(deployed, batches), trained, atol=1e-5, rtol=1e-5)
    assert count_params(deployed) / count_params(original) <= 0.7


# ---- TuneComp ----------------------------------------------------------------------------------------------------
def test_tunecomp_teacher_schedule():
    steps = 30
    weights = [teacher_weight(t, steps) for t in range(steps + 1)]
    assert weights[0] == 1.0 and weights[-1] == 0.0 and teacher_weight(steps + 5, steps) == 0.0
    assert all(a > b for a, b in zip(weights, weights[1:], strict=False))
    assert math.isclose(weights[steps // 3], 1 - math.sin(math.pi / 6))
    with pytest.raises(ValueError, match="max_steps=0"):
        teacher_weight(0, 0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_tunecomp_reaches_the_budget_and_exports_the_student(backbone):
    budget, steps = 0.7, 8
    method = TuneComp(budget=budget, rank_multiple=2, init_rank_factor=1.5, prune_start=0.1, prune_end=0.6,
                      prune_events=3, group_lasso_weight=0.1)
    model, original, batches, loss_fn = setup(backbone, method)
    layers = [m for m in model.modules() if isinstance(m, TwoBranchLinear)]
    assert layers
    # At a = 1 the two-branch model is the teacher, i.e. the original model.
    for layer in layers:
        layer.teacher_weight = 1.0
    torch.testing.assert_close(outputs(model, batches), outputs(original, batches), atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for layer in layers for p in layer.teacher.parameters())
    assert all(p.requires_grad for layer in layers for p in (*layer.down.parameters(), *layer.up.parameters()))
    initial = sum(layer.rank for layer in layers)

    train(method, model, batches, loss_fn, steps=steps)
    assert all(layer.teacher_weight == 0.0 for layer in layers)  # the last step ran the pure student
    assert sum(layer.active_rank for layer in layers) < initial
    assert method.loss_terms(model, batches[0]) == {}  # the lasso weight has decayed to zero
    student = outputs(model, batches)
    deployed = method.export(model)
    assert not any(isinstance(m, TwoBranchLinear) for m in deployed.modules())
    torch.testing.assert_close(outputs(deployed, batches), student, atol=1e-5, rtol=1e-5)
    ratio = count_params(deployed) / count_params(original)
    max_rank_step = max(layer.in_features + layer.out_features for layer in layers)
    assert budget - max_rank_step / count_params(original) <= ratio <= budget


# ---- CERSA -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backbone", "energy", "budget"), [("vit", 0.5, None), ("llama", None, 0.7)])
def test_cersa(backbone, energy, budget):
    method = CERSA(energy=energy, budget=budget, rank_multiple=2)
    model, original, batches, loss_fn = setup(backbone, method)
    names = trainable(model)
    assert any(n.endswith(".C") for n in names) and not any(n.endswith((".U", ".V")) for n in names)
    train(method, model, batches, loss_fn, steps=3)
    trained = outputs(model, batches)
    deployed = method.export(model)
    torch.testing.assert_close(outputs(deployed, batches), trained, atol=1e-5, rtol=1e-5)
    ratio = count_params(deployed) / count_params(original)
    assert ratio < 1.0
    if budget is not None:
        assert ratio <= budget
    else:
        assert math.isclose(method.budget, method.plan.ratio)


# ---- resume: the recorded structure rebuilds a model the checkpoint loads into ------------------------------------
@pytest.mark.parametrize("make", [
    lambda: LoRA(r=2), lambda: PiSSA(r=2),
    lambda: CompressThenAdapt(budget=0.7, rank_multiple=2, r=2),
    lambda: TuneComp(budget=0.7, rank_multiple=2),
    lambda: CERSA(energy=0.5, budget=None, rank_multiple=2),
], ids=["lora", "pissa", "compress_then_adapt", "tunecomp", "cersa"])
def test_structure_rebuilds_for_resume(make):
    method = make()
    model, original, batches, loss_fn = setup("vit", method)
    train(method, model, batches, loss_fn, steps=2)
    structure = method.structure()
    resumed_method = make()
    resumed = resumed_method.rebuild(original, structure)
    resumed.load_state_dict(model.state_dict())
    assert trainable(resumed) == trainable(model)
    for each_method, each_model in ((method, model), (resumed_method, resumed)):  # per-step state (TuneComp's a_t)
        each_method.on_train_batch_start(each_model, 1, 2)
    torch.testing.assert_close(outputs(resumed, batches), outputs(model, batches))


# ---- registry and option checking --------------------------------------------------------------------------------
def test_registered():
    assert {"lora", "dora", "pissa", "compress_then_adapt", "tunecomp", "cersa"} <= set(REGISTRY)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: LoRA(r=0), r"method.r=0"),
    (lambda: DoRA(lora_dropout=1.5), r"lora_dropout=1.5"),
    (lambda: PiSSA(pissa_niter=0), r"pissa_niter=0"),
    (lambda: CompressThenAdapt(compressor="qr"), r"compressor='qr'.*'svd', 'asvd', 'svdllm'"),
    (lambda: CompressThenAdapt(allocator="energy"), r"allocator='energy'.*'marginal_gain', 'uniform'"),
    (lambda: CompressThenAdapt(budget=1.5), r"budget.ratio=1.5"),
    (lambda: CompressThenAdapt(r=-1), r"method.r=-1"),
    (lambda: TuneComp(budget=0.0), r"budget.ratio=0.0"),
    (lambda: TuneComp(init_rank_factor=0.5), r"init_rank_factor=0.5"),
    (lambda: TuneComp(prune_start=0.8, prune_end=0.5), r"prune_start=0.8"),
    (lambda: TuneComp(allocator="greedy"), r"allocator='greedy'"),
    (lambda: CERSA(energy=1.2, budget=None), r"energy=1.2"),
    (lambda: CERSA(energy=0.9, budget=0.8), r"exactly one of"),
    (lambda: CERSA(energy=None, budget=2.0), r"budget.ratio=2.0"),
    (lambda: CERSA(scope="layer"), r"scope='layer'.*'model', 'targets'"),
])
def test_bad_options_fail_early(make, match):
    with pytest.raises(ValueError, match=match):
        make()
