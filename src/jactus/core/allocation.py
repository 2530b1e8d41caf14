"""Global rank allocation (docs/METHOD.md section 4).

Every allocator works on the spectra of the whitened weights `M_l` (`s_{l,j}^2` is the drop of the K-FAC proxy when
rank j of layer l is kept), computed once per `plan_ranks` call (or given to it), however many budgets are asked for.

Ranks move in units of `rank_multiple`; every factorized layer keeps at least one unit. A layer whose rank would reach
`floor(m n / (m + n))` is kept dense (`None`): a low-rank pair would not be smaller.

Nested plans (`nested=True`, docs/METHOD.md section 11): the marginal-gain greedy runs once, at the largest budget, and
records the steps it takes, in order (one unit of `rank_multiple` ranks, or a layer's switch to dense). A smaller
budget replays that sequence under its own limit with the greedy's own rule (a step that does not fit retires its
layer), so it keeps a subset of the largest plan's steps: every layer's rank at a smaller budget is at most its rank at
a larger one, in the same units of `rank_multiple`, and a layer dense at a smaller budget is dense at every larger one
(dense is a layer's last step). The converse does not hold: a layer dense at the largest budget may stay factorized at
a smaller one (its dense step did not fit), at the rank its last taken unit step gave. The replay equals the
independent greedy at the smaller budget unless a step the largest plan could not afford (so it is not in the
sequence) would fit the smaller one; the nested plan then leaves that step out and stays within its budget.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .decompositions import Decompositions
from .linalg import DEFAULT_DAMPING, check_choice
from .params import count_params, dense_rank_limit, linear_cost
from .subspace import STATS_MODES
from .targets import find_targets

ALLOCATORS = ("marginal_gain", "uniform", "energy")
# the allocators that meet a retained-parameter budget from any spectra (energy is CERSA's per-layer energy rule)
BUDGET_ALLOCATORS = ("marginal_gain", "uniform")
SCOPES = ("model", "targets")


@dataclass
class RankPlan:
    """Ranks per target (`None` = dense) and the parameter accounting that produced them."""

    ranks: dict[str, int | None]
    params_original: int
    params_deployed: int
    ratio: float
    budget: float | None
    scope: str
    allocator: str
    stats_mode: str = "kfac"
    rank_multiple: int = 8
    energy: float | None = None
    # per target, the spectral energy of its whitened weight beyond its rank (0 where dense): with stats_mode=kfac the
    # K-FAC proxy of the loss increase the plan predicts for that layer, what the allocator trades against parameters
    # (docs/METHOD.md section 4); None in plans saved before it was recorded. A diagnostic, not part of a plan's
    # identity: plans with the same ranks compare equal whatever the rounding of their spectra
    residual: dict[str, float] | None = field(default=None, compare=False)
    # groups of targets that share one input basis (docs/METHOD.md section 3.3): one rank for the group, priced at
    # n + sum m_i parameters a unit; a group's residual is recorded on its first layer (0 on the others)
    shared: list[list[str]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> RankPlan:
        data = dict(data)
        data["ranks"] = {name: None if rank is None else int(rank) for name, rank in data["ranks"].items()}
        return cls(**data)


@dataclass
class _Layer:
    """One unit of the allocation: a target, or a group of targets sharing an input basis (`members`, the first
    one's name as `name`, `out_features` the sum of theirs, `bias_params` their bias parameters)."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    gains: torch.Tensor  # s^2, descending, fp64 on CPU
    members: tuple[str, ...] = ()
    bias_params: int = 0

    def cost(self, rank: int | None) -> int:
        if self.members:
            return linear_cost(self.in_features, self.out_features, rank, False) + self.bias_params
        return linear_cost(self.in_features, self.out_features, rank, self.bias)

    @property
    def limit(self) -> int:
        return dense_rank_limit(self.in_features, self.out_features)

    def residual(self, rank: int | None) -> float:
        """The whitened weight's energy beyond `rank` (what the proxy loses at that rank; 0 when dense)."""
        return 0.0 if rank is None else float(self.gains[rank:].sum())

    def snap(self, rank: int | None, multiple: int) -> int | None:
        """At least one unit of `multiple`; dense from `floor(m n / (m + n))` on."""
        if rank is None:
            return None
        rank = max(rank, multiple)
        return None if rank >= self.limit else rank


def layer_spectra(model: nn.Module, stats, stats_mode: str = "kfac", damping: float = DEFAULT_DAMPING,
                  targets: Sequence[str] | None = None, compute_dtype: str | torch.dtype = "auto",
                  shared: Sequence[Sequence[str]] = ()) -> dict[str, torch.Tensor]:
    """Singular values of each target's whitened weight (float64, CPU, descending), one shared-input group at a time.

    Only the values are computed (`eigvalsh` of the smaller Gram matrix, `subspace.whitened_svd`). Each group of
    `shared` (layers with one input basis) gets one entry, under its first layer's name: the values of its stacked
    whitened weights (`subspace.stacked_whitened_svd`); its other layers get none.
    """
    modules = _targets(model, stats, targets)
    decompositions = Decompositions(stats, stats_mode, damping, compute_dtype=compute_dtype)
    sharing = {name: list(group) for group in shared for name in group}
    spectra = {}
    for group in decompositions.groups(modules):
        for name in group:
            values = unit_spectrum(decompositions, name, modules, sharing)
            if values is not None:
                spectra[name] = values
        decompositions.release(group)
    return {name: spectra[name] for name in modules if name in spectra}


def unit_spectrum(decompositions: Decompositions, name: str, modules: Mapping[str, nn.Linear],
                  sharing: Mapping[str, Sequence[str]], keep: bool = False) -> torch.Tensor | None:
    """What the allocator reads for target `name`: its whitened weight's singular values, the stacked ones of the
    shared-basis group it leads (`sharing`: member -> its group), or None for a group's other members. `keep`: as
    `Decompositions.spectrum`."""
    group = sharing.get(name)
    if group is None:
        return decompositions.spectrum(name, modules[name].weight, keep=keep)
    if group[0] != name:
        return None
    return decompositions.group_spectrum(list(group), [modules[member].weight for member in group], keep=keep)


def _targets(model: nn.Module, stats, targets: Sequence[str] | None) -> dict[str, nn.Linear]:
    if targets is not None:
        return find_targets(model, targets)
    if stats is None:
        return find_targets(model)
    return _linears(model, stats.layers, "calibrated layers")


def _linears(model: nn.Module, names, what: str) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    missing = [name for name in names if not isinstance(modules.get(name), nn.Linear)]
    if missing:
        raise ValueError(f"{what} {missing[:5]} are not nn.Linear modules of this model")
    return {name: modules[name] for name in names}


def _check_spectra(spectra: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Linear],
                   shared: Mapping[str, list[str]]) -> None:
    for name, values in spectra.items():
        group = shared.get(name, [name])
        if group[0] != name:
            raise ValueError(f"spectra[{name!r}]: {name!r} shares the input basis of {group[0]!r}, whose entry holds "
                             f"the group's spectrum; give none for {name!r}")
        size = min(modules[name].in_features, sum(modules[member].out_features for member in group))
        if not torch.is_tensor(values) or tuple(values.shape) != (size,):
            shape = tuple(values.shape) if torch.is_tensor(values) else type(values).__name__
            what = "layer's whitened weight" if len(group) == 1 else "group's stacked whitened weights"
            raise ValueError(f"spectra[{name!r}] has shape {shape}; expected ({size},), the singular values of the "
                             f"{what}")


def plan_ranks(
    model: nn.Module,
    stats,
    budget: float | Sequence[float] | None,
    allocator: str = "marginal_gain",
    scope: str = "model",
    rank_multiple: int = 8,
    stats_mode: str = "kfac",
    damping: float = DEFAULT_DAMPING,
    energy: float | None = None,
    targets: Sequence[str] | None = None,
    spectra: Mapping[str, torch.Tensor] | None = None,
    compute_dtype: str | torch.dtype = "auto",
    nested: bool = False,
    shared: Sequence[Sequence[str]] = (),
) -> RankPlan | list[RankPlan]:
    """Ranks meeting `budget` = deployed / original parameters (a list of budgets -> a list of plans).

    scope=model counts every parameter of the model (non-target parameters on both sides, tied ones once);
    scope=targets only the target linears. With `allocator="energy"` and a given `energy`, the ranks keep that
    fraction of each layer's spectral energy and the budget is not enforced (the plan reports the ratio it gives).
    `spectra`: precomputed `layer_spectra` (name -> singular values), e.g. gathered pass by pass by
    `compress_model`; its layers are the targets and `stats` is not read (may be None). Otherwise the spectra are
    computed from `stats` (decompositions in `compute_dtype`, see `Decompositions`).
    `nested=True`: the plans of a list of budgets nest (module docstring): each smaller budget keeps a subset of the
    largest budget's rank steps. The uniform and energy allocators nest by construction (their ranks grow with one
    knob); for marginal_gain the smaller plans replay the largest plan's steps.
    `shared`: groups of targets that share one input basis (docs/METHOD.md section 3.3); each group is one unit of
    the allocation, its rank the same for all its layers, its gains the stacked spectrum (`layer_spectra(shared=)`,
    or `spectra` under the group's first layer), its cost per rank `n + sum m_i`; a group is dense as a whole.
    """
    check_choice(allocator, ALLOCATORS, "allocator")
    check_choice(stats_mode, STATS_MODES, "stats_mode")
    check_choice(scope, SCOPES, "scope")
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple={rank_multiple!r}: expected a positive integer")
    if energy is not None and (allocator != "energy" or not 0.0 < energy <= 1.0):
        raise ValueError(f"energy={energy!r} needs allocator='energy' (got {allocator!r}) and a value in (0, 1]")
    budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget]
    if energy is None:
        for value in budgets:
            if value is None or not 0.0 < float(value) <= 1.0:
                raise ValueError(f"budget={value!r}: expected a retained-parameter fraction in (0, 1]")

    shared = [list(group) for group in shared if len(group) > 1]
    groups = {name: group for group in shared for name in group}
    if len(groups) != sum(len(group) for group in shared):
        raise ValueError(f"shared={shared}: a layer may be in one shared-basis group only")
    if spectra is None:
        spectra = layer_spectra(model, stats, stats_mode, damping, targets, compute_dtype, shared)
        modules = _targets(model, stats, targets)
    else:
        modules = _linears(model, [*spectra, *groups], "layers of `spectra` and `shared`")
        _check_spectra(spectra, modules, groups)
    missing = [name for name in groups if name not in modules]
    if missing:
        raise ValueError(f"shared groups name {missing[:5]}, which are not targets of this plan")
    layers = [_unit(name, groups.get(name, [name]), modules, spectra[name]) for name in spectra]
    target_params = sum(layer.cost(None) for layer in layers)
    original = count_params(model) if scope == "model" else target_params
    fixed = original - target_params  # parameters outside the targets, unchanged by the plan

    smallest = fixed + sum(layer.cost(layer.snap(rank_multiple, rank_multiple)) for layer in layers)
    steps = None  # the largest budget's greedy steps, replayed by the smaller budgets of a nested marginal-gain plan
    if nested and energy is None and allocator == "marginal_gain":
        steps = _marginal_gain_steps(layers, fixed, max(float(v) for v in budgets) * original, rank_multiple)
    plans = []
    for value in budgets:
        if energy is not None:
            ranks = _energy_ranks(layers, energy, rank_multiple)
        else:
            limit = float(value) * original
            if smallest > limit:
                raise ValueError(f"budget={value} is not achievable: with scope={scope!r} the retained fraction "
                                 f"ranges over [{smallest / original:.4f}, 1.0] (every target at rank "
                                 f"{rank_multiple}, or dense where that would not save)")
            if steps is not None:
                ranks = _replay(layers, fixed, limit, rank_multiple, steps)
            else:
                ranks = _ALLOCATE[allocator](layers, fixed, limit, rank_multiple)
        deployed = fixed + sum(layer.cost(ranks[layer.name]) for layer in layers)
        residual = {layer.name: layer.residual(ranks[layer.name]) for layer in layers}
        for layer in layers:
            for member in layer.members[1:]:
                ranks[member], residual[member] = ranks[layer.name], 0.0
        plans.append(RankPlan(ranks={name: ranks[name] for name in modules}, params_original=original,
                              params_deployed=deployed, ratio=deployed / original,
                              budget=None if value is None else float(value), scope=scope, allocator=allocator,
                              stats_mode=stats_mode, rank_multiple=rank_multiple, energy=energy,
                              residual={name: residual[name] for name in modules}, shared=shared or None))
    return plans if isinstance(budget, (list, tuple)) else plans[0]


def _unit(name: str, group: list[str], modules: Mapping[str, nn.Linear], values: torch.Tensor) -> _Layer:
    """The allocation unit of a target, or of the shared-basis group it leads."""
    gains = values.to("cpu", torch.float64) ** 2
    module = modules[name]
    if len(group) == 1:
        return _Layer(name, module.out_features, module.in_features, module.bias is not None, gains)
    layers = [modules[member] for member in group]
    return _Layer(name, sum(layer.out_features for layer in layers), module.in_features, False, gains,
                  members=tuple(group),
                  bias_params=sum(layer.out_features for layer in layers if layer.bias is not None))


def _marginal_gain(layers: list[_Layer], fixed: int, limit: float, multiple: int) -> dict[str, int | None]:
    """Greedy by gain per deployed parameter, one unit of `multiple` ranks at a time (`_marginal_gain_steps`)."""
    return _replay(layers, fixed, limit, multiple, _marginal_gain_steps(layers, fixed, limit, multiple))


def _initial_ranks(layers: list[_Layer], multiple: int) -> dict[str, int | None]:
    return {layer.name: layer.snap(multiple, multiple) for layer in layers}


def _marginal_gain_steps(layers: list[_Layer], fixed: int, limit: float,
                         multiple: int) -> list[tuple[int, int, int | None]]:
    """The steps `(layer index, cost, new rank or None = dense)` the greedy takes, in the order it takes them.

    Within a layer the unit gains (sums of `s^2`) do not increase and the unit cost `multiple * (m + n)` is fixed,
    so this is a global sort of unit gains per cost; the last step of a layer is the switch to dense (gain: all the
    remaining energy, cost: `m n - (m + n) r`), which is where the greedy is no longer a plain global sort. A step
    that does not fit retires its layer (it never fits later: the remaining budget only shrinks), so the plan ends
    within one step of the budget.
    """
    ranks = _initial_ranks(layers, multiple)
    deployed = fixed + sum(layer.cost(ranks[layer.name]) for layer in layers)
    heap: list[tuple[float, int, int, int | None]] = []
    steps: list[tuple[int, int, int | None]] = []

    def push(index: int) -> None:
        layer = layers[index]
        rank = ranks[layer.name]
        if rank is None:
            return
        step = layer.snap(rank + multiple, multiple)
        gain = float(layer.gains[rank:step].sum()) if step is not None else float(layer.gains[rank:].sum())
        cost = layer.cost(step) - layer.cost(rank)
        heapq.heappush(heap, (-gain / cost, index, cost, step))

    for index in range(len(layers)):
        push(index)
    while heap:
        _, index, cost, step = heapq.heappop(heap)
        if deployed + cost > limit:
            continue
        ranks[layers[index].name] = step
        deployed += cost
        steps.append((index, cost, step))
        push(index)
    return steps


def _replay(layers: list[_Layer], fixed: int, limit: float, multiple: int,
            steps: list[tuple[int, int, int | None]]) -> dict[str, int | None]:
    """The ranks after taking `steps` in order under `limit`: a step that does not fit retires its layer (the
    greedy's rule), so a layer's steps are taken as a prefix of its own."""
    ranks = _initial_ranks(layers, multiple)
    deployed = fixed + sum(layer.cost(ranks[layer.name]) for layer in layers)
    retired: set[int] = set()
    for index, cost, step in steps:
        if index in retired:
            continue
        if deployed + cost > limit:
            retired.add(index)
            continue
        ranks[layers[index].name] = step
        deployed += cost
    return ranks


def _uniform(layers: list[_Layer], fixed: int, limit: float, multiple: int) -> dict[str, int | None]:
    """The same retained parameter fraction `f` for every layer: `r = f m n / (m + n)`, floored to the multiple."""

    def ranks_at(fraction: float) -> dict[str, int | None]:
        return {layer.name: layer.snap(int(fraction * layer.in_features * layer.out_features
                                           / (layer.in_features + layer.out_features)) // multiple * multiple,
                                       multiple) for layer in layers}

    return _largest_within(ranks_at, layers, fixed, limit)


def _energy_rank(layer: _Layer, energy: float, multiple: int) -> int | None:
    total = float(layer.gains.sum())
    if total <= 0:
        return layer.snap(multiple, multiple)
    kept = torch.cumsum(layer.gains, 0) / total
    rank = int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1
    return layer.snap(-(-rank // multiple) * multiple, multiple)


def _energy_ranks(layers: list[_Layer], energy: float, multiple: int) -> dict[str, int | None]:
    return {layer.name: _energy_rank(layer, energy, multiple) for layer in layers}


def _energy(layers: list[_Layer], fixed: int, limit: float, multiple: int) -> dict[str, int | None]:
    """The largest spectral-energy fraction (CERSA-style, the same for every layer) whose ranks meet the budget."""
    return _largest_within(lambda e: _energy_ranks(layers, e, multiple), layers, fixed, limit)


def _largest_within(ranks_at, layers: list[_Layer], fixed: int, limit: float, iterations: int = 60):
    """Bisection for the largest knob in [0, 1] whose (monotone) deployed size is within `limit`."""

    def deployed(ranks) -> int:
        return fixed + sum(layer.cost(ranks[layer.name]) for layer in layers)

    if deployed(ranks_at(1.0)) <= limit:
        return ranks_at(1.0)
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if deployed(ranks_at(middle)) <= limit:
            low = middle
        else:
            high = middle
    return ranks_at(low)


_ALLOCATE = {"marginal_gain": _marginal_gain, "uniform": _uniform, "energy": _energy}
