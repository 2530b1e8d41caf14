"""Mixed precision (docs/METHOD.md section 8): frozen tensors in the backbone's dtype, trainable tensors in fp32.

A bf16 AdamW step of 3e-4 on a value near 1 rounds to nothing (bf16 spacing at 1.0 is 7.8e-3), so every method --
JACTUS's cores, biases and norms, PEFT's adapters, TuneComp's student, a new task head -- keeps what it trains in
fp32 while the frozen weights and factors stay in bf16, as PEFT does for LoRA on a bf16 base
(`autocast_adapter_dtype`). Mixed dtypes in one forward are resolved by autocast (`trainer.precision=bf16-mixed`):
linear layers run in bf16 and their gradients reach the fp32 parameters through autocast's differentiable casts.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)


def autocast_for(model: nn.Module, device: torch.device | str):
    """The autocast context a half-precision `model` (fp32 trainables on half weights) runs under outside a trainer,
    as `bf16-mixed` runs it; no autocast for an fp32 model."""
    dtype = model_dtype(model)
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype) if dtype in HALF_DTYPES else contextlib.nullcontext()
# Lightning precision flags that keep fp32 parameters (autocast or plain fp32); the "-true" half flags convert the
# whole module, trainable tensors included, to half precision, which docs/METHOD.md section 8 rules out.
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed", "bf16", "16")
FULL_PRECISIONS = ("32-true", "32", "64-true", "64")


def trainable_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a trainable tensor of a `dtype` backbone is kept in: fp32 for half (and fp32) backbones."""
    return torch.promote_types(dtype, torch.float32)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's floating-point parameters are stored in (the backbone's dtype)."""
    counts: Counter = Counter()
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] += param.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


@torch.no_grad()
def upcast_trainable(model: nn.Module) -> list[str]:
    """Cast every trainable floating-point parameter below fp32 to fp32 in place (the Parameter object is kept, so
    references to it stay valid); frozen tensors keep their dtype. Returns the names of the parameters cast."""
    cast = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != trainable_dtype(param.dtype):
            param.data = param.data.to(trainable_dtype(param.dtype))
            cast.append(name)
    return cast


def check_precision(precision: str | int | None, backbone_dtype: torch.dtype) -> str:
    """The Lightning precision flag must keep trainable tensors in fp32, and a half-precision backbone needs autocast
    (a `-mixed` flag) to mix its bf16 weights with fp32 trainables in one forward."""
    value = "32-true" if precision is None else str(precision)
    if value not in MIXED_PRECISIONS + FULL_PRECISIONS:
        raise ValueError(f"trainer.precision={value!r}: every method trains its tensors in fp32 "
                         f"(docs/METHOD.md section 8); "
                         f"expected one of {list(MIXED_PRECISIONS + FULL_PRECISIONS)} ('-true' half precisions would "
                         f"cast the trainable tensors to half precision too)")
    if backbone_dtype in HALF_DTYPES and value not in MIXED_PRECISIONS:
        flag = "bf16-mixed" if backbone_dtype == torch.bfloat16 else "16-mixed"
        raise ValueError(f"trainer.precision={value!r} with a {str(backbone_dtype).replace('torch.', '')} backbone: "
                         f"the frozen weights are half precision and the trainable tensors fp32, which only autocast "
                         f"mixes; set trainer.precision={flag} (or load the backbone in float32)")
    return value
