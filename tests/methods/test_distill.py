"""Distillation from the dense model (docs/METHOD.md section 9): the cache is the dense model's output on the training
examples, weight 0 is exactly the plain loss and weight w adds exactly w * T^2 * KL_T, the KL is zero at student =
teacher with finite gradients otherwise, TuneComp's own teacher is the dense model, a resume refuses a cache built with
other settings, and bad options fail early."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from jactus.callbacks.compression import CHECKPOINT_KEY, DISTILL_CHECKPOINT_KEY, CompressionCallback
from jactus.data import QADataModule, VisionDataModule
from jactus.distill import Distillation, DistillSettings, build_cache, kl_from_cache
from jactus.lit.qa import CausalLMQA
from jactus.lit.vision import ImageClassifier
from jactus.methods import MethodContext
from jactus.methods.jactus import Jactus
from jactus.methods.peft_adapters import LoRA
from jactus.methods.tunecomp import TuneComp
from jactus.models import byte_level_tokenizer, create_causal_lm

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def vision_run():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=5)
    data = VisionDataModule("synthetic_vision", num_classes=5, img_size=16, batch_size=4, eval_batch_size=6,
                            train_size=20, test_size=8, calib_num_samples=8, seed=0)
    data.setup("fit")
    return ImageClassifier(model, head_names=["head"]), data


def qa_run():
    tokenizer = byte_level_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = create_causal_lm(config={**TINY_LLAMA, "vocab_size": len(tokenizer)}).model
    data = QADataModule("synthetic_qa", tokenizer, source="synthetic", train_per_task=12, val_per_task=0,
                        test_per_task=4, batch_size=4, eval_batch_size=5, max_length=96, calib_num_samples=4)
    data.setup()
    return CausalLMQA(model, task_names=data.task_names), data


RUNS = {"vision": vision_run, "qa": qa_run}


def cache_for(module, data, temperature=1.0, topk=8):
    family = "vision" if isinstance(module, ImageClassifier) else "causal_lm"
    return build_cache(module.model, data.distillation_dataloader(), module.loss_and_logits, family=family,
                       topk=topk, temperature=temperature, progress=False)


@torch.no_grad()
def dense_logits(module, batch):
    module.model.eval()
    return module.loss_and_logits(module.model, batch)[1].float()


def test_vision_cache_holds_the_dense_logits_of_each_training_example():
    module, data = vision_run()
    cache = cache_for(module, data)
    assert len(cache) == 20 and cache.kind == "logits"
    for batch in data.train_dataloader():  # shuffled: the cache is found by example index, not by position
        (cached,) = cache.gather(batch[2], torch.device("cpu"))
        torch.testing.assert_close(cached, dense_logits(module, batch))


def test_lm_cache_holds_the_dense_top_k_and_the_remaining_mass():
    module, data = qa_run()
    temperature, topk = 2.0, 8
    cache = cache_for(module, data, temperature, topk)
    assert len(cache) == 12 and cache.kind == "topk" and cache.temperature == temperature
    for batch in data.train_dataloader():
        values, tokens, rest = cache.gather(batch["example_idx"], torch.device("cpu"))
        logp = F.log_softmax(dense_logits(module, batch) / temperature, dim=-1)
        assert values.shape == (logp.shape[0], topk)
        torch.testing.assert_close(values, logp.topk(topk, dim=-1).values)
        torch.testing.assert_close(logp.gather(-1, tokens.long()), values)
        torch.testing.assert_close(rest.exp(), 1 - values.exp().sum(-1), atol=1e-5, rtol=1e-4)


def _training_step(module, batch):
    module.log = lambda *args, **kwargs: None  # no trainer here: training_step's logging is not under test
    return module.training_step(batch, 0)


def reference_kl(student_logits, targets, kind, temperature):
    """Mean over rows of KL(teacher_T || student_T), written out in fp64 apart from `jactus.distill`: over the classes
    for a classifier's cached logits; for an LM's cache over the teacher's k tokens plus one outcome for every other
    token, whose probabilities are exp(rest) for the teacher and 1 - (the student's mass on the k tokens)."""
    scaled = student_logits.double() / temperature
    student = scaled - scaled.logsumexp(-1, keepdim=True)
    if kind == "logits":
        teacher_scaled = targets[0].double() / temperature
        teacher = teacher_scaled - teacher_scaled.logsumexp(-1, keepdim=True)
        return (teacher.exp() * (teacher - student)).sum(-1).mean()
    values, tokens, rest = targets[0].double(), targets[1].long(), targets[2].double()
    torch.testing.assert_close(values.exp().sum(-1) + rest.exp(), torch.ones_like(rest))  # k + 1 outcomes
    picked = student.gather(-1, tokens)
    student_rest = torch.log1p(-picked.exp().sum(-1))
    per_row = (values.exp() * (values - picked)).sum(-1) + rest.exp() * (rest - student_rest)
    return per_row.mean()


@pytest.mark.parametrize("run", RUNS)
def test_weight_zero_is_exactly_the_plain_loss_and_a_positive_weight_adds_w_t2_kl(run):
    """distilled - plain = w * T^2 * KL_T, with KL_T from the cached targets and the student's logits (`reference_kl`),
    at T = 2 so that a missing T^2, an untempered side or a lost remainder term would all show."""
    module, data = RUNS[run]()
    weight, temperature = 0.5, 2.0
    cache = cache_for(module, data, temperature)  # an LM's cache holds the teacher at the run's temperature
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():  # the student moves away from the teacher so the KL is not zero
        for param in module.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    module.model.eval()  # no dropout: the same loss twice
    plain = _training_step(module, batch)
    module.distillation = Distillation(0.0, temperature=temperature, cache=cache)
    assert torch.equal(_training_step(module, batch), plain)
    module.distillation = Distillation(weight, temperature=temperature, cache=cache)
    distilled = _training_step(module, batch)
    targets = cache.gather(batch[2] if run == "vision" else batch["example_idx"], torch.device("cpu"))
    expected = weight * temperature ** 2 * reference_kl(dense_logits(module, batch), targets, cache.kind, temperature)
    assert expected > 1e-4  # a hundred times the tolerance below: not a check of 0 against 0
    torch.testing.assert_close((distilled - plain).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_is_zero_at_the_teacher_and_its_gradient_finite_elsewhere(run, temperature):
    module, data = RUNS[run]()
    cache = cache_for(module, data, temperature)
    distillation = Distillation(1.0, temperature=temperature, cache=cache)
    batch = next(iter(data.train_dataloader()))
    module.model.eval()
    at_teacher = distillation.term(module.model, batch, module.loss_and_logits(module.model, batch)[1])
    assert abs(float(at_teacher.detach())) < 1e-5
    with torch.no_grad():
        for param in module.model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    term = distillation.term(module.model, batch, module.loss_and_logits(module.model, batch)[1])
    term.backward()
    grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert term > 1e-4 and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_kl_gradient_stays_finite_when_the_top_k_holds_all_the_mass():
    """A confident teacher: the top-k mass rounds to 1, its remainder is floored, not log(0)."""
    teacher = torch.full((3, 40), -60.0)
    teacher[:, 0] = 40.0
    logp = F.log_softmax(teacher, dim=-1)
    values, tokens = logp.topk(4, dim=-1)
    from jactus.distill import _log1mexp

    rest = _log1mexp(torch.logsumexp(values, dim=-1))
    student = torch.randn(3, 40, requires_grad=True)
    kl = kl_from_cache(student, (values, tokens, rest), "topk", 1.0)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(student.grad).all()


def test_tunecomp_teacher_is_the_dense_model():
    module, data = qa_run()
    dense = copy.deepcopy(module.model)
    batches = list(data.calibration_dataloader())
    method = TuneComp(budget=0.6, rank_multiple=2)
    ctx = MethodContext(model=module.model, loss_fn=module.calibration_loss, calibration_batches=batches,
                        family="causal_lm")
    module.model = method.apply(ctx)
    method.on_train_batch_start(module.model, 3, 10)  # mid-schedule: the student branches are in use
    batch = next(iter(data.train_dataloader()))
    module.model.eval()
    with torch.no_grad():
        student = module.loss_and_logits(module.model, batch)[1]
        with method.distill_teacher(module.model):
            teacher = module.loss_and_logits(module.model, batch)[1]
        reference = module.loss_and_logits(dense.eval(), batch)[1]
    torch.testing.assert_close(teacher, reference)
    assert not torch.allclose(student, reference)
    assert all(layer.teacher_weight < 1 for layer in module.model.modules() if hasattr(layer, "teacher_weight"))


@pytest.mark.parametrize(("run", "temperature", "topk", "match"), [
    ("qa", 1.0, 8, None),
    ("qa", 2.0, 8, r"distill.temperature: 1.0 in the cache, 2.0 in this run"),
    ("qa", 1.0, 16, r"distill.topk: 8 in the cache, 16 in this run"),
    ("vision", 2.0, 16, None),  # a classifier's logits are tempered at loss time: any T is exact
])
def test_resume_refuses_a_teacher_cache_built_with_other_settings(run, temperature, topk, match, tmp_path):
    """A resumed run distils toward the checkpoint's cache: an LM's holds softmax(z / T) cut to its top k, so a
    resume with another temperature or top-k fails, naming both values, instead of comparing a T1 teacher with a T2
    student."""
    module, data = RUNS[run]()
    cache = cache_for(module, data, temperature=1.0, topk=8)
    path = tmp_path / "last.ckpt"
    torch.save({CHECKPOINT_KEY: {"name": "jactus", "structure": None},
                DISTILL_CHECKPOINT_KEY: cache.state_dict()}, path)
    callback = CompressionCallback(Jactus(), distill=DistillSettings(weight=0.5, temperature=temperature, topk=topk))
    if match is None:
        callback._rebuild_from_checkpoint(str(path), module)
        assert callback.teacher_cache.entries.keys() == cache.entries.keys()
        return
    with pytest.raises(ValueError, match=match + r".*resume with the original values, or start a new run"):
        callback._rebuild_from_checkpoint(str(path), module)
    assert callback.teacher_cache is None
    with pytest.raises(ValueError, match=r"distill.temperature: 1.0 in the cache, 3.0 in this run"):
        Distillation(0.5, temperature=3.0, cache=cache)


def test_bad_distillation_options_fail_early():
    with pytest.raises(ValueError, match=r"distill.weight=0.5.*method 'lora'"):
        DistillSettings(weight=0.5).resolved_weight(LoRA())
    assert DistillSettings().resolved_weight(LoRA()) == 0.0  # null: the method's default
    assert DistillSettings(weight=0.5).resolved_weight(Jactus()) == 0.5
    for kwargs, match in (({"weight": -1}, r"distill.weight=-1"), ({"temperature": 0}, r"distill.temperature=0"),
                          ({"topk": 0}, r"distill.topk=0")):
        with pytest.raises(ValueError, match=match):
            DistillSettings(**kwargs)
