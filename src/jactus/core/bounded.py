"""Memory-bounded compression, the one compression driver: calibrate, plan and factorize a model whose statistics
may not fit in memory at once. Every compressing method (jactus, cersa, compress_then_adapt, tunecomp) runs it;
`calibrate` itself does one pass over the layers it is given.

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

Under `torch.distributed` the statistics are all-reduced (`calibrate`), rank 0's plan is broadcast and so are the
built layers, so every rank holds the same layer shapes and values even where floating point would break a tie in
the allocation differently on two ranks.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .allocation import ALLOCATORS, SCOPES, RankPlan, plan_ranks, unit_spectrum
from .calibration import (
    LossFn,
    broadcast,
    calibrate,
    check_every_rank_has_batches,
    check_stats_dtype,
    distributed,
    input_groups,
    split_passes,
    stats_bytes,
    to_device,
)
from .decompositions import Decompositions
from .error_aware import check_compensation, sequential_build, target_blocks
from .factorize import build_layers, install_layers
from .linalg import COMPUTE_DTYPES, DEFAULT_DAMPING, EIG_METHODS, check_choice
from .measured import check_measure_step, measure_factors, scaled_spectra
from .modes import module_modes, restore_modes
from .progress import progress_bar
from .stats_cache import StatsCache, batches_digest, model_digest, stats_key
from .subspace import STATS_MODES, WEIGHT_BASES
from .targets import find_targets

# `max_stats_bytes="auto"`: this fraction of the device memory free when compression starts (the model already on
# it); the rest is for the calibration forward/backward, the decompositions of one group and the built layers.
AUTO_STATS_FRACTION = 0.5
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
LayerBuilder = Callable[[Decompositions, str, nn.Linear, int], nn.Module]


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory of `device`: CUDA's free bytes, or the host's available memory for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_bytes(value, key: str, also: str = "") -> int | None:
    """A size setting as bytes: None/"null", a positive integer, or a size with a unit ("22GB", "20GiB", "500MB").
    `key` names the setting in errors; `also` lists any other accepted value there (e.g. ", or auto")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    expected = f"expected null, a positive number of bytes, or a size such as '22GB' or '20GiB'{also}"
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: {expected}")
    if isinstance(value, str):
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?", value.strip().lower())
        if match is None:
            raise ValueError(f"{key}={value!r}: {expected}")
        value = float(match.group(1)) * _UNITS[match.group(2) or ""]
    if isinstance(value, float):
        value = int(value)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}={value!r}: {expected}")
    return value


def resolve_max_stats_bytes(value, device: torch.device | str = "cpu") -> int | None:
    """`max_stats_bytes` as bytes: None (one pass), a positive integer, a size with a unit ("22GB", "20GiB",
    "500MB") or "auto" (`AUTO_STATS_FRACTION` of the device's free memory)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, int(AUTO_STATS_FRACTION * free_memory_bytes(device)))
    return parse_bytes(value, "max_stats_bytes", ", or auto")


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
    batches: Iterable | None,
    loss_fn: LossFn | None,
    budget: float | Sequence[float] | None,
    *,
    targets: Sequence[str] | Mapping[str, nn.Linear] | None = None,
    allocator: str = "marginal_gain",
    scope: str = "model",
    rank_multiple: int = 8,
    rho: float = 0.25,
    weight_basis: str = "whitened",
    stats_mode: str = "kfac",
    damping: float = DEFAULT_DAMPING,
    energy: float | None = None,
    max_stats_bytes: int | str | None = None,
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
    build_layer: LayerBuilder | None = None,
    nested: bool = False,
    stats_cache: str | os.PathLike | None = None,
    stats_cache_max_bytes: int | str | None = None,
    share_bases: bool | Sequence[str] = False,
    compensation: float | None = None,
    measure_batches: Iterable | None = None,
    measure_step: int = 32,
    input_batches: Iterable | None = None,
) -> tuple[nn.Module, RankPlan] | list[tuple[nn.Module, RankPlan]]:
    """Compress `model` to `budget` in bounded memory (module docstring) -> `(model, plan)`, the model changed in
    place with the freeze policy of `factorize(freeze=True)`.

    Arguments are those of `calibrate`, `plan_ranks` and `factorize`. `max_stats_bytes` bounds the statistics held at
    once (bytes per element follow `stats_dtype`; None: one pass; "auto" or a size such as "22GB":
    `resolve_max_stats_bytes`); `offload_to_cpu` keeps the running sums in host
    memory (slow on a GPU: every batch's `X^T X` crosses PCIe) and implies `park_layers_on_cpu`, which keeps built
    layers on the CPU until the swap (cheap: each crosses once each way), so that phase 2's recalibrations do not
    hold them on the device. Decompositions run on the weights' device in `compute_dtype`, with `eig_method` for
    the task directions (see `Decompositions`). `batches` must be re-iterable. A list of budgets gives a list
    of `(model, plan)` from the same passes, one copy of the dense model per extra budget (the last budget's model
    is `model` itself). `model.jactus_compress_stats` records the passes, their statistics' bytes, seconds per stage
    and the layers redone in float64, and `peak_stats_bytes`, the largest statistics held at once as counted from the
    tensors themselves.

    `energy` (with `allocator="energy"` and `budget=None`): every layer keeps that fraction of its spectral energy
    (CERSA). `stats_mode="none"` reads no statistics, so `batches` and `loss_fn` may be None. `build_layer(
    decompositions, name, linear, rank)` replaces the default `FactorizedLinear` builder (`factorize`'s layer) by
    another compressed layer built from the same decompositions (TuneComp's two-branch layer); the built layers are
    swapped in with the freeze policy `train_cores`, which a method with other trainables then overrides.

    `nested=True` (palette fine-tuning, docs/METHOD.md section 11) with a list of budgets: the plans nest
    (`plan_ranks(nested=True)`) and one model serves them all: each target that some budget factorizes is built once,
    at the largest rank any budget gives it, and swapped in (no copies of the dense model); every pair returned
    holds that one model. The default builder then uses nested bases (`union_subspace(nested=True)`), whose
    truncations give the smaller ranks' factorizations.

    `stats_cache`: a directory where each pass's statistics are stored under a hash of the model, the batches and the
    calibration settings, and loaded from when present (`core.stats_cache`): a sweep over rho, budgets or damping
    calibrates once. `stats_cache_max_bytes` (bytes or a size such as "20GB") bounds the directory, removing the
    least recently used files (`StatsCache`). `jactus_compress_stats["stats_cache"]` counts the hits and misses and
    names the files evicted.

    `share_bases=True` (docs/METHOD.md section 3.3): the targets of each shared-input group (Llama's q/k/v and
    gate/up) share one input basis `V`: one rank per group, planned from the group's stacked spectrum at its real
    cost (`n + sum m_i` a rank), each layer with its own `U` and core (`subspace.factorize_group`). A list of layer
    kinds (the last component of a name, e.g. `["gate_proj", "up_proj"]`) shares among the members of those kinds
    only (`shared_basis_groups`). Not with `nested`, `build_layer` or `stats_mode="none"` (no groups are known
    without calibration).

    `compensation` (None: one-shot): error-aware compression (`core.error_aware`, docs/METHOD.md section 12.1). The
    spectra and the plan come from the one-shot pass as usual; then the layers are built block by block from the
    inputs the compressed blocks before them produce, fitting `lam W x + (1 - lam) W x'` from `x'` with `lam =
    compensation`. It keeps the gradient covariances of every target until its block is built, so the statistics
    must fit one pass (`max_stats_bytes`); not with `nested` or `build_layer`.

    `measure_batches` (None: the proxy's plan): measured gains (`core.measured`, docs/METHOD.md section 4.2). Each
    budget's marginal-gain plan is made, then every allocation unit is measured alone on these held-out batches at
    its planned rank and `measure_step` ranks more, and the plan is made again from the spectra scaled by the
    measured/proxy ratios; `jactus_compress_stats["measured"]` holds them per budget. The statistics must fit one
    pass; not with `nested`, `build_layer`, `stats_mode="none"` or another allocator.

    `input_batches` (None: none): batches that add to the input covariances only (`calibrate(input_batches=)`, e.g.
    generic text beside the task's items, docs/METHOD.md section 1); not with `compensation` (its compressed stream
    runs on `batches`).
    """
    single = not isinstance(budget, (list, tuple))
    budgets = [budget] if single else list(budget)
    compensation = check_compensation(compensation)
    conflict = "nested=True" if nested else "a build_layer" if build_layer is not None else \
        "stats_mode='none'" if stats_mode == "none" else None
    for used, option, why in ((compensation is not None, f"compensation={compensation} (error-aware compression)",
                               "it refits JACTUS's own layers from calibrated inputs"),
                              (share_bases, "share_bases=True", "shared input bases are JACTUS's own layers, planned "
                                                                "from calibrated groups")):
        if used and conflict:
            raise ValueError(f"{option} does not combine with {conflict}: {why}")
    if input_batches is not None:
        if stats_mode == "none":
            raise ValueError("input_batches (input-only calibration) do not combine with stats_mode=none: nothing is "
                             "calibrated")
        if compensation is not None:
            raise ValueError(f"input_batches (input-only calibration) do not combine with compensation={compensation}: "
                             f"its streams run on batches")
        _check_reiterable(input_batches, "input_batches", "once per pass")
    if measure_batches is not None:
        measure_step = check_measure_step(measure_step, rank_multiple)
        if conflict or allocator != "marginal_gain" or energy is not None:
            raise ValueError(f"measure_batches (measured gains) calibrate the marginal-gain allocator's proxy on "
                             f"JACTUS's own layers; not with {conflict or f'allocator={allocator!r}'}")
        _check_reiterable(measure_batches, "measure_batches", "once per unit")
    _check_arguments(model, budgets, allocator, scope, rank_multiple, rho, weight_basis, stats_mode, damping,
                     energy, stats_dtype, compute_dtype, eig_method, head_names)
    cache_bound = parse_bytes(stats_cache_max_bytes, "stats_cache_max_bytes")
    need_stats = stats_mode != "none"
    need_gradients = stats_mode in ("kfac", "gradient")
    if need_stats and (batches is None or loss_fn is None):
        raise ValueError(f"stats_mode={stats_mode!r} needs calibration batches and a loss_fn")
    if need_stats:
        _check_reiterable(batches, "batches", "several times")
    modules = dict(targets) if isinstance(targets, Mapping) else find_targets(model, targets)
    if not modules:
        raise ValueError("compress_model got no target layers (targets={})")
    if device is None:
        first_param = next(model.parameters(), None)
        device = first_param.device if first_param is not None else torch.device("cpu")
    device = torch.device(device)
    max_stats_bytes = resolve_max_stats_bytes(max_stats_bytes, device) if need_stats else None
    clock = _StageClock(device)
    peak_stats_bytes = 0
    cache = StatsCache(stats_cache, cache_bound) if stats_cache is not None and need_stats else None

    with clock("phase1_calibrate"):
        # the model stays dense and unchanged until every pass is done: one hash of it and of the batches serves all
        # input-only batches are part of what a pass measures: they enter the batches' hash (none: the key as before)
        digests = (model_digest(model), batches_digest(batches if input_batches is None else
                                                       [*batches, "input-only:", *input_batches])
                   ) if cache is not None else None
        groups = (first_batch_input_groups(model, modules, batches, loss_fn, device) if need_stats
                  else [[n] for n in modules])
    shared = shared_basis_groups(groups, share_bases)
    sharing = {name: group for group in shared for name in group}
    passes = split_passes(groups, modules, need_gradients, max_stats_bytes if need_stats else None, stats_dtype)
    if measure_batches is not None and len(passes) > 1:
        raise ValueError(f"measure_batches (measured gains) build every unit from the statistics of one pass; "
                         f"max_stats_bytes={max_stats_bytes} splits them into {len(passes)}: raise it or set it to "
                         f"null")
    if compensation is not None and len(passes) > 1:
        raise ValueError(f"compensation={compensation} (error-aware compression) keeps every target's gradient "
                         f"covariance until its block is rebuilt, so the statistics must fit one pass; "
                         f"max_stats_bytes={max_stats_bytes} splits them into {len(passes)} (they need "
                         f"{sum(stats_bytes(g, modules, need_gradients, stats_dtype) for g in groups)} bytes): raise "
                         f"it or set it to null")
    if compensation is not None:
        target_blocks(model, modules)  # every target in a block, before the expensive pass
    pass_bytes = [sum(stats_bytes(group, modules, need_gradients, stats_dtype) for group in pass_groups)
                  if need_stats else 0 for pass_groups in passes]

    def calibrate_pass(pass_groups: list[list[str]]) -> Decompositions:
        nonlocal peak_stats_bytes
        stats = None
        if need_stats:
            def measure():
                return calibrate(model, batches, loss_fn,
                                 {name: modules[name] for group in pass_groups for name in group},
                                 mask_key=mask_key, need_gradients=need_gradients, offload_to_cpu=offload_to_cpu,
                                 device=device, progress=progress, loss_normalizer=loss_normalizer,
                                 stats_dtype=stats_dtype, groups=pass_groups, input_batches=input_batches)

            if cache is None:
                stats = measure()
            else:
                key = stats_key(*digests, pass_groups, need_gradients=need_gradients,
                                stats_dtype=stats_dtype, mask_key=mask_key, loss_fn=loss_fn,
                                loss_normalizer=loss_normalizer)
                stats = cache.cached(key, measure,
                                     map_location=torch.device("cpu") if offload_to_cpu else device)
            peak_stats_bytes = max(peak_stats_bytes, stats.nbytes())
        return Decompositions(stats, stats_mode, damping, compute_dtype=compute_dtype, eig_method=eig_method)

    fallbacks: list[str] = []
    spectra: dict[str, torch.Tensor] = {}
    bar = progress_bar(total=len(modules), desc="compress 1/2 (spectra)", disable=not progress)
    for index, pass_groups in enumerate(passes):
        bar.set_postfix_str(f"pass {index + 1}/{len(passes)}")
        kept = index == len(passes) - 1
        with clock("phase1_calibrate"):
            decompositions = calibrate_pass(pass_groups)
        with clock("phase1_spectra"):
            for group in pass_groups:
                for name in group:
                    values = unit_spectrum(decompositions, name, modules, sharing,
                                           keep=kept and weight_basis == "whitened")
                    if values is not None:
                        spectra[name] = values
                    bar.update()
                decompositions.release(group, keep_svd=True)
        if not kept:
            fallbacks += decompositions.fp64_fallbacks
            del decompositions  # this pass's statistics go before the next pass accumulates its own
    bar.close()

    with clock("plan"):
        plans = plan_ranks(model, None, budgets if budgets != [None] else None, allocator=allocator, scope=scope,
                           rank_multiple=rank_multiple, stats_mode=stats_mode, damping=damping, energy=energy,
                           spectra={name: spectra[name] for name in modules if name in spectra}, nested=nested,
                           shared=shared)
        plans = plans if isinstance(plans, list) else [plans]
    measured: list[dict] = []
    if measure_batches is not None:
        with clock("measure"):
            units = {name: spectra[name] for name in modules if name in spectra}
            for index, plan in enumerate(plans):
                measured.append(measure_factors(
                    model, modules, units, plan, decompositions, measure_batches, loss_fn, step=measure_step,
                    rho=rho, weight_basis=weight_basis, shared=shared, device=device, progress=progress))
                plans[index] = plan_ranks(model, None, plan.budget, allocator=allocator, scope=scope,
                                          rank_multiple=rank_multiple, stats_mode=stats_mode, damping=damping,
                                          spectra=scaled_spectra(units, measured[-1]), shared=shared)
    with clock("plan"):
        if distributed():  # rank 0 decides: a floating-point tie broken differently must not change a layer's shape
            plans = [RankPlan.from_dict(entry) for entry in broadcast_object([plan.to_dict() for plan in plans])]
    # nested: one model, each layer at the largest rank any plan gives it (None: dense in every plan)
    rank_maps = [nested_rank_map(plans)] if nested else [plan.ranks for plan in plans]

    built: list[dict[str, nn.Module]] = [{} for _ in rank_maps]

    def broadcast_layers(new: Mapping[str, nn.Module]) -> None:
        if distributed():  # identical values on every rank, whatever floating point did per rank
            for layer in new.values():
                for tensor in itertools.chain(layer.parameters(), layer.buffers()):
                    broadcast(tensor.data)

    if compensation is not None:  # error-aware: block by block from the compressed prefix (core.error_aware)
        stats = decompositions.stats
        grad_covs = {name: None if stats is None else stats.layers[name].grad_cov for name in modules}
        fallbacks += decompositions.fp64_fallbacks
        del decompositions, stats  # the dense input statistics are not needed: each block measures its own
        with clock("phase2_error_aware"):
            for layers, ranks in zip(built, rank_maps, strict=True):
                layers.update(sequential_build(
                    model, batches, loss_fn, modules, ranks, grad_covs, groups, compensation, stats_mode=stats_mode,
                    damping=damping, rho=rho, weight_basis=weight_basis, shared=shared, mask_key=mask_key,
                    device=device, offload_to_cpu=offload_to_cpu, compute_dtype=compute_dtype, eig_method=eig_method,
                    stats_dtype=stats_dtype, progress=progress, on_layers=broadcast_layers))
        del grad_covs
    passes_to_build = [] if compensation is not None else [len(passes) - 1, *range(len(passes) - 1)]
    bar = progress_bar(total=len(modules), desc="compress 2/2 (factorize)",
                       disable=not progress or compensation is not None)
    for step, index in enumerate(passes_to_build):
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
            for layers, new in zip(built, build_layers(decompositions, linears, rank_maps, rho,
                                                       weight_basis, release=done,
                                                       park_on_cpu=offload_to_cpu or park_layers_on_cpu,
                                                       progress=False, builder=build_layer, nested=nested,
                                                       shared=shared),
                                  strict=True):
                broadcast_layers(new)
                layers.update(new)
        fallbacks += decompositions.fp64_fallbacks
        del decompositions, done
    bar.close()

    modules.clear()  # the dense linears go as soon as their replacements are in
    results = []
    with clock("swap"):
        for index, (ranks, layers) in enumerate(zip(rank_maps, built, strict=True)):
            target = model if index == len(rank_maps) - 1 else copy.deepcopy(model)
            install_layers(target, layers, ranks, freeze=True, keep_trainable=("norm", "bias"),
                           head_names=head_names)
            results.append(target)
            layers.clear()
    results = [(results[0], plan) for plan in plans] if nested else list(zip(results, plans, strict=True))
    info = {"passes": len(passes), "pass_stats_bytes": pass_bytes, "max_stats_bytes": max_stats_bytes,
            "peak_stats_bytes": peak_stats_bytes, "stats_dtype": str(stats_dtype).replace("torch.", ""),
            "stages_s": {stage: round(seconds, 4) for stage, seconds in clock.seconds.items()},
            "fp64_fallbacks": fallbacks}
    if measured:
        info["measured"] = {str(plan.budget): entries for plan, entries in zip(plans, measured, strict=True)}
    if cache is not None:
        info["stats_cache"] = {"dir": str(cache.directory), "hits": cache.hits, "misses": cache.misses,
                               "evicted": list(cache.evicted)}
    for target, _ in results:
        target.jactus_compress_stats = info
    return results[0] if single else results


def _check_reiterable(batches: Iterable, name: str, how_often: str) -> None:
    if iter(batches) is batches:
        raise ValueError(f"compress_model reads `{name}` {how_often}; pass a list or DataLoader, not an iterator")


def shared_basis_groups(groups: Sequence[Sequence[str]], share_bases: bool | Sequence[str]) -> list[list[str]]:
    """The groups of layers that will share an input basis: each shared-input group of two or more (`True`), or
    its members whose kind (the last component of the name) is listed, where two or more are (`["gate_proj",
    "up_proj"]`); none for `False`."""
    if share_bases is False or share_bases is None:
        return []
    if share_bases is True:
        return [list(group) for group in groups if len(group) > 1]
    kinds = set(share_bases)
    picked = [[name for name in group if name.rsplit(".", 1)[-1] in kinds] for group in groups]
    return [group for group in picked if len(group) > 1]


def nested_rank_map(plans: Sequence[RankPlan]) -> dict[str, int | None]:
    """Per layer, the largest rank any of `plans` factorizes it at; None where every plan keeps it dense."""
    ranks: dict[str, int | None] = {}
    for name in plans[0].ranks:
        factorized = [plan.ranks[name] for plan in plans if plan.ranks[name] is not None]
        ranks[name] = max(factorized) if factorized else None
    return ranks


def first_batch_input_groups(model: nn.Module, modules: Mapping[str, nn.Linear], batches: Iterable, loss_fn: LossFn,
                             device: torch.device, what: str = "compress_model") -> list[list[str]]:
    """The shared-input groups of `modules` (`calibration.input_groups`) from the first of `batches`, moved to
    `device`, with the model in eval mode as calibration runs it (its modes restored afterwards). Fails on every rank
    when any rank has no batch, the message naming `what` (the caller)."""
    first = next(iter(batches), None)
    check_every_rank_has_batches(0 if first is None else 1, what, device)
    modes = module_modes(model)
    model.eval()
    try:
        return input_groups(model, modules, to_device(first, device), loss_fn)
    finally:
        restore_modes(modes)


def broadcast_object(value):
    """Rank 0's `value` on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_arguments(model, budgets, allocator, scope, rank_multiple, rho, weight_basis, stats_mode, damping,
                     energy, stats_dtype, compute_dtype, eig_method, head_names) -> None:
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
    if energy is not None:
        if allocator != "energy" or budgets != [None] or not 0.0 < energy <= 1.0:
            raise ValueError(f"energy={energy!r}: expected a spectral-energy fraction in (0, 1] with "
                             f"allocator='energy' (got {allocator!r}) and budget=None (got {budgets!r})")
    else:
        for value in budgets:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < float(value) <= 1.0:
                raise ValueError(f"budget={value!r}: expected a retained-parameter fraction in (0, 1]")
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple={rank_multiple!r}: expected a positive integer")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho}: expected a fraction in [0, 1]")
    if damping < 0:
        raise ValueError(f"damping={damping}: expected >= 0")
    for head in head_names:
        try:
            model.get_submodule(head)
        except AttributeError as err:
            raise ValueError(f"head module {head!r} not found in {type(model).__name__}") from err
