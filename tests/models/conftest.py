"""Backbone fixtures: the tiny models are cheap; the real assets load once per session."""

from __future__ import annotations

import pytest

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


@pytest.fixture(scope="session")
def jactus_cache(tmp_path_factory):
    """A fresh $JACTUS_CACHE for the session, so the DINOv2 conversion runs (and is cached) inside the tests."""
    path = tmp_path_factory.mktemp("jactus_cache")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("JACTUS_CACHE", str(path))
    yield path
    patcher.undo()


@pytest.fixture(scope="session")
def smollm2():
    from jactus.models import create_causal_lm

    return create_causal_lm(embedded="smollm2_135m")
