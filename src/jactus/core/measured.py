"""Measured gains (docs/METHOD.md section 4.2): the allocator's K-FAC proxy calibrated unit by unit against the loss
the model actually loses on held-out calibration batches.

The marginal-gain greedy trades, at each unit's current rank, the proxy's gain of its next ranks (their `s^2`)
against their parameters. The proxy's level differs from the measured loss by a factor that is not the same for
every layer (on SmolLM2 at 0.8 the MLP costs more than its proxy share and attention less; see the validation study),
so the greedy compares unlike quantities. Measuring each unit alone near the rank the proxy's plan gives it -- the
loss on held-out batches with the unit factorized at rank `r` and at `r + step` (dense where that is not smaller),
everything else dense -- gives its measured marginal gain over those ranks; its ratio to the proxy's gain over the
same ranks is the unit's factor, and the spectra scaled by it (`s * sqrt(factor)`) are planned again. The factor is
the local slope at the operating point, which is what the greedy trades; the level of a unit's whole damage (what
restoring it dense recovers) is not, and tilting the plan by such levels made the start worse in that study.

Costs two held-out evaluations per unit (one where the step reaches dense: the dense loss is measured once) and a
second decomposition of every unit (the measurement releases what it builds). A measured gain at or below zero
(noise: the step made no measurable difference) gets the smallest positive factor measured, so no unit's
spectrum vanishes from the plan; and the factors are clipped to within `CLIP` of their median (decision: a unit
whose proxy gain over the step is tiny, such as a small `k_proj`, gets a ratio that is mostly the held-out loss's
noise, and one such ratio must not make a unit dense at the others' expense). Each entry keeps the raw ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .allocation import RankPlan, _unit
from .calibration import to_device
from .decompositions import Decompositions
from .factorize import build_layers
from .modes import module_modes, restore_modes
from .progress import progress_bar

CLIP = 10.0  # the used factors lie within [median / CLIP, median * CLIP] of the raw positive ones


def check_measure_step(step: int, rank_multiple: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < rank_multiple or step % rank_multiple:
        raise ValueError(f"measure_step={step!r}: expected a positive multiple of rank_multiple={rank_multiple} (the "
                         f"ranks between the two measured truncations of a unit, e.g. {4 * rank_multiple})")
    return step


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: Sequence, loss_fn: Callable, device: torch.device) -> float:
    """The mean of `loss_fn(model, batch)` over `batches`, in eval mode (the model's modes restored)."""
    modes = module_modes(model)
    model.eval()
    try:
        losses = [float(loss_fn(model, to_device(batch, device))) for batch in batches]
    finally:
        restore_modes(modes)
    return sum(losses) / len(losses)


@torch.no_grad()
def _loss_with(model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence, loss_fn: Callable,
               device: torch.device) -> float:
    """The held-out loss with `layers` swapped in for the modules of those names, which are put back afterwards."""
    originals = {name: model.get_submodule(name) for name in layers}
    try:
        for name, layer in layers.items():
            model.set_submodule(name, layer.to(originals[name].weight.device))
        return held_out_loss(model, batches, loss_fn, device)
    finally:
        for name, original in originals.items():
            model.set_submodule(name, original)


def measure_factors(model: nn.Module, modules: Mapping[str, nn.Linear], spectra: Mapping[str, torch.Tensor],
                    plan: RankPlan, decompositions: Decompositions, batches: Iterable, loss_fn: Callable, *,
                    step: int, rho: float, weight_basis: str, shared: Sequence[Sequence[str]] = (),
                    device: torch.device | str = "cpu", progress: bool = True) -> dict[str, dict]:
    """Per allocation unit (a target, or the first layer of a shared-basis group), the measured and the proxy gain
    of `step` more ranks than `plan` gives it, and their ratio (`factor`); the model is unchanged.

    `spectra`: the units' singular values, as planned (`plan_ranks(spectra=)`); `decompositions`: the statistics
    they came from (one pass holding every unit). A unit the plan keeps dense is measured on its last step instead:
    from the largest factorized rank to dense.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("measured gains need at least one held-out batch")
    device = torch.device(device)
    sharing = {name: list(group) for group in shared for name in group}
    multiple = plan.rank_multiple
    dense_loss = held_out_loss(model, batches, loss_fn, device)
    out: dict[str, dict] = {}
    bar = progress_bar(total=len(spectra), desc="measured gains", disable=not progress)
    for name, values in spectra.items():
        group = sharing.get(name, [name])
        unit = _unit(name, group, modules, values)
        low = plan.ranks[name]
        if low is None:  # dense in the plan: its last step, from the largest factorized rank to dense
            low = unit.snap((unit.limit - 1) // multiple * multiple, multiple)
            if low is None:  # no factorized rank is smaller than the dense layer: nothing to measure
                bar.update()
                continue
        high = unit.snap(low + step, multiple)
        proxy = unit.residual(low) - unit.residual(high)
        maps = [{member: low for member in group}] + ([{member: high for member in group}] if high else [])
        built = build_layers(decompositions, {member: modules[member] for member in group}, maps, rho, weight_basis,
                             progress=False, shared=[group] if len(group) > 1 else ())
        low_loss = _loss_with(model, built[0], batches, loss_fn, device)
        high_loss = _loss_with(model, built[1], batches, loss_fn, device) if high else dense_loss
        measured = low_loss - high_loss
        out[name] = {"rank": low, "next": high, "measured": measured, "proxy": proxy,
                     "factor": measured / proxy if proxy > 0 else None}
        bar.update()
    bar.close()
    positive = sorted(entry["factor"] for entry in out.values() if entry["factor"] is not None and entry["factor"] > 0)
    median = positive[len(positive) // 2] if positive else 1.0
    floor, ceiling = max(positive[0] if positive else 1.0, median / CLIP), median * CLIP
    for entry in out.values():
        raw = entry["raw_factor"] = entry["factor"]
        # noise (or a step with no proxy gain): the smallest factor used; outliers clipped (module docstring)
        entry["factor"] = min(max(raw, floor), ceiling) if raw is not None and raw > 0 else floor
    return out


def scaled_spectra(spectra: Mapping[str, torch.Tensor], measured: Mapping[str, dict]) -> dict[str, torch.Tensor]:
    """`spectra` with each measured unit's values times `sqrt(factor)` (its gains, `s^2`, times the factor); a unit
    without a measurement keeps the median factor, so it stays on the same scale as the others."""
    factors = sorted(entry["factor"] for entry in measured.values())
    median = factors[len(factors) // 2] if factors else 1.0
    return {name: values * math.sqrt(measured[name]["factor"] if name in measured else median)
            for name, values in spectra.items()}
