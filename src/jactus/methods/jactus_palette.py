"""JACTUS palette fine-tuning: one run, one compact model per budget (docs/METHOD.md section 11; ESTA's idea on
JACTUS)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..core import FactorizedLinear, RankPlan, find_targets
from ..core.palette import (
    PaletteLinear,
    deploy_member,
    palette_modules,
    set_active_member,
    train_palette,
    wrap_norms,
)
from .base import choice, register
from .jactus import Jactus

SAMPLINGS = ("uniform", "importance")


class BudgetSampler:
    """Which member of the palette a training step trains.

    `uniform`: every member alike. `importance` (ESTA): member k's score is a moving average, over the steps that
    trained it, of the SNIP saliency `sum |theta * grad|` of the model's trainable tensors in that step (a member's
    own core blocks, biases and norms, and the shared head); its probability is `(1 - uniform_mix) * score_k / sum
    scores + uniform_mix / K`, uniform until every member has a score. The mix keeps every member in training. The
    draws come from a generator seeded with `seed`, so that every rank of a DDP run (whose gradients, hence scores,
    are the all-reduced ones) draws the same member.
    """

    def __init__(self, members: int, sampling: str = "importance", momentum: float = 0.9, uniform_mix: float = 0.1,
                 seed: int = 0):
        self.members, self.sampling = members, choice(sampling, SAMPLINGS, "method.sampling")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"method.importance_momentum={momentum!r}: expected a moving-average factor in [0, 1)")
        if isinstance(uniform_mix, bool) or not isinstance(uniform_mix, (int, float)) or not 0 <= uniform_mix <= 1:
            raise ValueError(f"method.uniform_mix={uniform_mix!r}: expected a fraction in [0, 1]")
        self.momentum, self.uniform_mix = float(momentum), float(uniform_mix)
        self.scores: list[float | None] = [None] * members
        self.steps = [0] * members
        self.generator = torch.Generator().manual_seed(int(seed))

    def probabilities(self) -> list[float]:
        uniform = [1.0 / self.members] * self.members
        if self.sampling == "uniform" or any(score is None for score in self.scores):
            return uniform
        total = sum(self.scores)
        if not total > 0:
            return uniform
        return [(1 - self.uniform_mix) * score / total + self.uniform_mix / self.members for score in self.scores]

    def observe(self, member: int, saliency: float) -> None:
        """Fold the saliency of a step that trained `member` into its moving average."""
        previous = self.scores[member]
        self.scores[member] = saliency if previous is None else \
            self.momentum * previous + (1 - self.momentum) * saliency

    def sample(self) -> int:
        member = int(torch.multinomial(torch.tensor(self.probabilities(), dtype=torch.float64), 1,
                                       generator=self.generator))
        self.steps[member] += 1
        return member

    def state_dict(self) -> dict:
        return {"scores": list(self.scores), "steps": list(self.steps), "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.scores, self.steps = list(state["scores"]), list(state["steps"])
        self.generator.set_state(state["generator"])


def saliency(model: nn.Module) -> float:
    """SNIP saliency `sum |theta * grad|` over the trainable tensors that hold a gradient."""
    total = None
    for param in model.parameters():
        if param.requires_grad and param.grad is not None:
            value = (param.detach() * param.grad.detach()).abs().sum(dtype=torch.float32)
            total = value if total is None else total + value.to(total.device)
    return 0.0 if total is None else float(total)


@register("jactus_palette")
class JactusPalette(Jactus):
    """JACTUS trained once for a palette of budgets (docs/METHOD.md section 11).

    One calibration plans nested ranks for every budget (`plan_ranks(nested=True)`) and builds one set of nested
    factors at the largest rank any budget gives a layer (`union_subspace(nested=True)`). Truncation gives each smaller
    budget's JACTUS factorization exactly (up to rounding) when the task directions come from the exact eigensolver
    (`calib.eig_method=eigh`, or `auto` on the CPU); where `auto` runs subspace iteration (CUDA, a few directions of a
    large layer) it gives it to that iteration's accuracy. Shared: the factors, the cores (each member trains the
    leading block of its rank) and the task heads (ESTA shares its classifier as well; a head is the same task map for
    every member). Per member: the bias of every factorized target and every norm layer. A target dense at a larger
    budget but factorized at a smaller one keeps its frozen dense weight for the larger members. Each optimizer step
    trains one member, drawn by `BudgetSampler` (`sampling`: uniform | importance); `summary()` reports the final
    sampling distribution, the importance scores and the steps each member got. At the end every member is evaluated
    and exported as its own compact model (`palette_members`, used by jactus-train).

    Not shardable: the importance score reads whole gradients, which FSDP splits across ranks. `sparse_share` is
    not offered (the sparse supports would need nesting too).
    """

    shardable = False

    def __init__(
        self,
        palette: Sequence[float] = (0.6, 0.8),
        sampling: str = "importance",
        importance_momentum: float = 0.9,
        uniform_mix: float = 0.1,
        seed: int = 0,
        scope: str = "model",
        allocator: str = "marginal_gain",
        rank_multiple: int = 8,
        rho: float = 0.25,
        weight_basis: str = "whitened",
        stats_mode: str = "kfac",
        damping: float = 1e-2,
        targets: Sequence[str] | None = None,
        mask_key: str = "attention_mask",
        calib: Mapping | None = None,
        unit: str = "params",
    ):
        budgets = [palette] if isinstance(palette, (int, float)) else list(palette)
        if not budgets or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1
                              for b in budgets):
            raise ValueError(f"method.palette={palette!r}: expected a list of retained-parameter ratios in (0, 1], "
                             f"e.g. [0.6, 0.8]")
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"method.palette={palette!r} repeats a budget; give each budget once")
        self.palette = sorted(float(b) for b in budgets)
        super().__init__(budget=self.palette[-1], scope=scope, allocator=allocator, rank_multiple=rank_multiple,
                         rho=rho, weight_basis=weight_basis, stats_mode=stats_mode, damping=damping, targets=targets,
                         mask_key=mask_key, calib=calib, unit=unit)
        self.sampler = BudgetSampler(len(self.palette), sampling, importance_momentum, uniform_mix, seed)
        self.plans: list[RankPlan] = []
        self.active = len(self.palette) - 1
        self._step: int | None = None
        self._trained: int | None = None  # the member the last optimizer step trained
        self._modules: tuple[int, list[nn.Module]] | None = None

    # ---- preparing the model ---------------------------------------------------------------------------------
    def apply(self, ctx) -> nn.Module:
        if ctx.calibration_batches is None:
            raise ValueError("jactus_palette needs calibration batches (the datamodule's calibration_dataloader())")
        self.head_names = list(ctx.head_names)
        dense = {name: linear.weight for name, linear in find_targets(ctx.model, self.targets).items()}
        results = self.compress(ctx, [self.params_budget(ctx.model, budget, self.targets) for budget in self.palette],
                                 nested=True)
        model = results[0][0]
        self.plans = [plan for _, plan in results]
        self.plan = self.plans[-1]
        self.compress_stats = model.jactus_compress_stats
        for name in dense:
            layer = model.get_submodule(name)
            if isinstance(layer, FactorizedLinear):
                ranks = [plan.ranks[name] for plan in self.plans]
                weight = dense[name] if None in ranks else None
                model.set_submodule(name, PaletteLinear(layer.U.data, layer.C.data, layer.V.data,
                                                        None if layer.bias is None else layer.bias.data, ranks,
                                                        weight))
        dense.clear()  # the dense weights no member uses go with the last reference
        return self._prepare(model)

    def _prepare(self, model: nn.Module) -> nn.Module:
        wrap_norms(model, len(self.palette))
        train_palette(model, self.head_names)
        self._activate(model, len(self.palette) - 1)
        return model

    def _palette_modules(self, model: nn.Module) -> list[nn.Module]:
        if self._modules is None or self._modules[0] != id(model):
            self._modules = (id(model), palette_modules(model))
        return self._modules[1]

    def _activate(self, model: nn.Module, member: int) -> None:
        set_active_member(self._palette_modules(model), member)
        self.active = member

    # ---- training ----------------------------------------------------------------------------------------------
    def on_train_batch_start(self, model: nn.Module, step: int, max_steps: int) -> None:
        """At each new optimizer step: score the member the last step trained (its gradients are still in `.grad`:
        Lightning zeroes them inside the next step's closure), then draw the member this step trains. Micro-batches
        of one accumulated step train the same member."""
        if step == self._step:
            return
        if self._trained is not None and self.sampler.sampling == "importance":
            self.sampler.observe(self._trained, saliency(model))
        self._step = step
        self._trained = self.sampler.sample()
        self._activate(model, self._trained)

    # ---- the palette's members -----------------------------------------------------------------------------------
    def palette_members(self) -> list[tuple[float, Callable[[nn.Module], None]]]:
        """(budget, activate) per member, smallest budget first; `activate(model)` makes the model compute that
        member and `export` return it."""
        return [(budget, lambda model, member=member: self._activate(model, member))
                for member, budget in enumerate(self.palette)]

    def export(self, model: nn.Module) -> nn.Module:
        """The active member as a deployable model (a copy; the palette model is left as it is)."""
        return deploy_member(model, self.active, self.plans[self.active].ranks)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def structure(self) -> dict | None:
        if not self.plans:
            return None
        return {"plan": self.plan.to_dict(), "head_names": self.head_names,
                "palette": [plan.to_dict() for plan in self.plans], "sampler": self.sampler.state_dict()}

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        """The palette's layer shapes (no calibration); the checkpoint's tensors are loaded into them next."""
        self.plans = [RankPlan.from_dict(entry) for entry in structure["palette"]]
        if [plan.budget for plan in self.plans] != self.palette:
            raise ValueError(f"the checkpoint was trained for the palette {[p.budget for p in self.plans]}, this "
                             f"run's method.palette is {self.palette}")
        self.plan = self.plans[-1]
        self.head_names = list(structure["head_names"])
        self.sampler.load_state_dict(structure["sampler"])
        for name in self.plan.ranks:
            ranks = [plan.ranks[name] for plan in self.plans]
            if all(rank is None for rank in ranks):
                continue
            linear = model.get_submodule(name)
            top = max(rank for rank in ranks if rank is not None)
            kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
            bias = None if linear.bias is None else torch.zeros(linear.out_features, **kw)
            model.set_submodule(name, PaletteLinear(
                torch.zeros(linear.out_features, top, **kw), torch.zeros(top, top, **kw),
                torch.zeros(linear.in_features, top, **kw), bias, ranks,
                linear.weight if None in ranks else None))
        return self._prepare(model)

    def summary(self) -> dict:
        summary = super().summary()
        if not summary:
            return summary
        summary["palette_plans"] = [{"budget": plan.budget, "plan_ratio": plan.ratio, "rank_map": dict(plan.ranks)}
                                    for plan in self.plans]
        summary["palette_sampling"] = {
            "sampling": self.sampler.sampling, "budgets": self.palette,
            "probabilities": self.sampler.probabilities(), "importance": list(self.sampler.scores),
            "steps": list(self.sampler.steps),
        }
        return summary
