"""RoSA (IST-DASLab, "Robust Adaptation"): `W + S + (alpha / r) B A` on the full model (docs/METHOD.md section 10).

LoRA adapters (HF PEFT, as `lora`) plus, per target linear, a sparse adapter `S` (`core.sparse_adapter`) of
`density_nnz(density, m, n)` non-zeros. Training starts with LoRA alone; the support of every `S` is chosen once, at
step `warmup_steps`, as the layer's top entries of the empirical diagonal Fisher of its (frozen) weight, the squared
weight gradient `(g^T x)^2` summed over the last `grad_batches` warm-up steps (`core.sparse.FisherAccumulator`: hooks,
row blocks, running sums on the CPU in fp32, all-reduced across ranks so every rank picks the same support). From then
on the sparse values train together with LoRA, their optimizer state starting afresh at that step
(`core.sparse_adapter.restart_optimizer_state`). `warmup_steps = 0` chooses the support in `apply`, from the first
`grad_batches` calibration batches on the model with LoRA at init (the base model's gradient), before any optimizer.

`export` merges both into `W` and puts the plain `nn.Linear` back: the deployed model is the original architecture at
100% size. A checkpoint's structure records the non-zeros per layer and whether the support was chosen; the support
itself travels in the state dict (`...base_layer.sparse.index`).
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Sequence

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core.sparse import FisherAccumulator, sparse_index_bytes, top_support, weight_fisher
from ..core.sparse_adapter import SparseAdaptedLinear, density_nnz, restart_optimizer_state
from ..core.targets import _matches
from .base import MethodContext, register, set_trainable
from .peft_adapters import PeftAdapterMethod, is_adapter_parameter, merge_adapters

log = logging.getLogger("jactus")


def check_density(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{key}={value!r}: expected a fraction of each layer's entries in (0, 1), e.g. 0.006")
    return float(value)


def is_sparse_value(name: str) -> bool:
    return name.endswith(".sparse.values")


@register("rosa")
class RoSA(PeftAdapterMethod):
    """LoRA plus a sparse adapter per target linear, its support chosen by the weight Fisher after a LoRA warm-up."""

    def __init__(
        self,
        r: int = 16,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] | None = None,
        rank_pattern: dict | None = None,
        density: float = 0.006,
        density_pattern: dict | None = None,
        warmup_steps: int = 64,
        grad_batches: int = 1,
    ):
        super().__init__(r, lora_alpha, lora_dropout, target_modules, rank_pattern)
        self.density = check_density(density, "method.density")
        self.density_pattern = {str(pattern): check_density(value, f"method.density_pattern[{pattern!r}]")
                                for pattern, value in (density_pattern or {}).items()}
        if isinstance(grad_batches, bool) or not isinstance(grad_batches, int) or grad_batches < 1:
            raise ValueError(f"method.grad_batches={grad_batches!r}: expected a positive integer (the warm-up steps "
                             f"whose gradients score the support), e.g. 1")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"method.warmup_steps={warmup_steps!r}: expected an integer >= 0, e.g. 64")
        if 0 < warmup_steps < grad_batches:
            raise ValueError(f"method.warmup_steps={warmup_steps} is shorter than method.grad_batches={grad_batches}: "
                             f"the support is scored on the last grad_batches warm-up steps; expected warmup_steps "
                             f">= {grad_batches}, or 0 (score it before training on the calibration batches)")
        self.warmup_steps, self.grad_batches = warmup_steps, grad_batches
        self.nnz: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.selected_at_step: int | None = None
        self.fisher: FisherAccumulator | None = None
        # between selection and the next optimizer step: the pending `restart_optimizer_state` hook
        self.optimizer_restart: RemovableHandle | None = None
        self.warned_short_run = False
        self.select_wall_s: float | None = None
        self.index_bytes: int | None = None

    # ---- structure -----------------------------------------------------------------------------------------------
    def layer_density(self, name: str) -> float:
        """The first `density_pattern` entry whose pattern matches the layer's name, else `density`."""
        return next((value for pattern, value in self.density_pattern.items() if _matches(pattern, name)),
                    self.density)

    def _inject(self, model: nn.Module, init_lora_weights: bool | str) -> nn.Module:
        model = super()._inject(model, init_lora_weights)
        if not self.nnz:
            unmatched = [p for p in self.density_pattern if not any(_matches(p, n) for n in self.adapted_layers)]
            if unmatched:
                raise ValueError(f"method.density_pattern: {unmatched} match no adapted layer; adapted layers: "
                                 f"{self.adapted_layers[:8]}{' ...' if len(self.adapted_layers) > 8 else ''}")
        for name in self.adapted_layers:
            wrapper = model.get_submodule(name)
            base = wrapper.get_base_layer()
            self.shapes[name] = (base.out_features, base.in_features)
            if name not in self.nnz:
                self.nnz[name] = density_nnz(self.layer_density(name), base.out_features, base.in_features)
            wrapper.base_layer = SparseAdaptedLinear(base, self.nnz[name])
        set_trainable(model, head_names=self.head_names,
                      extra=lambda name, _: is_adapter_parameter(name) or is_sparse_value(name))
        self.index_bytes = sparse_index_bytes(self._sparse_layer(model, name).sparse for name in self.adapted_layers)
        return model

    def _sparse_layer(self, model: nn.Module, name: str) -> SparseAdaptedLinear:
        return model.get_submodule(name).get_base_layer()

    def apply(self, ctx: MethodContext) -> nn.Module:
        self.nnz, self.selected_at_step = {}, None
        self._drop_optimizer_restart()
        model = super().apply(ctx)
        if self.warmup_steps == 0:
            batches = list(itertools.islice(ctx.calibration_batches or (), self.grad_batches))
            if not batches:
                raise ValueError("method.warmup_steps=0 scores the sparse support on the calibration batches, but "
                                 "there are none; give calibration data or set warmup_steps >= grad_batches")
            start = time.perf_counter()
            scores = weight_fisher(model, self._adapted(model), batches, ctx.loss_fn, progress=False)
            self._select(model, scores, step=0, start=start)
        return model

    def _adapted(self, model: nn.Module) -> dict[str, nn.Module]:
        # The LoRA wrappers: their output requires grad (LoRA trains) and its gradient is the base linear's.
        return {name: model.get_submodule(name) for name in self.adapted_layers}

    def structure(self) -> dict | None:
        structure = super().structure()
        if structure is not None:
            structure.update(nnz=dict(self.nnz), selected_at_step=self.selected_at_step)
        return structure

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        self.nnz = dict(structure["nnz"])
        model = super().rebuild(model, structure)
        self.selected_at_step = structure["selected_at_step"]
        for name in self.adapted_layers:
            self._sparse_layer(model, name).active = self.selected_at_step is not None
        return model

    # ---- training: score during the last warm-up steps, then choose the support once --------------------------------
    def on_train_batch_start(self, model: nn.Module, step: int, max_steps: int) -> None:
        if self.selected_at_step is not None:
            return
        if not self.warned_short_run and self.warmup_steps >= max_steps:
            log.warning("rosa: warmup_steps=%d >= the run's %d steps: the sparse support is never chosen, so this "
                        "run trains LoRA alone", self.warmup_steps, max_steps)
            self.warned_short_run = True
        if self.fisher is None and step >= self.warmup_steps - self.grad_batches:
            self.fisher = FisherAccumulator(self._adapted(model))
        # A run resumed at or after warmup_steps before any scored step scores one step first (the same on all ranks).
        if step >= self.warmup_steps and min(self.fisher.batches.values()) > 0:
            start = time.perf_counter()
            self.fisher.remove()
            scores = self.fisher.reduced()
            self.fisher = None
            self._select(model, scores, step, start)
            # The values' optimizer state starts here: the warm-up's zero gradients must not count as their steps.
            self.optimizer_restart = restart_optimizer_state(
                self._sparse_layer(model, name).sparse.values for name in self.adapted_layers)

    def _drop_optimizer_restart(self) -> None:
        if self.optimizer_restart is not None:
            self.optimizer_restart.remove()
            self.optimizer_restart = None

    def _select(self, model: nn.Module, scores: dict, step: int, start: float) -> None:
        for name in self.adapted_layers:
            layer = self._sparse_layer(model, name)
            layer.select(top_support(scores[name], layer.sparse.nnz))
        self.selected_at_step = step
        self.select_wall_s = time.perf_counter() - start
        log.info("rosa: sparse support chosen at step %d (%d non-zeros over %d layers)", step,
                 sum(self.nnz.values()), len(self.nnz))

    # ---- deployment ------------------------------------------------------------------------------------------------
    def export(self, model: nn.Module) -> nn.Module:
        """`W + S + (alpha / r) B A` as one plain `nn.Linear` per target (in place)."""
        if self.fisher is not None:
            self.fisher.remove()
            self.fisher = None
        self._drop_optimizer_restart()
        model = merge_adapters(model)
        for name, module in list(model.named_modules()):
            if isinstance(module, SparseAdaptedLinear):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merged())
        return model

    def summary(self) -> dict:
        densities = [self.nnz[name] / (m * n) for name, (m, n) in self.shapes.items()]
        entries = sum(m * n for m, n in self.shapes.values())
        return {
            **super().summary(),
            "params_sparse": sum(self.nnz.values()),
            "sparse_density": sum(self.nnz.values()) / entries if entries else None,
            "sparse_density_min": min(densities, default=None),
            "sparse_density_mean": statistics.fmean(densities) if densities else None,
            "sparse_density_max": max(densities, default=None),
            "sparse_index_bytes": self.index_bytes,
            "sparse_selected_at_step": self.selected_at_step,
            "sparse_select_wall_s": self.select_wall_s,
            "warmup_steps": self.warmup_steps,
            "grad_batches": self.grad_batches,
        }
