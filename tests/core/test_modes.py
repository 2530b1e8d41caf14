"""core.modes: a helper's eval mode gives every module its own train/eval flag back."""

from __future__ import annotations

import pytest
from torch import nn

from jactus.core.modes import eval_mode, module_modes, restore_modes


def mixed_model() -> nn.Sequential:
    """A top module in eval mode holding a module in train mode: a pretrained backbone with an adapter injected."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 4))).eval()
    model[1][0].train()
    return model


def test_eval_mode_restores_each_modules_flag():
    model = mixed_model()
    before = [module.training for module in model.modules()]
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == before
    assert model[1][0].training and not model.training  # not the top module's flag everywhere


def test_eval_mode_restores_after_an_error():
    model = mixed_model()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model[1][0].training and not model[0].training


def test_restore_modes_leaves_modules_added_since_alone():
    model = mixed_model()
    modes = module_modes(model)
    model.eval()
    model.append(nn.Dropout(0.2))  # a module added meanwhile keeps its own flag
    restore_modes(modes)
    assert model[1][0].training and model[2].training
