"""Measured gains (`compress_model(measure_batches=...)`, `core.measured`, docs/METHOD.md section 4.2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from jactus.core import compress_model
from jactus.core import measured as measured_module
from jactus.core.measured import held_out_loss, scaled_spectra

from .conftest import lm_loss, make_lm_data

BATCHES = [make_lm_data(rows=4, length=9, seed=s) for s in range(3)]
HELD_OUT = [make_lm_data(rows=4, length=9, seed=s) for s in (10, 11)]


def _compress(model, budget=0.6, **kwargs):
    options = dict(rank_multiple=2, rho=0.0, progress=False, damping=1e-3)
    options.update(kwargs)
    return compress_model(model, BATCHES, lm_loss, budget, **options)


def test_each_unit_is_measured_alone_at_its_planned_rank_against_the_dense_model(tiny_llama):
    """A step past every layer's dense limit: each unit's measured gain is the held-out loss with its planned layer
    swapped into the dense model minus the dense loss, and its factor that over the proxy's residual at that rank."""
    dense = copy.deepcopy(tiny_llama)
    proxy_model, proxy_plan = _compress(copy.deepcopy(tiny_llama))
    model, plan = _compress(tiny_llama, measure_batches=HELD_OUT, measure_step=32)
    entries = model.jactus_compress_stats["measured"]["0.6"]
    factorized = {name for name, rank in proxy_plan.ranks.items() if rank is not None}
    assert factorized <= set(entries) and all(entry["next"] is None for entry in entries.values())
    dense_loss = held_out_loss(dense, HELD_OUT, lm_loss, torch.device("cpu"))
    for name in sorted(factorized)[:4]:
        entry = entries[name]
        assert entry["rank"] == proxy_plan.ranks[name]  # measured where the proxy's plan puts it
        probe = copy.deepcopy(dense)
        probe.set_submodule(name, copy.deepcopy(proxy_model.get_submodule(name)))
        loss = held_out_loss(probe, HELD_OUT, lm_loss, torch.device("cpu"))
        assert entry["measured"] == pytest.approx(loss - dense_loss, rel=1e-4, abs=1e-6)
        assert entry["proxy"] == pytest.approx(proxy_plan.residual[name], rel=1e-6)
        if entry["measured"] > 0:
            assert entry["factor"] == pytest.approx(entry["measured"] / entry["proxy"], rel=1e-6)
    assert plan.params_deployed <= 0.6 * plan.params_original
    stats = model.jactus_compress_stats
    assert "measure" in stats["stages_s"]


def test_a_unit_measured_to_matter_more_gets_more_rank_and_the_budget_holds(tiny_llama, monkeypatch):
    _, proxy_plan = _compress(copy.deepcopy(tiny_llama))
    favoured = next(name for name, rank in proxy_plan.ranks.items() if rank is not None and name.endswith("gate_proj"))

    def fake(model, modules, spectra, plan, *args, **kwargs):
        return {name: {"rank": plan.ranks[name], "next": None, "measured": 1.0, "proxy": 1.0,
                       "factor": 1000.0 if name == favoured else 1.0} for name in spectra}

    monkeypatch.setattr("jactus.core.bounded.measure_factors", fake)
    _, plan = _compress(tiny_llama, measure_batches=HELD_OUT)
    assert plan.ranks[favoured] is None or plan.ranks[favoured] > proxy_plan.ranks[favoured]
    assert plan.params_deployed <= 0.6 * plan.params_original


def test_scaled_spectra_scale_the_gains_and_give_unmeasured_units_the_median():
    spectra = {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([3.0]), "c": torch.tensor([1.0])}
    measured = {"a": {"factor": 4.0}, "b": {"factor": 1.0}}
    out = scaled_spectra(spectra, measured)
    assert torch.allclose(out["a"] ** 2, 4.0 * spectra["a"] ** 2) and torch.equal(out["b"], spectra["b"])
    assert torch.allclose(out["c"], spectra["c"] * math.sqrt(4.0))  # the median of [1, 4] (upper)


def test_non_positive_measurements_take_the_smallest_positive_factor(tiny_llama, monkeypatch):
    calls = iter([0.5, 0.2, -0.1, 0.0] * 100)

    def loss_with(model, layers, batches, loss_fn, device):
        return next(calls)

    monkeypatch.setattr(measured_module, "_loss_with", loss_with)
    monkeypatch.setattr(measured_module, "held_out_loss", lambda *args: 0.0)
    model, _ = _compress(tiny_llama, measure_batches=HELD_OUT, measure_step=32)
    entries = model.jactus_compress_stats["measured"]["0.6"].values()
    factors = [entry["factor"] for entry in entries]
    assert min(factors) > 0 and len(set(factors)) > 1
    positive = sorted(entry["raw_factor"] for entry in entries if entry["raw_factor"] > 0)
    floor = max(positive[0], positive[len(positive) // 2] / measured_module.CLIP)  # the smallest factor used
    assert all(entry["factor"] == floor for entry in entries if entry["raw_factor"] <= 0)
    assert min(factors) == floor


def test_outlying_factors_are_clipped_around_the_median(tiny_llama, monkeypatch):
    calls = iter([1000.0] + [1.0] * 100)  # the first unit measured a thousand times the others
    monkeypatch.setattr(measured_module, "_loss_with", lambda *args: next(calls))
    monkeypatch.setattr(measured_module, "held_out_loss", lambda *args: 0.0)
    model, _ = _compress(tiny_llama, measure_batches=HELD_OUT, measure_step=32)
    entries = list(model.jactus_compress_stats["measured"]["0.6"].values())
    raw = sorted(entry["raw_factor"] for entry in entries)
    median = raw[len(raw) // 2]
    first = entries[0]
    assert first["raw_factor"] > measured_module.CLIP * median
    assert first["factor"] == pytest.approx(measured_module.CLIP * median)
    assert all(median / measured_module.CLIP <= entry["factor"] <= measured_module.CLIP * median for entry in entries)


@pytest.mark.parametrize("kwargs, message", [
    (dict(measure_step=3), "measure_step=3: expected a positive multiple of rank_multiple=2"),
    (dict(allocator="uniform"), "not with allocator='uniform'"),
    (dict(nested=True, budget=[0.6, 0.7]), "not with nested=True"),
    (dict(max_stats_bytes=80000), "splits them into"),
])
def test_refusals(kwargs, message, tiny_llama):
    budget = kwargs.pop("budget", 0.6)
    with pytest.raises(ValueError, match=message):
        _compress(tiny_llama, budget=budget, measure_batches=HELD_OUT, **kwargs)
    with pytest.raises(ValueError, match="not an iterator"):
        _compress(tiny_llama, measure_batches=iter(HELD_OUT))


def test_the_method_holds_out_its_last_calibration_batches(tiny_llama):
    from jactus.methods import MethodContext
    from jactus.methods.jactus import Jactus

    batches = [*BATCHES, *HELD_OUT]
    method = Jactus(budget=0.6, rank_multiple=2, rho=0.0, measure_batches=2, measure_step=4)
    model = method.apply(MethodContext(model=tiny_llama, loss_fn=lm_loss, calibration_batches=batches,
                                       family="causal_lm"))
    entries = model.jactus_compress_stats["measured"]
    assert list(entries) == [str(method.plan.budget)] and entries[str(method.plan.budget)]
    assert method.summary()["measured_gains"] == {"batches": 2, "step": 4}
    with pytest.raises(ValueError, match="holds out every one of the 5 calibration batches"):
        Jactus(budget=0.6, rank_multiple=2, measure_batches=5).apply(
            MethodContext(model=copy.deepcopy(tiny_llama), loss_fn=lm_loss, calibration_batches=batches,
                          family="causal_lm"))
    with pytest.raises(ValueError, match="method.measure_batches=-1"):
        Jactus(measure_batches=-1)


def test_a_shared_basis_group_is_measured_as_one_unit(tiny_llama):
    model, plan = _compress(tiny_llama, measure_batches=HELD_OUT, measure_step=4, share_bases=["gate_proj", "up_proj"])
    entries = model.jactus_compress_stats["measured"]["0.6"]
    assert plan.shared and all(group[0] in entries and group[1] not in entries for group in plan.shared)
    for group in plan.shared:
        assert plan.ranks[group[0]] == plan.ranks[group[1]]
