"""Memory-bounded compression: calibrate, plan and factorize a model whose statistics do not fit in memory at once.

`compress_model` packs the targets, whole shared-input groups at a time, into passes whose statistics fit
`max_stats_bytes` (`split_passes`), then:

- phase 1, per pass: calibrate the pass's targets, reduce each layer to its whitened-weight spectrum (min(m, n)
  numbers, kept on the CPU) and free the statistics -- except the last pass, whose statistics and whitened SVDs are
  kept for phase 2;
- plan the ranks once from all spectra (`plan_ranks(spectra=...)`);
- phase 2, per pass (the kept one first): recalibrate the pass when its statistics were freed, build its
  `FactorizedLinear` layers, free the statistics group by group.

Nothing is swapped into the model before every pass is done, so each calibration sees the dense model and the result
equals one `calibrate -> plan_ranks -> factorize` over all layers. Cost: P calibration passes in phase 1 and P - 1 in
phase 2; memory: the model, one pass's statistics, the decompositions of one shared-input group, and the layers built
so far (on the CPU with `park_layers_on_cpu`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .allocation import ALLOCATORS, SCOPES, RankPlan, plan_ranks
from .calibration import (
    LossFn,
    _to_device,
    calibrate,
    check_stats_dtype,
    input_groups,
    split_passes,
    stats_bytes,
)
from .decompositions import Decompositions
from .factorize import build_layers, install_layers
from .linalg import COMPUTE_DTYPES, DEFAULT_DAMPING, EIG_METHODS, check_choice
from .subspace import STATS_MODES, WEIGHT_BASES
from .targets import find_targets


class _StageClock:
    """Wall seconds per named stage, device-synchronised at both ends (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def compress_model(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn,
    budget: float | Sequence[float],
    *,
    targets: Sequence[str] | Mapping[str, nn.Linear] | None = None,
    allocator: str = "marginal_gain",
    scope: str = "model",
    rank_multiple: int = 8,
    rho: float = 0.25,
    weight_basis: str = "whitened",
    stats_mode: str = "kfac",
    damping: float = DEFAULT_DAMPING,
    max_stats_bytes: int | None = None,
    stats_dtype: torch.dtype = torch.float64,
    compute_dtype: str | torch.dtype = "auto",
    eig_method: str = "auto",
    offload_to_cpu: bool = False,
    park_layers_on_cpu: bool = False,
    mask_key: str = "attention_mask",
    head_names: Sequence[str] = (),
    device: torch.device | str | None = None,
    progress: bool = True,
    loss_normalizer: Callable[[Any], float] | None = None,
) -> tuple[nn.Module, RankPlan] | list[tuple[nn.Module, RankPlan]]:
    """Compress `model` to `budget` in bounded memory (module docstring) -> `(model, plan)`, the model changed in
    place with the freeze policy of `factorize(freeze=True)`.

    Arguments are those of `calibrate`, `plan_ranks` and `factorize`. `max_stats_bytes` bounds the statistics held at
    once (bytes per element follow `stats_dtype`; None: one pass); `offload_to_cpu` keeps the running sums in host
    memory (slow on a GPU: every batch's `X^T X` crosses PCIe) and implies `park_layers_on_cpu`, which keeps built
    layers on the CPU until the swap (cheap: each crosses once each way), so that phase 2's recalibrations do not
    hold them on the device. Decompositions run on the weights' device in `compute_dtype`, with `eig_method` for
    the task directions (see `Decompositions`). `batches` must be re-iterable. A list of budgets gives a list
    of `(model, plan)` from the same passes, one copy of the dense model per extra budget (the last budget's model
    is `model` itself). `model.jactus_compress_stats` records the passes, their statistics' bytes, seconds per stage
    and the layers redone in float64.
    """
    single = not isinstance(budget, (list, tuple))
    budgets = [budget] if single else list(budget)
    _check_arguments(model, budgets, allocator, scope, rank_multiple, rho, weight_basis, stats_mode, damping,
                     max_stats_bytes, stats_dtype, compute_dtype, eig_method, head_names)
    if iter(batches) is batches:
        raise ValueError("compress_model reads `batches` several times; pass a list or DataLoader, not an iterator")
    modules = dict(targets) if isinstance(targets, Mapping) else find_targets(model, targets)
    if not modules:
        raise ValueError("compress_model got no target layers (targets={})")
    if device is None:
        first_param = next(model.parameters(), None)
        device = first_param.device if first_param is not None else torch.device("cpu")
    device = torch.device(device)
    need_stats = stats_mode != "none"
    need_gradients = stats_mode in ("kfac", "gradient")
    clock = _StageClock(device)

    with clock("phase1_calibrate"):
        groups = _input_groups(model, modules, batches, loss_fn, device) if need_stats else [[n] for n in modules]
    passes = split_passes(groups, modules, need_gradients, max_stats_bytes if need_stats else None, stats_dtype)
    pass_bytes = [sum(stats_bytes(group, modules, need_gradients, stats_dtype) for group in pass_groups)
                  if need_stats else 0 for pass_groups in passes]

    def calibrate_pass(pass_groups: list[list[str]]) -> Decompositions:
        stats = None
        if need_stats:
            stats = calibrate(model, batches, loss_fn, {name: modules[name] for group in pass_groups for name in group},
                              mask_key=mask_key, need_gradients=need_gradients, offload_to_cpu=offload_to_cpu,
                              device=device, progress=progress, loss_normalizer=loss_normalizer,
                              stats_dtype=stats_dtype, groups=pass_groups)
        return Decompositions(stats, stats_mode, damping, compute_dtype=compute_dtype, eig_method=eig_method)

    from tqdm.auto import tqdm

    fallbacks: list[str] = []
    spectra: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(modules), desc="compress 1/2 (spectra)", disable=not progress)
    for index, pass_groups in enumerate(passes):
        bar.set_postfix_str(f"pass {index + 1}/{len(passes)}")
        kept = index == len(passes) - 1
        with clock("phase1_calibrate"):
            decompositions = calibrate_pass(pass_groups)
        with clock("phase1_spectra"):
            for group in pass_groups:
                for name in group:
                    spectra[name] = decompositions.spectrum(name, modules[name].weight,
                                                            keep=kept and weight_basis == "whitened")
                    bar.update()
                decompositions.release(group, keep_svd=True)
        if not kept:
            fallbacks += decompositions.fp64_fallbacks
            del decompositions  # this pass's statistics go before the next pass accumulates its own
    bar.close()

    with clock("plan"):
        plans = plan_ranks(model, None, budgets, allocator=allocator, scope=scope, rank_multiple=rank_multiple,
                           stats_mode=stats_mode, damping=damping, spectra={name: spectra[name] for name in modules})

    built: list[dict[str, nn.Module]] = [{} for _ in plans]
    bar = tqdm(total=len(modules), desc="compress 2/2 (factorize)", disable=not progress)
    for step, index in enumerate([len(passes) - 1, *range(len(passes) - 1)]):
        bar.set_postfix_str(f"pass {step + 1}/{len(passes)}")
        if step > 0:
            with clock("phase2_calibrate"):
                decompositions = calibrate_pass(passes[index])

        def done(group: list[str], stats=decompositions.stats) -> None:
            if stats is not None:  # this group's statistics are needed no more
                for name in group:
                    stats.layers.pop(name, None)
            bar.update(len(group))

        with clock("phase2_factorize"):
            linears = {name: modules[name] for group in passes[index] for name in group}
            for layers, new in zip(built, build_layers(decompositions, linears, [plan.ranks for plan in plans], rho,
                                                       weight_basis, release=done,
                                                       park_on_cpu=offload_to_cpu or park_layers_on_cpu,
                                                       progress=False), strict=True):
                layers.update(new)
        fallbacks += decompositions.fp64_fallbacks
        del decompositions, done
    bar.close()

    modules.clear()  # the dense linears go as soon as their replacements are in
    results = []
    with clock("swap"):
        for index, (plan, layers) in enumerate(zip(plans, built, strict=True)):
            target = model if index == len(plans) - 1 else copy.deepcopy(model)
            install_layers(target, layers, plan.ranks, freeze=True, keep_trainable=("norm", "bias"),
                           head_names=head_names)
            results.append((target, plan))
            layers.clear()
    info = {"passes": len(passes), "pass_stats_bytes": pass_bytes, "max_stats_bytes": max_stats_bytes,
            "stats_dtype": str(stats_dtype).replace("torch.", ""),
            "stages_s": {stage: round(seconds, 4) for stage, seconds in clock.seconds.items()},
            "fp64_fallbacks": fallbacks}
    for target, _ in results:
        target.jactus_compress_stats = info
    return results[0] if single else results


def _input_groups(model: nn.Module, modules: Mapping[str, nn.Linear], batches: Iterable, loss_fn: LossFn,
                  device: torch.device) -> list[list[str]]:
    """`calibration.input_groups` from the first batch, the model in eval mode as calibration runs it."""
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("compress_model got no batches")
    was_training = model.training
    model.eval()
    try:
        return input_groups(model, modules, _to_device(first, device), loss_fn)
    finally:
        model.train(was_training)


def _check_arguments(model, budgets, allocator, scope, rank_multiple, rho, weight_basis, stats_mode, damping,
                     max_stats_bytes, stats_dtype, compute_dtype, eig_method, head_names) -> None:
    """Everything that can be wrong before the first (expensive) calibration pass."""
    check_choice(allocator, ALLOCATORS, "allocator")
    check_choice(scope, SCOPES, "scope")
    check_choice(weight_basis, WEIGHT_BASES, "weight_basis")
    check_choice(stats_mode, STATS_MODES, "stats_mode")
    check_choice(compute_dtype, COMPUTE_DTYPES, "compute_dtype")
    check_choice(eig_method, EIG_METHODS, "eig_method")
    check_stats_dtype(stats_dtype)
    if not budgets:
        raise ValueError("budget=[]: give at least one retained-parameter fraction in (0, 1]")
    for value in budgets:
        if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"budget={value!r}: expected a retained-parameter fraction in (0, 1]")
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple={rank_multiple!r}: expected a positive integer")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho}: expected a fraction in [0, 1]")
    if damping < 0:
        raise ValueError(f"damping={damping}: expected >= 0")
    if max_stats_bytes is not None and (not isinstance(max_stats_bytes, int) or max_stats_bytes <= 0):
        raise ValueError(f"max_stats_bytes={max_stats_bytes!r}: expected a positive integer (bytes) or None")
    for head in head_names:
        try:
            model.get_submodule(head)
        except AttributeError as err:
            raise ValueError(f"head module {head!r} not found in {type(model).__name__}") from err
