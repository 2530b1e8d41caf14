"""TACO-style task-aware pruning (docs/METHOD.md section 10): second-order pruning of the target linears with the *task*
calibration input covariance as each layer's Hessian, then fine-tuning of the surviving weights with the mask fixed,
distilled from the dense model (section 9).

1. Budget -> kept weights. Deployed parameters = the non-zeros of the pruned weights + every other parameter in the
   budget's scope (biases included); with `P` the parameters in scope (the whole model for scope=model, the target
   linears for scope=targets) the targets keep `floor(budget * P) - (P - target weights)` weights. With
   `unit=bytes` the same sum is in stored bytes: a kept weight costs the model's item size and each pruned layer
   one bit an entry for its bitmask (the format `save_compact` writes; core.byte_budget), so at equal bytes TACO
   keeps fewer weights than at the same ratio of parameters. A budget the rest of the model already exceeds fails
   before any calibration, with the numbers.
2. Which layer keeps how many (`allocation`): `uniform` spreads them at one density over the targets
   (`core.sparse.uniform_nnz`, exact); `global` keeps the weights above one threshold on the relative OBS saliency
   `w^2 / [H^-1]_jj / (trace(W Sx W^T) / (m n))` of all targets (`core.obs_prune.relative_saliency`: the raw
   saliency is in each layer's output units and would prune whole output projections; dividing by the output energy
   per weight, not the whole, keeps one threshold from pruning larger layers harder). `pattern="N:M"` instead fixes
   density N/M in every target (N non-zeros in every M consecutive inputs of a row); the budget is then an upper
   bound that the pattern must meet (it fails early otherwise) and the deployed ratio is whatever the pattern gives.
3. `core.obs_prune.prune_linears`: calibrate `Sx` (input statistics only, the `calib` group's memory options),
   SparseGPT column elimination with lazy block updates (`block_size`), the weights written back at once.
4. Fine-tuning: the pruned linears' weights and biases, the norms and the task heads train (in fp32); the mask is a
   bool buffer `prune_mask` on each pruned linear (checkpointed with the weights). Pruned weights stay exactly zero:
   a gradient hook zeroes their gradients, so with AdamW their moments stay zero and decoupled weight decay
   multiplies zero by a factor (no drift); L2-style decay (Adam/SGD `weight_decay`) adds `wd * 0` to a zero
   gradient. Each training step also re-applies `w *= mask` (one multiply per layer) so that nothing outside this
   method's hooks (a deep copy, which drops tensor hooks; an optimizer with noise) can leave a pruned weight non-zero.

`export` gives plain `nn.Linear` layers with the zeros in place, marked for the bitmask format (`save_compact` stores
their non-zeros and one bit an entry; `load_compact` gives the dense-with-zeros layer back); `params_deployed` counts
their non-zeros.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..core import SCOPES, count_params, find_targets, resolve_max_stats_bytes
from ..core.byte_budget import ByteBudget, check_unit
from ..core.compact import BITMASK_FORMAT, bitmask_bytes
from ..core.obs_prune import ALLOCATIONS, n_m_index_bytes, parse_pattern, prune_linears
from ..core.sparse import csr_index_bytes, uniform_nnz
from .base import (
    STATS_DTYPES,
    CalibSettings,
    Method,
    MethodContext,
    check_budget,
    check_positive,
    choice,
    register,
    set_trainable,
)
from .compress_then_adapt import calibration_batches

log = logging.getLogger("jactus")

MASK = "prune_mask"


@register("taco")
class Taco(Method):
    """OBS pruning with the task's input covariance, then masked fine-tuning (module docstring).

    `shardable = False`: the per-step `w *= mask` reads whole weights, which FSDP splits across ranks.
    """

    compresses = True
    shardable = False
    default_distill_weight = 1.0  # docs/METHOD.md sections 9-10: TACO fine-tunes with distillation from the dense model

    def __init__(
        self,
        budget: float = 0.8,
        scope: str = "model",
        pattern: str = "unstructured",
        allocation: str = "uniform",
        block_size: int = 128,
        damping: float = 1e-2,
        targets: Sequence[str] | None = None,
        mask_key: str = "attention_mask",
        calib: Mapping | None = None,
        unit: str = "params",
    ):
        self._budget = check_budget(budget, "taco")
        self.unit = check_unit(unit)
        self.scope = choice(scope, SCOPES, "budget.scope")
        self.pattern = pattern
        self.n_m = parse_pattern(pattern, "method.pattern")
        self.allocation = choice(allocation, ALLOCATIONS, "method.allocation")
        if self.n_m is not None and self.allocation != "uniform":
            raise ValueError(f"method.allocation={allocation!r} with method.pattern={pattern!r}: an N:M pattern fixes "
                             f"every layer's density at N/M, so only allocation='uniform' applies")
        self.block_size = check_positive(block_size, "method.block_size")
        if self.n_m is not None and block_size % self.n_m[1]:
            raise ValueError(f"method.block_size={block_size!r}: expected a multiple of M={self.n_m[1]} for "
                             f"method.pattern={pattern!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
            raise ValueError(f"calib.damping={damping!r}: expected a number >= 0")
        self.damping = float(damping)
        self.targets = list(targets) if targets else None
        self.mask_key = mask_key
        self.calib = CalibSettings.from_config(calib)
        if self.calib.stats_cache is not None:  # said, not silently dropped: TACO's Hessians are its own pass
            log.warning("calib.stats_cache=%s is not used by taco (it measures its own input Hessians, "
                        "not the factorizing methods' statistics); the run calibrates as usual", self.calib.stats_cache)
        self.head_names: list[str] = []
        self.shapes: dict[str, tuple[int, int]] = {}  # pruned linear -> (out, in)
        self.nnz: dict[str, int] = {}  # pruned linear -> kept weights
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    @property
    def budget(self) -> float:
        return self._budget

    # ---- pruning -----------------------------------------------------------------------------------------------
    def apply(self, ctx: MethodContext) -> nn.Module:
        batches = calibration_batches(ctx.calibration_batches, self.name)
        self.head_names = list(ctx.head_names)
        model = ctx.model
        modules = find_targets(model, self.targets)
        keep = self.plan_keep(model, modules)
        if self.n_m is not None:
            amount = {"n_m": self.n_m}
        else:
            amount = {"keep_total": keep} if self.allocation == "global" else {"keep": keep}
        masks = prune_linears(
            model, modules, batches, ctx.loss_fn, **amount, damping=self.damping, block_size=self.block_size,
            mask_key=self.mask_key, device=ctx.device,
            max_stats_bytes=resolve_max_stats_bytes(self.calib.max_stats_bytes, ctx.device),
            stats_dtype=STATS_DTYPES[self.calib.stats_dtype], offload_to_cpu=self.calib.offload_to_cpu,
            park_on_cpu=self.calib.offload_to_cpu or self.calib.park_layers_on_cpu)
        self.shapes = {name: tuple(modules[name].weight.shape) for name in modules}
        self.nnz = {name: int(mask.sum()) for name, mask in masks.items()}
        return self._prepare(model, masks)

    def plan_keep(self, model: nn.Module, modules: Mapping[str, nn.Linear]) -> dict[str, int] | int:
        """Kept weights per target (uniform, N:M) or in all (global), from the budget (module docstring, step 1).

        In bytes (`unit=bytes`) a kept weight costs the model's item size and every pruned layer its bitmask
        (`core.compact.bitmask_bytes`, the stored format); in parameters a kept weight costs one."""
        weights = sum(layer.weight.numel() for layer in modules.values())
        if self.unit == "bytes":
            budget = ByteBudget.of(model, self.budget, self.scope, modules)
            masks = sum(bitmask_bytes(*layer.weight.shape) for layer in modules.values())
            original, fixed, limit, cost = budget.original, budget.fixed + masks, budget.limit, budget.itemsize
        else:
            biases = sum(layer.bias.numel() for layer in modules.values() if layer.bias is not None)
            original = count_params(model) if self.scope == "model" else weights + biases
            fixed, limit, cost = original - weights, math.floor(self.budget * original), 1  # untouched parameters
        units = "bytes" if self.unit == "bytes" else "parameters"
        if self.n_m is not None:
            n, m = self.n_m
            uneven = {name: layer.in_features for name, layer in modules.items() if layer.in_features % m}
            if uneven:
                raise ValueError(f"method.pattern={self.pattern!r}: the input widths of {sorted(uneven)[:4]} "
                                 f"({sorted(set(uneven.values()))}) are not multiples of M={m}")
            keep = {name: layer.weight.numel() // m * n for name, layer in modules.items()}
            deployed = fixed + sum(keep.values()) * cost
            if deployed > limit:
                raise ValueError(f"method.pattern={self.pattern!r} keeps {deployed} of {original} {units} "
                                 f"(scope={self.scope!r}), a ratio of {deployed / original:.4f} above "
                                 f"budget.ratio={self.budget}; raise the budget to at least that ratio or use a "
                                 f"sparser pattern")
            return keep
        if limit < fixed:
            raise ValueError(f"budget.ratio={self.budget} with budget.scope={self.scope!r} allows {limit} of "
                             f"{original} {units}, but the {fixed} outside the kept weights alone are "
                             f"{fixed / original:.4f} of them; raise the budget above that or use budget.scope=targets")
        keep_total = min((limit - fixed) // cost, weights)
        if self.allocation == "global":
            return keep_total
        return uniform_nnz({name: tuple(layer.weight.shape) for name, layer in modules.items()}, keep_total)

    # ---- fine-tuning with the mask fixed -----------------------------------------------------------------------
    def _prepare(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
        """Mask buffers, the freeze policy, and the gradient hooks that keep pruned weights at zero."""
        trainable = {f"{name}.{leaf}" for name in self.shapes for leaf in ("weight", "bias")}
        for name, mask in masks.items():
            layer = model.get_submodule(name)
            layer.register_buffer(MASK, mask.to(layer.weight.device, torch.bool))
        set_trainable(model, head_names=self.head_names, norms=True,
                      extra=lambda name, _: name in trainable)  # trainables become fp32 (docs/METHOD.md section 8)
        self._remove_hooks()
        for name in self.shapes:
            layer = model.get_submodule(name)
            with torch.no_grad():
                layer.weight.mul_(getattr(layer, MASK))
            self._hooks[name] = layer.weight.register_hook(_masked_gradient(layer))
        return model

    def on_train_batch_start(self, model: nn.Module, step: int, max_steps: int) -> None:
        self.apply_masks(model)

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """`w *= mask` on every pruned linear."""
        for name in self.shapes:
            layer = model.get_submodule(name)
            layer.weight.mul_(getattr(layer, MASK))

    # ---- deployment --------------------------------------------------------------------------------------------
    def export(self, model: nn.Module) -> nn.Module:
        """Plain `nn.Linear` layers: the mask applied once more, its buffer and the gradient hooks removed; each
        pruned layer is marked so that `save_compact` stores its non-zeros and a bitmask, not its zeros."""
        self._remove_hooks()
        for name in self.shapes:
            layer = model.get_submodule(name)
            layer.jactus_weight_format = BITMASK_FORMAT
            mask = layer._buffers.pop(MASK, None)
            if mask is not None:
                with torch.no_grad():
                    layer.weight.mul_(mask)
        return model

    def params_deployed(self, deployed: nn.Module) -> int:
        """Non-zeros of the pruned weights + every other parameter."""
        pruned = [deployed.get_submodule(name).weight for name in self.shapes]
        return count_params(deployed) - sum(w.numel() for w in pruned) + sum(int(torch.count_nonzero(w))
                                                                            for w in pruned)

    def params_trainable(self, model: nn.Module) -> int:
        """Trainable parameters with each pruned weight counted by its surviving entries (the masked ones are held
        at zero)."""
        pruned = [model.get_submodule(name).weight for name in self.shapes]
        masked = sum(w.numel() - int(self.nnz[name]) for name, w in zip(self.shapes, pruned, strict=True)
                     if w.requires_grad)
        return count_params(model, trainable_only=True) - masked

    def structure(self) -> dict | None:
        if not self.shapes:
            return None
        return {"shapes": {name: list(shape) for name, shape in self.shapes.items()}, "nnz": dict(self.nnz),
                "head_names": self.head_names}

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        """Mask buffers of the recorded shapes (all True); the checkpoint's masks and weights are loaded into them."""
        self.shapes = {name: tuple(shape) for name, shape in structure["shapes"].items()}
        self.nnz = {name: int(count) for name, count in structure["nnz"].items()}
        self.head_names = list(structure["head_names"])
        masks = {}
        for name, shape in self.shapes.items():
            weight = model.get_submodule(name).weight
            if tuple(weight.shape) != shape:
                raise ValueError(f"checkpoint structure: layer {name!r} was pruned at shape {shape}, but the model's "
                                 f"weight is {tuple(weight.shape)}")
            masks[name] = torch.ones(shape, dtype=torch.bool, device=weight.device)
        return self._prepare(model, masks)

    def summary(self) -> dict:
        if not self.shapes:
            return {}
        densities = {name: self.nnz[name] / (m * n) for name, (m, n) in self.shapes.items()}
        nnz = sum(self.nnz.values())
        size = sum(m * n for m, n in self.shapes.values())
        if self.n_m is None:
            index_bytes = sum(csr_index_bytes(shape, self.nnz[name]) for name, shape in self.shapes.items())
            index_format = "csr_int32"  # int32 column indices + int32 row pointers per layer
        else:
            index_bytes = n_m_index_bytes(nnz, self.n_m[1])
            index_format = f"n:m_{math.ceil(math.log2(self.n_m[1]))}bit"  # position of each value in its group
        return {
            "pattern": self.pattern,
            "allocation": self.allocation,
            "block_size": self.block_size,
            "pruned_layers": len(self.shapes),
            "nnz": nnz,
            "density": nnz / size,
            "density_stats": {"min": min(densities.values()), "mean": sum(densities.values()) / len(densities),
                              "max": max(densities.values())},
            "density_map": densities,
            "sparse_index_bytes": index_bytes,
            "sparse_index_format": index_format,
            "bitmask_index_bytes": sum(math.ceil(m * n / 8) for m, n in self.shapes.values()),
        }

    def _remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()


def _masked_gradient(layer: nn.Linear):
    """A weight-gradient hook: zero where the layer's mask is False (read at call time: the buffer may have moved)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * getattr(layer, MASK)

    return hook
