"""The one small interface every method (JACTUS and each baseline) implements.

A method changes a backbone before training (factorize, add adapters, add a teacher branch), may steer training
(schedules, penalties), and says what its deployable model is. The Lightning shell (`jactus.callbacks`) calls these
hooks; the methods themselves are plain PyTorch and never import Lightning or Hydra.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class MethodContext:
    """What a method may use while it prepares the backbone."""

    model: nn.Module
    loss_fn: LossFn
    calibration_batches: Iterable | None
    head_names: Sequence[str] = ()
    family: str = "vision"  # "vision" | "causal_lm"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Method:
    """Base class. Subclasses set `name`, and `compresses = True` when the deployed model is smaller."""

    name: ClassVar[str] = "base"
    compresses: ClassVar[bool] = False

    def apply(self, ctx: MethodContext) -> nn.Module:
        """Prepare `ctx.model` for training; return the module to train (usually the same object)."""
        raise NotImplementedError

    def on_train_batch_start(self, model: nn.Module, step: int, max_steps: int) -> None:
        """Per-step schedules (TuneComp's teacher decay, pruning)."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term the trainer back-propagates after the task loss (None: none)."""
        return None

    def export(self, model: nn.Module) -> nn.Module:
        """The deployable model: adapters merged, factors folded, teacher branches dropped."""
        return model

    def structure(self) -> dict | None:
        """What a checkpoint needs to rebuild this method's module structure without recalibrating."""
        return None

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        """Rebuild the structure recorded by `structure()` (resume from a checkpoint); no calibration."""
        raise NotImplementedError(f"method {self.name!r} cannot rebuild a checkpointed structure")

    @property
    def budget(self) -> float | None:
        """The retained-parameter budget this method compresses to (None for full-size methods)."""
        return None

    def summary(self) -> dict:
        """Method-specific figures for summary.json (rank statistics, compression time, memory)."""
        return {}


REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: `@register("lora")` makes the method known by that name."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def get_method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(REGISTRY)}")
    return REGISTRY[name]


_NORM_CLASS = re.compile(r"norm", re.IGNORECASE)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm (HF LlamaRMSNorm), GroupNorm, ...: any module whose class name says Norm."""
    return bool(_NORM_CLASS.search(type(module).__name__))


def set_trainable(
    model: nn.Module,
    *,
    head_names: Sequence[str] = (),
    norms: bool = False,
    extra: Callable[[str, nn.Parameter], bool] | None = None,
) -> None:
    """Freeze every parameter, then unfreeze the heads, (optionally) the norms, and whatever `extra` selects."""
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


def choice(value, valid: Sequence[str], key: str):
    if value not in valid:
        raise ValueError(f"{key}={value!r}: expected one of {list(valid)}")
    return value


def check_positive(value, key: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}={value!r}: expected a positive integer{' or null' if allow_none else ''}")
    return value


def train_cores(model: nn.Module, head_names: Sequence[str]) -> None:
    """What `core.factorize(freeze=True)` trains: the cores and biases of factorized layers, norms, task heads."""
    from ..core import FactorizedLinear

    factorized = {name for name, module in model.named_modules() if isinstance(module, FactorizedLinear)}

    def is_core_or_bias(name: str, _) -> bool:
        layer, _, leaf = name.rpartition(".")
        return layer in factorized and leaf in ("C", "bias")

    set_trainable(model, head_names=head_names, norms=True, extra=is_core_or_bias)


def check_budget(budget: float, method: str) -> float:
    """A retained-parameter budget must be a ratio in (0, 1]."""
    if not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"budget.ratio={budget!r} for method {method!r}: expected a ratio in (0, 1], e.g. 0.8")
    return float(budget)
