"""Train/eval mode that a helper changes for a while and gives back exactly as it found it.

`model.train(was_training)` after `model.eval()` sets every submodule to the top module's flag. A pretrained HF
backbone comes from `from_pretrained` in eval mode at the top while the adapters injected into it (PEFT's LoRA
dropout) are new modules in train mode; restoring with the top flag turned their dropout off for the rest of the
run (compress-then-adapt after the evaluation before training did). `module_modes` records each module's own flag
and `restore_modes` puts those back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

Modes = list[tuple[nn.Module, bool]]


def module_modes(model: nn.Module) -> Modes:
    """Each module of `model` with its train/eval flag."""
    return [(module, module.training) for module in model.modules()]


def restore_modes(modes: Modes) -> None:
    """Every recorded module's flag as it was (a module added since keeps the flag it was given)."""
    for module, training in modes:
        module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block, every module's own flag back afterwards (also when the block raises)."""
    modes = module_modes(model)
    model.eval()
    try:
        yield model
    finally:
        restore_modes(modes)
