"""TuneComp (distill-and-prune): a decaying dense teacher branch, a low-rank student pruned to the budget.

Decisions where the method's description is silent (each a knob):
- t = step + 1, so the last of the T training steps runs with a_T = 0 (pure student).
- Target ranks come from the budget plan (`allocator`, input-whitened spectra, `stats_mode=input`); the student starts
  at `ceil(init_rank_factor * r)` (capped at min(m, n)) with the whitened-SVD (SVD-LLM) initialisation.
- Group lasso: weight `group_lasso_weight * (1 - p_t)`, `p_t` the pruning progress (0 before `prune_start`, 1 after
  `prune_end`, as fractions of T); the penalty is the mean group norm over the kept components.
- Hard shrinkage: at `prune_events` evenly spaced points of [prune_start, prune_end] the deployed size is brought to
  a cubic schedule from the initial size down to `budget * original` by removing the components with the smallest
  output energy per parameter cost, ||b_j||^2 E[(a_j . x)^2] / (m + n), ranked globally (the marginal-gain rule);
  E[(a_j . x)^2] is a running mean over training inputs (initialised from the calibration covariance) and is
  averaged across processes before each pruning, so every rank prunes the same components.
- Trainable: the student factors and bias, norms and task heads (JACTUS's policy with the student in place of its
  cores), in fp32; the teacher (the original linear itself, not a copy) and everything else are frozen.
- Logit distillation (`distill.weight` > 0) uses the teacher branch rather than a cache (docs/METHOD.md section 9): the
  teacher's logits are the same model's with every layer at a_t = 1, i.e. the dense layers with the current norms
  and head, one extra no-grad forward per step.
- The group lasso joins the task loss in `training_step` (`loss_terms`), so loss scaling and gradient accumulation
  treat it like the task loss. Pruning reads and zeroes whole factor columns on every rank: under FSDP, which shards
  them, TuneComp is refused (`shardable = False`); DDP is fine.

Per target layer the model computes

    y = a_t (W0 x + b0) + sqrt(1 - a_t^2) (B (mask * A x) + b),      a_t = max(0, 1 - sin(pi t / 2T)),

with the dense teacher `W0, b0` frozen and the student `B A` (a low-rank factorization whose rank components are
pruned by `mask`) trained; at `a_T = 0` only the student remains and the layer is deployed as `LowRankLinear`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..core import BUDGET_ALLOCATORS, SCOPES, LowRankLinear, compress_model, count_params, find_targets
from ..core.byte_budget import check_unit
from ..core.decompositions import Decompositions
from ..core.params import linear_cost
from ..core.precision import trainable_dtype
from ..core.subspace import Metric, weight_bases, whitened_svd
from .base import CalibSettings, Method, MethodContext, check_budget, check_positive, choice, register, set_trainable
from .compress_then_adapt import calibration_batches


# ---- the math (plain PyTorch) ----------------------------------------------------------------------------------
def teacher_weight(step: int, max_steps: int) -> float:
    """a_t = max(0, 1 - sin(pi t / 2T)): 1 at t = 0, 0 from t = T on."""
    if max_steps <= 0:
        raise ValueError(f"max_steps={max_steps}: TuneComp's schedule needs a positive number of training steps")
    t = min(max(step, 0), max_steps)
    return max(0.0, 1.0 - math.sin(math.pi * t / (2 * max_steps)))


def whitened_low_rank(weight: torch.Tensor, metric: Metric, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation-aware rank-`rank` factors `B (m x k)`, `A (k x n)` of `W`, minimising ||(W - B A) Lx||_F.

    The SVD of the whitened weight `W Lx = U S V^T` (`Sx = Lx Lx^T`, SVD-LLM) is truncated and mapped back,
    with the singular values split evenly: `B = U sqrt(S)`, `A = sqrt(S) V^T Lx^{-1}`. Returns `(B, A, s)`; for each
    component the input energy `a_j^T Sx a_j` is `s_j` and the output energy `||b_j||^2 a_j^T Sx a_j` is `s_j^2`."""
    svd = whitened_svd(weight, metric)
    left, right = weight_bases(weight, metric, svd)  # U and Lx^{-T} V
    scale = svd.values[:rank].sqrt()
    up = left[:, :rank] * scale
    right = right[:, :rank] * scale
    dtype = trainable_dtype(weight.dtype)  # the student trains: fp32 on a half-precision weight
    return up.to(dtype), right.T.to(dtype), svd.values[:rank]


class TwoBranchLinear(nn.Module):
    """A frozen dense teacher and a trainable, prunable low-rank student, mixed by the teacher weight `a_t`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, energy_momentum: float = 0.99,
                 teacher: nn.Linear | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank={rank}: a two-branch layer needs at least one rank component")
        self.in_features, self.out_features = in_features, out_features
        self.teacher = teacher if teacher is not None else nn.Linear(in_features, out_features, bias=bias)
        self.teacher.requires_grad_(False)
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)
        # 1 for a kept rank component, 0 for a pruned one; pruned components take no part in forward or backward.
        self.register_buffer("mask", torch.ones(rank))
        # Running mean of each component's squared activation (a_j . x)^2: its output energy is ||b_j||^2 times this.
        self.register_buffer("component_energy", torch.ones(rank))
        self.energy_momentum = energy_momentum
        self.teacher_weight = 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, metric: Metric | None = None) -> TwoBranchLinear:
        """The teacher is `linear` itself (frozen, not copied); the student, in fp32 for a half-precision `linear`
        (`core.precision`), starts as its whitened rank-`rank` approximation under `metric` (zeros without one:
        structure only, for a checkpoint about to be loaded)."""
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, teacher=linear)
        device, dtype = linear.weight.device, trainable_dtype(linear.weight.dtype)
        layer.down.to(device=device, dtype=dtype)
        layer.up.to(device=device, dtype=dtype)
        layer.mask = layer.mask.to(device)
        layer.component_energy = layer.component_energy.to(device)
        with torch.no_grad():
            if linear.bias is not None:
                layer.up.bias.copy_(linear.bias)
            if metric is None:
                layer.up.weight.zero_()
                layer.down.weight.zero_()
            else:
                up, down, input_energy = whitened_low_rank(linear.weight, metric, rank)
                layer.up.weight.copy_(up)
                layer.down.weight.copy_(down)
                layer.component_energy.copy_(input_energy)
        return layer

    @property
    def rank(self) -> int:
        return self.mask.numel()

    @property
    def active_rank(self) -> int:
        return int(self.mask.sum().item())

    def component_importance(self) -> torch.Tensor:
        """Output energy of each rank component, ||b_j|| * sqrt(E[(a_j . x)^2]); pruned components score 0."""
        return self.up.weight.detach().norm(dim=0) * self.component_energy.clamp_min(0).sqrt() * self.mask

    def group_norms(self) -> torch.Tensor:
        """Group-lasso norms of the kept components: sqrt(||b_j||^2 + ||a_j||^2) (column j of B, row j of A)."""
        squared = self.up.weight.pow(2).sum(dim=0) + self.down.weight.pow(2).sum(dim=1)
        return squared.clamp_min(1e-24).sqrt() * self.mask

    @torch.no_grad()
    def prune(self, components: Iterable[int]) -> None:
        index = torch.as_tensor(list(components), dtype=torch.long, device=self.mask.device)
        self.mask[index] = 0
        self.up.weight[:, index] = 0
        self.down.weight[index] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher_weight == 1.0:  # the teacher alone (step 0; distillation's teacher pass): no student stats
            return self.teacher(x)
        # The student may be fp32 on a bf16 teacher (core.precision); autocast casts anyway, plain runs need this.
        hidden = self.down(x.to(self.down.weight.dtype))
        if self.training:
            with torch.no_grad():
                energy = hidden.detach().float().pow(2).reshape(-1, hidden.shape[-1]).mean(dim=0)
                self.component_energy.lerp_(energy.to(self.component_energy.dtype), 1.0 - self.energy_momentum)
        student = self.up(hidden * self.mask.to(hidden.dtype)).to(x.dtype)
        a = self.teacher_weight
        if a == 0.0:
            return student
        return a * self.teacher(x) + math.sqrt(1.0 - a * a) * student

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"active_rank={self.active_rank}, teacher_weight={self.teacher_weight:.4f}")


def deployed_cost(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    """Parameters of the deployed layer: (m + n) r as a low-rank pair, or m n when that would not save (dense)."""
    dense = (in_features + out_features) * rank >= in_features * out_features
    return linear_cost(in_features, out_features, None if dense else rank, bias)


def select_prunable(layers: dict[str, TwoBranchLinear], params_now: int, params_target: int) -> dict[str, list[int]]:
    """The weakest rank components, ranked globally by importance^2 per parameter cost (m + n), whose removal brings
    the deployed parameters to `params_target` or just below; every layer keeps at least one component."""
    candidates = []
    for name, layer in layers.items():
        cost = layer.in_features + layer.out_features
        scores = layer.component_importance().pow(2) / cost
        active = layer.mask.nonzero().flatten().tolist()
        for j in active:
            candidates.append((scores[j].item(), name, j))
    candidates.sort()
    active_ranks = {name: layer.active_rank for name, layer in layers.items()}
    chosen: dict[str, list[int]] = {}
    for _, name, j in candidates:
        if params_now <= params_target:
            break
        if active_ranks[name] <= 1:
            continue
        layer = layers[name]
        bias = layer.up.bias is not None
        rank = active_ranks[name]
        params_now -= deployed_cost(layer.in_features, layer.out_features, rank, bias) - deployed_cost(
            layer.in_features, layer.out_features, rank - 1, bias
        )
        active_ranks[name] = rank - 1
        chosen.setdefault(name, []).append(j)
    return chosen


def group_lasso(layers: Sequence[TwoBranchLinear]) -> torch.Tensor:
    """Mean group norm over every kept rank component (a size-independent scale for the penalty weight)."""
    norms = [layer.group_norms() for layer in layers]
    kept = sum(layer.mask.sum() for layer in layers)
    return torch.cat(norms).sum() / kept.clamp_min(1)


# ---- the method -------------------------------------------------------------------------------------------------
def two_branch_layers(model: nn.Module) -> dict[str, TwoBranchLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, TwoBranchLinear)}


@register("tunecomp")
class TuneComp(Method):
    compresses = True
    shardable = False
    own_teacher = True  # distillation from the teacher branch (docs/METHOD.md section 9)

    def __init__(
        self,
        budget: float = 0.8,
        scope: str = "model",
        allocator: str = "marginal_gain",
        rank_multiple: int = 8,
        init_rank_factor: float = 1.5,
        group_lasso_weight: float = 1e-2,
        prune_start: float = 0.1,
        prune_end: float = 0.7,
        prune_events: int = 10,
        damping: float = 1e-2,
        targets: Sequence[str] | None = None,
        mask_key: str = "attention_mask",
        calib: Mapping | None = None,
        unit: str = "params",
    ):
        self._budget = check_budget(budget, "tunecomp")
        self.unit = check_unit(unit)
        self.params_budget_ratio = self._budget  # the budget in parameters (budget.unit=bytes: set by apply)
        self.scope = choice(scope, SCOPES, "budget.scope")
        self.allocator = choice(allocator, BUDGET_ALLOCATORS, "allocator")
        self.rank_multiple = check_positive(rank_multiple, "allocator.rank_multiple")
        if init_rank_factor < 1.0:
            raise ValueError(f"method.init_rank_factor={init_rank_factor!r}: expected >= 1 (the student starts above "
                             f"the target ranks), e.g. 1.5")
        if group_lasso_weight < 0:
            raise ValueError(f"method.group_lasso_weight={group_lasso_weight!r}: expected >= 0")
        if not 0.0 <= prune_start < prune_end <= 1.0:
            raise ValueError(f"method.prune_start={prune_start!r}, method.prune_end={prune_end!r}: expected "
                             f"0 <= prune_start < prune_end <= 1 (fractions of the training steps)")
        if damping < 0:
            raise ValueError(f"calib.damping={damping!r}: expected >= 0")
        self.init_rank_factor = float(init_rank_factor)
        self.group_lasso_weight = float(group_lasso_weight)
        self.prune_start, self.prune_end = float(prune_start), float(prune_end)
        self.prune_events = check_positive(prune_events, "method.prune_events")
        self.damping = float(damping)
        self.targets = list(targets) if targets else None
        self.mask_key = mask_key
        self.calib = CalibSettings.from_config(calib)
        self.head_names: list[str] = []
        self.target_ranks: dict[str, int | None] = {}
        self.init_ranks: dict[str, int] = {}
        self.params_original: int | None = None
        self.params_fixed: int | None = None  # deployed parameters outside the two-branch layers (scope-aware)
        self.lasso_scale = 0.0

    @property
    def budget(self) -> float:
        return self._budget

    # ---- preparation -----------------------------------------------------------------------------------------
    def apply(self, ctx: MethodContext) -> nn.Module:
        batches = calibration_batches(ctx.calibration_batches, self.name)
        targets = find_targets(ctx.model, self.targets)
        dense = {name: linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)
                 for name, linear in targets.items()}
        params_model = count_params(ctx.model)
        self.head_names = list(ctx.head_names)
        self.init_ranks = {}
        # The bounded driver plans the target ranks from the input-whitened spectra and builds each two-branch
        # layer from the same decompositions (SVD-LLM initialisation at the larger initial rank).
        self.params_budget_ratio = self.params_budget(ctx.model, self.budget, self.targets)
        model, plan = compress_model(ctx.model, batches, ctx.loss_fn, self.params_budget_ratio, targets=targets,
                                     allocator=self.allocator, scope=self.scope, rank_multiple=self.rank_multiple,
                                     rho=0.0, stats_mode="input", damping=self.damping, mask_key=self.mask_key,
                                     head_names=self.head_names, device=ctx.device, build_layer=self._two_branch,
                                     **self.calib.driver_kwargs())
        self.target_ranks = dict(plan.ranks)
        # Original parameters in the budget's scope, and the part of them the two-branch layers do not replace.
        self.params_original = params_model if self.scope == "model" else sum(dense.values())
        self.params_fixed = self.params_original - sum(dense[name] for name in self.init_ranks)
        self._set_trainable(model)
        return model

    def _two_branch(self, decompositions: Decompositions, name: str, linear: nn.Linear, rank: int) -> TwoBranchLinear:
        """`compress_model`'s layer builder: the student starts at `ceil(init_rank_factor * rank)` components."""
        self.init_ranks[name] = min(math.ceil(self.init_rank_factor * rank), min(linear.in_features,
                                                                                  linear.out_features))
        return TwoBranchLinear.from_linear(linear, self.init_ranks[name], decompositions.metric(name, linear.weight))

    def _set_trainable(self, model: nn.Module) -> None:
        students = {id(param) for layer in two_branch_layers(model).values()
                    for param in (*layer.down.parameters(), *layer.up.parameters())}
        set_trainable(model, head_names=self.head_names, norms=True, extra=lambda _, param: id(param) in students)

    # ---- training --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def distill_teacher(self, model: nn.Module):
        layers = list(two_branch_layers(model).values())
        weights = [layer.teacher_weight for layer in layers]
        for layer in layers:
            layer.teacher_weight = 1.0
        try:
            yield
        finally:
            for layer, weight in zip(layers, weights, strict=True):
                layer.teacher_weight = weight

    def params_target(self) -> int:
        return math.floor(self.params_budget_ratio * self.params_original)

    def params_now(self, layers: dict[str, TwoBranchLinear]) -> int:
        """Parameters the deployed model would have with the students' current active ranks."""
        return self.params_fixed + sum(
            deployed_cost(layer.in_features, layer.out_features, layer.active_rank, layer.up.bias is not None)
            for layer in layers.values())

    def pruning_progress(self, step: int, max_steps: int) -> float:
        """Fraction of the pruning done at this step, quantised to the pruning events (0 before, 1 after)."""
        fraction = (step + 1) / max_steps
        progress = (fraction - self.prune_start) / (self.prune_end - self.prune_start)
        return math.floor(min(max(progress, 0.0), 1.0) * self.prune_events) / self.prune_events

    def on_train_batch_start(self, model: nn.Module, step: int, max_steps: int) -> None:
        layers = two_branch_layers(model)
        a_t = teacher_weight(step + 1, max_steps)
        for layer in layers.values():
            layer.teacher_weight = a_t
        progress = self.pruning_progress(step, max_steps)
        self.lasso_scale = self.group_lasso_weight * (1.0 - progress)
        initial = self.params_fixed + sum(
            deployed_cost(layer.in_features, layer.out_features, layer.rank, layer.up.bias is not None)
            for layer in layers.values())
        # Cubic schedule: prune fast while many weak components remain, slowly near the budget.
        target = self.params_target() + (initial - self.params_target()) * (1.0 - progress) ** 3
        self.prune_to(layers, math.floor(target))

    @torch.no_grad()
    def prune_to(self, layers: dict[str, TwoBranchLinear], params_target: int) -> None:
        params_now = self.params_now(layers)
        if params_now <= params_target:
            return
        if dist.is_available() and dist.is_initialized():
            for layer in layers.values():  # SUM then divide: gloo has no AVG
                dist.all_reduce(layer.component_energy, op=dist.ReduceOp.SUM)
                layer.component_energy.div_(dist.get_world_size())
        for name, components in select_prunable(layers, params_now, params_target).items():
            layers[name].prune(components)

    def loss_terms(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        layers = list(two_branch_layers(model).values())
        if self.lasso_scale == 0.0 or not layers:
            return {}
        return {"group_lasso": self.lasso_scale * group_lasso(layers)}

    # ---- deployment ------------------------------------------------------------------------------------------
    def export(self, model: nn.Module) -> nn.Module:
        """Prune to the budget (if training stopped early), drop the teachers, keep B A as LowRankLinear layers."""
        layers = two_branch_layers(model)
        self.prune_to(layers, self.params_target())
        for name, layer in layers.items():
            model.set_submodule(name, student_layer(layer))
        return model

    def structure(self) -> dict | None:
        if not self.init_ranks:
            return None
        return {"init_ranks": self.init_ranks, "target_ranks": self.target_ranks, "head_names": self.head_names,
                "params_original": self.params_original, "params_fixed": self.params_fixed,
                "params_budget_ratio": self.params_budget_ratio}

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        self.init_ranks = dict(structure["init_ranks"])
        self.target_ranks = dict(structure["target_ranks"])
        self.head_names = list(structure["head_names"])
        self.params_original, self.params_fixed = structure["params_original"], structure["params_fixed"]
        self.params_budget_ratio = structure.get("params_budget_ratio", self.budget)  # absent: a parameter budget
        for name, rank in self.init_ranks.items():
            model.set_submodule(name, TwoBranchLinear.from_linear(model.get_submodule(name), rank))
        self._set_trainable(model)
        return model

    def summary(self) -> dict:
        if not self.init_ranks:
            return {}
        return {"target_ranks": self.target_ranks, "init_ranks": self.init_ranks,
                "params_original": self.params_original, "params_target": self.params_target()}


@torch.no_grad()
def student_layer(layer: TwoBranchLinear) -> nn.Module:
    """The deployed student: a LowRankLinear of the kept components, or a dense nn.Linear (B A) if that is smaller."""
    kept = layer.mask.nonzero().flatten()
    up, down = layer.up.weight[:, kept], layer.down.weight[kept]
    bias = layer.up.bias is not None
    m, n, rank = layer.out_features, layer.in_features, kept.numel()
    if (m + n) * rank >= m * n:
        deployed = nn.Linear(n, m, bias=bias).to(device=up.device, dtype=up.dtype)
        deployed.weight.copy_(up @ down)
        output = deployed
    else:
        deployed = LowRankLinear(n, m, rank, bias).to(device=up.device, dtype=up.dtype)
        deployed.up.weight.copy_(up)
        deployed.down.weight.copy_(down)
        output = deployed.up
    if bias:
        output.bias.copy_(layer.up.bias)
    return deployed
