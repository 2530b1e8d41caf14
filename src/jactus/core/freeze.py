"""The one freeze policy: which tensors of a prepared model train (docs/METHOD.md section 3), and in which dtype.

`train_cores` is what `factorize`, `compress_model`, a resumed run and every method that trains cores (jactus, cersa)
use: the cores `C` of every `FactorizedLinear` (and the values of its sparse correction, if any), their biases, the norm layers and the task heads train; everything
else (the factors `U`, `V`, targets kept dense, embeddings, LayerScale gammas) is frozen. The trainable tensors are
kept in fp32 whatever the backbone's dtype (`core.precision`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from .layers import FactorizedLinear
from .precision import upcast_trainable

KEEP_TRAINABLE = ("norm", "bias")
_NORM_CLASS = re.compile(r"norm", re.IGNORECASE)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm (HF LlamaRMSNorm), GroupNorm, ...: any module whose class name says Norm."""
    return bool(_NORM_CLASS.search(type(module).__name__))


def check_keep_trainable(keep_trainable: Sequence[str]) -> tuple[str, ...]:
    unknown = [key for key in keep_trainable if key not in KEEP_TRAINABLE]
    if unknown:
        raise ValueError(f"keep_trainable {unknown}: valid entries are {list(KEEP_TRAINABLE)}")
    return tuple(keep_trainable)


def set_trainable(
    model: nn.Module,
    *,
    head_names: Sequence[str] = (),
    norms: bool = False,
    extra: Callable[[str, nn.Parameter], bool] | None = None,
    upcast: bool = True,
) -> None:
    """Freeze every parameter, then unfreeze the heads, (optionally) the norms, and whatever `extra` selects; with
    `upcast`, the trainable tensors are cast to fp32 (`core.precision.upcast_trainable`)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in head_names:
        try:
            head = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"head module {name!r} not found in {type(model).__name__}") from err
        for param in head.parameters():
            param.requires_grad_(True)
    if norms:
        for module in model.modules():
            if is_norm(module):
                for param in module.parameters(recurse=False):
                    param.requires_grad_(True)
    if extra is not None:
        for name, param in model.named_parameters():
            if extra(name, param):
                param.requires_grad_(True)
    if upcast:
        upcast_trainable(model)


def train_cores(model: nn.Module, head_names: Sequence[str] = (),
                keep_trainable: Sequence[str] = KEEP_TRAINABLE,
                also: Callable[[str, nn.Parameter], bool] | None = None) -> nn.Module:
    """The cores of every `FactorizedLinear` train, with (per `keep_trainable`) their biases ("bias") and the norm
    layers ("norm"), plus the `head_names` modules and the parameters `also` selects (e.g. adapters on the targets a
    plan kept dense); all else is frozen; trainable tensors become fp32."""
    keep = check_keep_trainable(keep_trainable)
    factorized = {name for name, module in model.named_modules() if isinstance(module, FactorizedLinear)}

    def core_or_bias(name: str, param: nn.Parameter) -> bool:
        layer, _, leaf = name.rpartition(".")
        if leaf == "values" and layer.endswith(".sparse") and layer[: -len(".sparse")] in factorized:
            return True  # a sparse correction's values train with the cores (core.sparse)
        if layer in factorized and (leaf == "C" or (leaf == "bias" and "bias" in keep)):
            return True
        return also is not None and also(name, param)

    set_trainable(model, head_names=head_names, norms="norm" in keep, extra=core_or_bias)
    return model
