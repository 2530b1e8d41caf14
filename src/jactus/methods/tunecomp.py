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
  cores), in fp32; the teacher (the original linear itself, not a copy) and everything else are frozen. Logit
  distillation is not implemented yet.
- The group lasso joins the task loss in `training_step` (`loss_terms`), so loss scaling and gradient accumulation
  treat it like the task loss. Pruning reads and zeroes whole factor columns on every rank: under FSDP, which shards
  them, TuneComp is refused (`shardable = False`); DDP is fine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..baselines.tunecomp import TwoBranchLinear, deployed_cost, group_lasso, select_prunable, teacher_weight
from ..core import SCOPES, LowRankLinear, compress_model, count_params, find_targets
from ..core.decompositions import Decompositions
from .base import CalibSettings, Method, MethodContext, check_budget, check_positive, choice, register, set_trainable
from .compress_then_adapt import ALLOCATORS, calibration_batches


def two_branch_layers(model: nn.Module) -> dict[str, TwoBranchLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, TwoBranchLinear)}


@register("tunecomp")
class TuneComp(Method):
    compresses = True
    shardable = False

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
    ):
        self._budget = check_budget(budget, "tunecomp")
        self.scope = choice(scope, SCOPES, "budget.scope")
        self.allocator = choice(allocator, ALLOCATORS, "allocator")
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
        model, plan = compress_model(ctx.model, batches, ctx.loss_fn, self.budget, targets=targets,
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
    def params_target(self) -> int:
        return math.floor(self.budget * self.params_original)

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
                "params_original": self.params_original, "params_fixed": self.params_fixed}

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        self.init_ranks = dict(structure["init_ranks"])
        self.target_ranks = dict(structure["target_ranks"])
        self.head_names = list(structure["head_names"])
        self.params_original, self.params_fixed = structure["params_original"], structure["params_fixed"]
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
