"""calib.stats_cache: a sweep that changes only what comes after calibration measures the statistics once, gets the
same compressed model as without the cache, and any change the statistics depend on is a miss."""

import pytest
import torch

from jactus import compress_model
from jactus.core import FactorizedLinear


def factors(model):
    return {name: (m.U, m.C, m.V) for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def counted(loss):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return loss(model, batch)
    loss_fn.__qualname__ = "counted_loss"  # one name for every instance: the key must not depend on the closure
    return loss_fn, calls


def test_a_sweep_calibrates_once_and_equals_no_cache(tmp_path, vit_factory, vision_batches, losses):
    cache = tmp_path / "stats"
    loss, calls = counted(losses["vision"])
    reference, ref_plan = compress_model(vit_factory(), vision_batches, loss, 0.7, rank_multiple=2, rho=0.25,
                                         progress=False)
    plain_calls = len(calls)
    calls.clear()
    first, first_plan = compress_model(vit_factory(), vision_batches, loss, 0.7, rank_multiple=2, rho=0.25,
                                       stats_cache=str(cache), progress=False)
    assert len(calls) == plain_calls  # a miss calibrates as usual
    assert first.jactus_compress_stats["stats_cache"] == {"dir": str(cache), "hits": 0, "misses": 1, "evicted": []}
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.partial"))

    calls.clear()
    again, again_plan = compress_model(vit_factory(), vision_batches, loss, 0.7, rank_multiple=2, rho=0.25,
                                       stats_cache=str(cache), progress=False)
    assert len(calls) == 1  # only the forward that finds the shared-input groups
    assert again.jactus_compress_stats["stats_cache"]["hits"] == 1
    assert again_plan == first_plan == ref_plan
    for name, tensors in factors(reference).items():
        for got, want in zip(factors(again)[name], tensors, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    # another rho and another budget reuse the statistics; the result equals an uncached run with those settings
    other, _ = compress_model(vit_factory(), vision_batches, loss, 0.6, rank_multiple=2, rho=0.0,
                              stats_cache=str(cache), progress=False)
    assert other.jactus_compress_stats["stats_cache"]["hits"] == 1
    direct, _ = compress_model(vit_factory(), vision_batches, loss, 0.6, rank_multiple=2, rho=0.0, progress=False)
    for name, tensors in factors(direct).items():
        for got, want in zip(factors(other)[name], tensors, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_what_the_statistics_depend_on_is_part_of_the_key(tmp_path, vit_factory, vision_batches, losses):
    cache = str(tmp_path / "stats")
    loss = losses["vision"]

    def misses(model, batches, **kwargs):
        model, _ = compress_model(model, batches, loss, 0.7, rank_multiple=2, stats_cache=cache, progress=False,
                                  **kwargs)
        return model.jactus_compress_stats["stats_cache"]["misses"]

    assert misses(vit_factory(), vision_batches) == 1
    assert misses(vit_factory(), vision_batches) == 0
    changed = vit_factory()
    with torch.no_grad():
        changed.head.weight[0, 0] += 1e-3  # a head warmed up differently
    assert misses(changed, vision_batches) == 1
    assert misses(vit_factory(), vision_batches[:-1]) == 1  # fewer calibration batches
    assert misses(vit_factory(), vision_batches, stats_dtype=torch.float32) == 1
    assert misses(vit_factory(), vision_batches, max_stats_bytes=160_000) == 6  # other passes, one key each
    assert misses(vit_factory(), vision_batches, max_stats_bytes=160_000) == 0


def test_multi_pass_phase_two_reads_the_cache(tmp_path, tiny_llama, lm_data, losses):
    make, split = lm_data
    batches = split(make(rows=4), [2, 2])
    loss, calls = counted(losses["lm"])
    model, _ = compress_model(tiny_llama, batches, loss, 0.7, rank_multiple=2, max_stats_bytes=80_000,
                              stats_cache=str(tmp_path), progress=False)
    # 5 passes: group discovery + 5 calibrations in phase 1; phase 2's 4 recalibrations come from the cache
    assert len(calls) == 1 + 5 * len(batches)
    assert model.jactus_compress_stats["stats_cache"] == {"dir": str(tmp_path), "hits": 4, "misses": 5,
                                                          "evicted": []}


def test_a_bounded_cache_evicts_the_least_recently_used(tmp_path, vit_factory, vision_batches, losses):
    """Three calibrations of one size S under a bound of 2.5 S: the third write removes the file used least recently
    (the second: the first was read again in between); a bound below S stores nothing and still compresses."""
    cache = tmp_path / "stats"

    def run(batches, bound):
        model, _ = compress_model(vit_factory(), batches, losses["vision"], 0.7, rank_multiple=2, progress=False,
                                  stats_cache=str(cache), stats_cache_max_bytes=bound)
        return model.jactus_compress_stats["stats_cache"]

    first = run(vision_batches, None)
    (first_file,) = cache.glob("*.pt")
    size = first_file.stat().st_size
    bound = f"{2.5 * size:.0f}B"
    second = run(vision_batches[:-1], bound)
    second_file = next(path for path in cache.glob("*.pt") if path != first_file)
    assert first["misses"] == second["misses"] == 1 and second["evicted"] == []
    assert run(vision_batches, bound)["hits"] == 1  # the first is now the more recently used
    third = run(vision_batches[1:], bound)
    assert third["misses"] == 1 and third["evicted"] == [second_file.name]
    assert first_file.is_file() and not second_file.exists() and len(list(cache.glob("*.pt"))) == 2
    assert run(vision_batches[:-1], bound)["misses"] == 1  # evicted: calibrates again

    before = sorted(path.name for path in cache.glob("*.pt"))
    too_small = run(vision_batches[::-1], size // 2)  # batch order is part of the key
    assert too_small["misses"] == 1 and too_small["evicted"] == []
    assert sorted(path.name for path in cache.glob("*.pt")) == before and not list(cache.glob("*.partial"))


def test_bad_cache_settings_fail_early(tmp_path):
    from jactus.methods.base import CalibSettings

    with pytest.raises(ValueError, match=r"calib.stats_cache=''"):
        CalibSettings(stats_cache="")
    with pytest.raises(ValueError, match=r"calib.stats_cache_max_bytes='lots': expected null, a positive number"):
        CalibSettings(stats_cache="x", stats_cache_max_bytes="lots")
    with pytest.raises(ValueError, match=r"stats_cache_max_bytes=0: expected"):
        compress_model(None, None, None, 0.7, stats_cache=str(tmp_path), stats_cache_max_bytes=0)
    afile = tmp_path / "afile"
    afile.write_text("x")
    from jactus.core.stats_cache import StatsCache

    with pytest.raises(ValueError, match="is a file; expected a directory"):
        StatsCache(afile)
