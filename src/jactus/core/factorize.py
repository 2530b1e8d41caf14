"""Module replacement in one place: target `nn.Linear` -> `FactorizedLinear` (or `LowRankLinear` structure)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .allocation import RankPlan
from .decompositions import Decompositions
from .freeze import KEEP_TRAINABLE, check_keep_trainable, train_cores
from .layers import FactorizedLinear, LowRankLinear
from .linalg import DEFAULT_DAMPING, check_choice
from .precision import trainable_dtype
from .progress import progress_bar
from .subspace import STATS_MODES, WEIGHT_BASES

METHODS = ("jactus", "svd")
LAYER_KINDS = {"factorized": FactorizedLinear, "lowrank": LowRankLinear}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def factorize(
    model: nn.Module,
    stats,
    plan: RankPlan | Mapping[str, int | None],
    method: str = "jactus",
    rho: float = 0.25,
    weight_basis: str = "whitened",
    stats_mode: str = "kfac",
    damping: float = DEFAULT_DAMPING,
    freeze: bool = True,
    keep_trainable: Sequence[str] = KEEP_TRAINABLE,
    head_names: Sequence[str] = (),
    progress: bool = True,
    compute_dtype: str | torch.dtype = "auto",
) -> nn.Module:
    """Replace every target with an int rank in `plan` by `FactorizedLinear(U, C, V, bias)`; `None` stays dense.

    method: `jactus` (task-aware union with `rho` task directions, projected core) or `svd` (the same with
    `rho = 0`: the truncated SVD of the weight in the `stats_mode` metric, the compress-then-adapt baselines).
    freeze=True: the freeze policy of `core.freeze.train_cores`: only the cores, and per `keep_trainable` the
    factorized layers' biases ("bias") and the norm layers ("norm": any module whose class name contains Norm), plus
    the `head_names` modules, train, in fp32. Everything else, LayerScale gammas included, is frozen: docs/METHOD.md
    keeps only norms and the head trainable besides the cores.
    Decompositions run in `compute_dtype` (see `Decompositions`). The model is changed in place and returned;
    `model.jactus_rank_map` records the ranks.
    """
    check_choice(method, METHODS, "method")
    check_choice(stats_mode, STATS_MODES, "stats_mode")
    check_keep_trainable(keep_trainable)
    ranks = dict(plan.ranks if isinstance(plan, RankPlan) else plan)
    modules = dict(model.named_modules())
    _check_names(ranks, modules, (nn.Linear,))
    decompositions = Decompositions(None if stats_mode == "none" else stats, stats_mode, damping,
                                    compute_dtype=compute_dtype)
    linears = {name: modules[name] for name, rank in ranks.items() if rank is not None}
    layers = build_layers(decompositions, linears, [ranks], 0.0 if method == "svd" else rho, weight_basis,
                          progress=progress)[0]
    return install_layers(model, layers, ranks, freeze, keep_trainable, head_names)


def build_layers(
    decompositions: Decompositions,
    linears: Mapping[str, nn.Linear],
    rank_maps: Sequence[Mapping[str, int | None]],
    rho: float = 0.25,
    weight_basis: str = "whitened",
    *,
    release: Callable[[list[str]], None] | None = None,
    park_on_cpu: bool = False,
    progress: bool = True,
    desc: str = "factorize",
    builder: Callable[[Decompositions, str, nn.Linear, int], nn.Module] | None = None,
    nested: bool = False,
    shared: Sequence[Sequence[str]] = (),
) -> list[dict[str, nn.Module]]:
    """The `FactorizedLinear` of each linear with an int rank, for each rank map (one decomposition per layer serves
    them all); the model is not changed. Goes one shared-input group at a time, releasing the group's decompositions
    (and calling `release(group)`) after it. `park_on_cpu`: build layers are moved to the CPU until they are used.
    The factors take the weight's dtype; the core and bias, which train, at least fp32 (`core.precision`).
    `builder(decompositions, name, linear, rank)`, when given, builds each layer instead (another compressed layer
    from the same decompositions, e.g. TuneComp's two-branch layer). `nested`: the default layers get nested bases
    (`union_subspace(nested=True)`: truncating them gives every smaller rank's factorization; docs/METHOD.md
    section 11). `shared`: groups of layers that read one input and share one input basis `V` (to which the rank
    maps give one rank; `subspace.factorize_group`, docs/METHOD.md section 3.3); not with `builder` or `nested`.
    """
    check_choice(weight_basis, WEIGHT_BASES, "weight_basis")
    if shared and (builder is not None or nested):
        raise ValueError("shared input bases build JACTUS's own layers, not nested bases or another builder's layers")
    sharing = {name: list(group) for group in shared for name in group}
    built: list[dict[str, FactorizedLinear]] = [{} for _ in rank_maps]

    bar = progress_bar(total=len(linears), desc=desc, disable=not progress, leave=False)
    for group in decompositions.groups(linears):
        for name in group:
            if name in sharing:
                if sharing[name][0] == name:
                    _build_shared(decompositions, sharing[name], linears, rank_maps, built, rho, weight_basis,
                                  park_on_cpu)
                bar.update()
                continue
            linear = linears[name]
            for layers, ranks in zip(built, rank_maps, strict=True):
                if ranks.get(name) is None:
                    continue
                with torch.no_grad():
                    if builder is not None:
                        layer = builder(decompositions, name, linear, ranks[name])
                    else:
                        layer = _factorized_layer(decompositions, name, linear, ranks[name], rho, weight_basis,
                                                  nested)
                layers[name] = layer.to("cpu") if park_on_cpu else layer
            bar.update()
        decompositions.release(group)
        if release is not None:
            release(group)
    bar.close()
    return built


def _build_shared(decompositions: Decompositions, group: list[str], linears: Mapping[str, nn.Linear],
                  rank_maps: Sequence[Mapping[str, int | None]], built: list[dict], rho: float, weight_basis: str,
                  park_on_cpu: bool) -> None:
    for layers, ranks in zip(built, rank_maps, strict=True):
        group_ranks = {ranks.get(name) for name in group}
        if len(group_ranks) != 1:
            raise ValueError(f"layers {group} share an input basis but the rank map gives them "
                             f"{[ranks.get(name) for name in group]}; expected one rank (or all dense)")
        rank = group_ranks.pop()
        if rank is not None:
            with torch.no_grad():
                new = _shared_layers(decompositions, group, linears, rank, rho, weight_basis)
            layers.update({name: layer.to("cpu") if park_on_cpu else layer for name, layer in new.items()})


def _factorized_layer(decompositions: Decompositions, name: str, linear: nn.Linear, rank: int, rho: float,
                      weight_basis: str, nested: bool = False) -> FactorizedLinear:
    U, core, V = decompositions.factorize_layer(name, linear.weight, rank, rho, weight_basis, nested)
    dtype = linear.weight.dtype
    bias = None if linear.bias is None else linear.bias.detach().to(trainable_dtype(dtype), copy=True)
    return FactorizedLinear(U.to(dtype), core.to(trainable_dtype(dtype)), V.to(dtype), bias)


def _shared_layers(decompositions: Decompositions, group: list[str], linears: Mapping[str, nn.Linear], rank: int,
                   rho: float, weight_basis: str) -> dict[str, FactorizedLinear]:
    """The group's `FactorizedLinear`s on one input basis: one `V` Parameter held by every member."""
    weights = [linears[name].weight for name in group]
    V, factors = decompositions.factorize_group(group, weights, rank, rho, weight_basis)
    dtype = weights[0].dtype
    layers = {}
    for name, (U, core) in zip(group, factors, strict=True):
        linear = linears[name]
        bias = None if linear.bias is None else linear.bias.detach().to(trainable_dtype(dtype), copy=True)
        layers[name] = FactorizedLinear(U.to(dtype), core.to(trainable_dtype(dtype)), V.to(dtype), bias)
    _tie(list(layers.values()))
    return layers


def install_layers(
    model: nn.Module,
    layers: Mapping[str, FactorizedLinear],
    ranks: Mapping[str, int | None],
    freeze: bool = True,
    keep_trainable: Sequence[str] = KEEP_TRAINABLE,
    head_names: Sequence[str] = (),
) -> nn.Module:
    """Swap `layers` into `model` (each onto the device of the linear it replaces); with `freeze`, apply the freeze
    policy `core.freeze.train_cores`. `model.jactus_rank_map` is updated with `ranks`."""
    check_keep_trainable(keep_trainable)
    for name, layer in layers.items():
        _set_module(model, name, layer.to(model.get_submodule(name).weight.device))
    if freeze:
        train_cores(model, head_names, keep_trainable)
    model.jactus_rank_map = {**getattr(model, "jactus_rank_map", {}), **dict(ranks)}
    return model


def fold_factorized(model: nn.Module) -> nn.Module:
    """Replace every `FactorizedLinear` by its deployed `LowRankLinear` (the core folded into the left factor);
    layers that share one `V` share one `down`."""
    for name, folded in fold_layers(model.named_modules()).items():
        model.set_submodule(name, folded)
    return model


def fold_layers(named_modules) -> dict[str, LowRankLinear]:
    """The deployed `LowRankLinear` of each `FactorizedLinear` among `(name, module)` pairs (the model unchanged);
    layers that share one `V` get one `down`."""
    downs: dict[int, nn.Linear] = {}
    folded = {}
    for name, module in list(named_modules):
        if isinstance(module, FactorizedLinear):
            folded[name] = module.fold(downs.get(id(module.V)))
            downs.setdefault(id(module.V), folded[name].down)
    return folded


def _check_names(ranks: Mapping[str, int | None], modules: Mapping[str, nn.Module], kinds: tuple) -> None:
    missing = [name for name in ranks if name not in modules]
    if missing:
        linears = [n for n, m in modules.items() if isinstance(m, (nn.Linear, FactorizedLinear, LowRankLinear))]
        raise ValueError(f"rank map names {missing[:5]} are not modules of this model; linear layers: {linears[:8]}")
    wrong = [f"{name} ({type(modules[name]).__name__})" for name, rank in ranks.items()
             if not isinstance(modules[name], kinds)]
    if wrong:
        raise ValueError(f"rank map layers {wrong[:5]} are not {'/'.join(k.__name__ for k in kinds)}")
    bad = [f"{name}={rank!r}" for name, rank in ranks.items() if rank is not None and (
        not isinstance(rank, int) or rank < 1)]
    if bad:
        raise ValueError(f"ranks must be positive integers or None (dense): {bad[:5]}")


def apply_rank_map(
    model: nn.Module,
    rank_map: Mapping[str, int | None],
    layer_cls: type[nn.Module] | str = FactorizedLinear,
    shared: Sequence[Sequence[str]] = (),
) -> nn.Module:
    """Structure only: each `nn.Linear` with an int rank becomes an empty (zero) `layer_cls` of that rank.

    `layer_cls`: `FactorizedLinear` / `"factorized"` (training form, to resume a checkpoint) or `LowRankLinear` /
    `"lowrank"` (deployed form, to load a compact file). New layers live on the linear's device and dtype (the meta
    device included). A layer already of `layer_cls` with the same rank is left alone. `None` entries stay dense.
    `shared`: groups of layers with one input basis (`tie_shared_bases`); their rank may reach the input width.
    """
    if isinstance(layer_cls, str):
        if layer_cls not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {layer_cls!r}; valid: {', '.join(LAYER_KINDS)}")
        layer_cls = LAYER_KINDS[layer_cls]
    if layer_cls not in LAYER_KINDS.values():
        raise ValueError(f"layer_cls={layer_cls!r}: expected FactorizedLinear or LowRankLinear")
    modules = dict(model.named_modules())
    _check_names(rank_map, modules, (nn.Linear, layer_cls))
    wide = {name for group in shared for name in group}
    for name, rank in rank_map.items():
        module = modules[name]
        if rank is None:
            if not isinstance(module, nn.Linear):
                raise ValueError(f"rank map keeps {name!r} dense but the model holds a {type(module).__name__}")
            continue
        if isinstance(module, layer_cls):
            if module.rank != rank:
                raise ValueError(f"{name!r} already has rank {module.rank}, the rank map asks for {rank}")
            continue
        weight = module.weight
        limit = module.in_features if name in wide else min(module.in_features, module.out_features)
        if rank > limit:
            raise ValueError(f"rank {rank} of {name!r} exceeds {'in' if name in wide else 'min(in, out)'} = {limit}")
        kwargs = {"bias": module.bias is not None, "device": weight.device, "dtype": weight.dtype}
        if layer_cls is FactorizedLinear:
            layer = FactorizedLinear.empty(module.in_features, module.out_features, rank, **kwargs)
        else:
            layer = LowRankLinear(module.in_features, module.out_features, rank, **kwargs)
            if weight.device.type != "meta":
                with torch.no_grad():
                    for param in layer.parameters():
                        param.zero_()
        _set_module(model, name, layer)
    tie_shared_bases(model, shared)
    model.jactus_rank_map = {**getattr(model, "jactus_rank_map", {}), **dict(rank_map)}
    return model


def tie_shared_bases(model: nn.Module, groups: Sequence[Sequence[str]]) -> None:
    """Make each group's layers hold one input basis: the first layer's `V` (`FactorizedLinear`) or `down`
    (`LowRankLinear`) becomes every other member's."""
    for group in groups:
        layers = [model.get_submodule(name) for name in group]
        kinds = {type(layer) for layer in layers}
        if len(kinds) != 1 or not kinds <= {FactorizedLinear, LowRankLinear} or len(
                {(layer.in_features, layer.rank) for layer in layers}) != 1:
            found = [f"{name}: {type(layer).__name__} in {layer.in_features}, rank {getattr(layer, 'rank', None)}"
                     for name, layer in zip(group, layers, strict=True)]
            raise ValueError(f"shared input basis {list(group)}: expected low-rank layers of one kind with one input "
                             f"width and rank; found {found}")
        _tie(layers)


def _tie(layers: Sequence[nn.Module]) -> None:
    """The first layer's `V` (`FactorizedLinear`) or `down` (`LowRankLinear`) becomes every other layer's, and each
    knows how many hold it (they project an input once between them)."""
    for layer in layers:
        if isinstance(layer, FactorizedLinear):
            layer.V = layers[0].V
        else:
            layer.down = layers[0].down
        layer.shared_members = len(layers)
