"""Mixed precision (docs/METHOD.md section 8): frozen tensors stay bf16, trainable ones train in fp32, and the updates
then match an fp32 run where bf16 trainables would lose them."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import inject_adapter_in_model

from jactus.core import FactorizedLinear, check_precision, compress_model, model_dtype, train_cores, upcast_trainable
from jactus.core.factorize import fold_factorized
from jactus.methods.peft_adapters import is_adapter_parameter, lora_config

STEPS, LR = 3, 1e-4


def train_steps(model, batches, loss) -> None:
    """AdamW on whatever trains, under CPU bf16 autocast: what Lightning's `bf16-mixed` runs."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    model.train()
    for step in range(STEPS):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(model, batches[step % len(batches)])
        value.backward()
        optimizer.step()


def snapshot(model, select) -> dict:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if select(n)}


def relative_error(got: dict, want: dict) -> float:
    num = sum(float((got[n] - want[n]).norm() ** 2) for n in want)
    den = sum(float(want[n].norm() ** 2) for n in want)
    return (num / den) ** 0.5


def three_precisions(model, batches, loss, select):
    """The change of the `select`ed trainables after the same steps: fp32 model, bf16 model with fp32 trainables
    (the policy: the trainables never pass through bf16), bf16 model with bf16 trainables (what it prevents)."""
    runs = {}
    for kind in ("fp32", "mixed", "bf16"):
        copy_ = copy.deepcopy(model)
        if kind == "mixed":  # as the pipeline builds it: frozen tensors bf16, trainables fp32 from the start
            copy_.to(torch.bfloat16)
            for param, original in zip(copy_.parameters(), model.parameters(), strict=True):
                if param.requires_grad:
                    param.data = original.data.clone()
            assert not upcast_trainable(copy_)  # nothing left to cast
            trainable = [p for p in copy_.parameters() if p.requires_grad]
            frozen = [p for p in copy_.parameters() if not p.requires_grad]
            assert trainable and all(p.dtype == torch.float32 for p in trainable)
            assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
        elif kind == "bf16":
            copy_.to(torch.bfloat16)
        before = snapshot(copy_, select)
        train_steps(copy_, batches, loss)
        runs[kind] = {n: value - before[n] for n, value in snapshot(copy_, select).items()}
    return runs


@pytest.mark.parametrize("method", ["jactus", "lora"])
def test_fp32_trainables_under_bf16_match_the_fp32_run(method, tiny_llama, lm_data, losses):
    make, split = lm_data
    batches = split(make(rows=4), [2, 2])
    if method == "jactus":
        model, _ = compress_model(tiny_llama, batches, losses["lm"], 0.7, rank_multiple=2, progress=False)
        model = train_cores(model)  # cores, biases, norms

        def select(name):
            return name.endswith(".C")
    else:
        targets = [n for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear) and "proj" in n]
        model = inject_adapter_in_model(lora_config(targets, r=4, lora_alpha=8, lora_dropout=0.0), tiny_llama)
        for name, param in model.named_parameters():
            param.requires_grad_(is_adapter_parameter(name))
        torch.manual_seed(0)
        for name, param in model.named_parameters():  # non-zero B, so that A's gradient is not zero either
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)

        def select(name):
            return is_adapter_parameter(name)
    runs = three_precisions(model, batches, losses["lm"], select)
    assert sum(float(d.abs().sum()) for d in runs["fp32"].values()) > 0
    mixed, bf16 = relative_error(runs["mixed"], runs["fp32"]), relative_error(runs["bf16"], runs["fp32"])
    # fp32 trainables follow the fp32 run up to the bf16 forward's noise; bf16 trainables lose most of each update
    # (steps of ~1e-4 on values whose bf16 spacing is ~1e-3 .. 1e-2 round away or jump a whole spacing).
    print(f"{method}: relative error of the updates against fp32: fp32 trainables {mixed:.3f}, bf16 {bf16:.3f}")
    assert mixed < 0.15, mixed
    assert bf16 > 0.4, bf16


def test_upcast_and_fold_keep_frozen_dtype(tiny_llama, lm_data, losses):
    make, split = lm_data
    model, _ = compress_model(tiny_llama.to(torch.bfloat16), split(make(rows=4), [2, 2]), losses["lm"], 0.7,
                              rank_multiple=2, progress=False)
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert layers and all(m.C.dtype == torch.float32 and m.U.dtype == m.V.dtype == torch.bfloat16 for m in layers)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in norms)  # train_cores upcasts what trains
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model_dtype(model) == torch.bfloat16
    with torch.no_grad():  # no autocast: the layers keep one dtype per product themselves
        x = torch.randn(3, layers[0].in_features, dtype=torch.bfloat16)
        assert layers[0](x).dtype == torch.bfloat16
    folded = fold_factorized(model)
    assert all(p.dtype == torch.bfloat16 for n, p in folded.named_parameters() if ".up." in n or ".down." in n)


@pytest.mark.parametrize(("precision", "dtype", "match"), [
    ("bf16-true", torch.float32, r"trainer.precision='bf16-true'.*expected one of"),
    ("32-true", torch.bfloat16, r"trainer.precision='32-true' with a bfloat16 backbone.*bf16-mixed"),
    ("16-true", torch.float16, r"'16-true'"),
])
def test_precision_flags_that_break_fp32_trainables_fail(precision, dtype, match):
    with pytest.raises(ValueError, match=match):
        check_precision(precision, dtype)
    assert check_precision("bf16-mixed", torch.bfloat16) == "bf16-mixed"
    assert check_precision("32-true", torch.float32) == "32-true"
