"""Input-only calibration batches through the compression driver (`compress_model(input_batches=...)`)."""

from __future__ import annotations

import copy

import pytest

from jactus.core import compress_model

from .conftest import lm_loss, make_lm_data

BATCHES = [make_lm_data(rows=4, length=9, seed=s) for s in range(2)]
TEXT = [make_lm_data(rows=4, length=9, seed=s) for s in (20, 21)]


def _compress(model, **kwargs):
    return compress_model(model, BATCHES, lm_loss, 0.6, rank_multiple=2, rho=0.0, progress=False, **kwargs)


def test_input_batches_are_part_of_the_cached_calibration(tiny_llama, tmp_path):
    cache = str(tmp_path / "cache")
    plain, _ = _compress(copy.deepcopy(tiny_llama), stats_cache=cache)
    mixed, _ = _compress(copy.deepcopy(tiny_llama), stats_cache=cache, input_batches=TEXT)
    again, _ = _compress(copy.deepcopy(tiny_llama), stats_cache=cache, input_batches=TEXT)
    assert plain.jactus_compress_stats["stats_cache"]["misses"] == 1
    assert mixed.jactus_compress_stats["stats_cache"]["misses"] == 1  # another key: not the plain statistics
    assert again.jactus_compress_stats["stats_cache"]["hits"] == 1


def test_input_batches_refusals(tiny_llama):
    with pytest.raises(ValueError, match="do not combine with compensation=0.0"):
        _compress(tiny_llama, input_batches=TEXT, compensation=0.0)
    with pytest.raises(ValueError, match="pass a list or DataLoader"):
        _compress(tiny_llama, input_batches=iter(TEXT))
