"""JACTUS as a method: calibrate -> plan ranks -> factorize into the task-aware union -> train the cores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from peft import inject_adapter_in_model
from torch import nn

from ..core import ALLOCATORS, SCOPES, STATS_MODES, FactorizedLinear, compress_model, find_targets
from ..core.byte_budget import SPARSE_POSITION_BYTES, ByteBudget, check_unit
from ..core.compact import attach_sparse_structure
from ..core.error_aware import check_compensation
from ..core.measured import check_measure_step
from ..core.sparse import (
    SPARSE_INITS,
    SparseDelta,
    sparse_index_bytes,
    sparse_residual,
    top_support,
    uniform_nnz,
    weight_fisher,
)
from ..core.subspace import WEIGHT_BASES
from .base import CalibSettings, MethodContext, check_budget, choice, register, train_cores
from .low_rank import LowRankMethod
from .peft_adapters import check_lora_options, is_adapter_parameter, lora_config, merge_adapters


@register("jactus")
class Jactus(LowRankMethod):
    """Joint adaptation and compression with a task-aware union of subspaces (docs/METHOD.md sections 1-5).

    The ablations of the paper are knobs: `rho=0` (weight subspace only), `weight_basis=plain`,
    `allocator=uniform`, `stats_mode=input` (Sg = I) or `gradient` (Sx = I). Compression runs through the
    memory-bounded `compress_model` with the `calib` group's memory options (`CalibSettings`: `max_stats_bytes`
    bounds the statistics held at once, `stats_dtype` is the dtype of their running sums, ...).

    `sparse_share` > 0 (docs/METHOD.md section 10, the sparse share) gives that fraction of the budget to a sparse
    correction `S x` on every factorized layer: the ranks are planned for `budget * (1 - sparse_share)`, then
    `floor(sparse_share * budget * P)` non-zeros (P: the parameters in the budget's scope) are spread over the
    factorized layers at one density (in proportion to their m n), each layer's support being its largest entries
    of the weight Fisher (sum over calibration batches of (g^T x)^2) measured on the factorized model; the values
    start at zero (the factorized model is unchanged at init) and train with the cores. `sparse_init=residual`
    (beyond the papers) starts them at the residual `W - U C V^T` instead, on the support of the largest
    `F * R^2` (the diagonal Fisher's loss for leaving that entry out), so the sparse share improves the
    compressed start itself (it keeps a CPU copy of the targets' dense weights during compression). Deployed =
    low-rank + the non-zeros; the supports' CSR index bytes are reported apart (`sparse_index_bytes`), as TACO
    reports them. With `unit=bytes` the share is of the byte budget and a non-zero costs its value plus an int32
    position (as stored). Decision where the papers are silent: one density for all layers (RoSA's per-layer rule)
    rather than a global Fisher threshold, whose raw scores are not comparable across layers of different widths.

    `dense_adapter_r` > 0 (beyond the paper; default 0 = docs/METHOD.md section 3, where a target the plan keeps dense
    is frozen) puts a LoRA adapter (HF PEFT, rank `dense_adapter_r`, scale `dense_adapter_alpha / r`, no dropout) on
    every target the plan kept dense, trained with the cores; `export` merges it into the dense weight, so the
    deployed size does not change. Motivation (issue 19 item 5): at budget 0.8 on SmolLM2, 53 of 210 targets (every
    `v_proj` among them) stay dense and would otherwise never adapt to the task; there r16 moved the validation NLL
    by -0.01 (experiments/results/offline_llama/validation, "Item 5"), so it is off by default.

    `share_bases=True` (beyond the paper; docs/METHOD.md section 3.3): targets that read one input (q/k/v, gate/up)
    share one input basis `V`, each with its own `U` and core; the allocator prices a group's rank at its real cost
    (`n + sum m_i`), so the same budget buys more rank (`compress_model(share_bases=True)`).

    `compensation` (beyond the paper; default null = one-shot; docs/METHOD.md section 12.1): error-aware compression,
    each block factorized from the inputs the compressed blocks before it produce, fitting `lam W x + (1 - lam) W x'`
    from `x'` (`compress_model(compensation=lam)`).

    `measure_batches` > 0 (beyond the paper; default 0 = the proxy's plan; docs/METHOD.md section 4.2): measured
    gains. That many calibration batches (the last ones) are held out of the statistics; each allocation unit is
    scored on them factorized alone at its planned rank and `measure_step` ranks more, and the ranks are planned
    again with each unit's proxy gains scaled by its measured/proxy ratio (`compress_model(measure_batches=)`).

    `core_dropout` > 0 (beyond the paper; default 0) regularises the cores as LoRA's dropout regularises its branch:
    in training, each core's change since the first step sees its input `V^T x` through dropout with that
    probability (`FactorizedLinear.anchor_core_dropout`; the start and the deployed model are unchanged). A resumed
    run anchors at the resumed cores. Not under FSDP (the anchor copies each core's full tensor). Motivation (issue
    19 item 5): at budget 0.8 on SmolLM2 the cores fit the training batches better than LoRA does while their
    validation NLL stays higher; there 0.1 moved the validation NLL by +0.005 over 150 steps (two seeds;
    experiments/results/offline_llama/validation, "Item 5"), so it is off by default.
    """

    input_batches = True  # input-only batches (generic text) may add to Sx (MethodContext.input_batches)

    def __init__(
        self,
        budget: float = 0.8,
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
        sparse_share: float = 0.0,
        sparse_init: str = "zero",
        dense_adapter_r: int = 0,
        dense_adapter_alpha: float = 16.0,
        core_dropout: float = 0.0,
        unit: str = "params",
        share_bases: bool | Sequence[str] = False,
        compensation: float | None = None,
        measure_batches: int = 0,
        measure_step: int = 32,
    ):
        super().__init__()
        if isinstance(measure_batches, bool) or not isinstance(measure_batches, int) or measure_batches < 0:
            raise ValueError(f"method.measure_batches={measure_batches!r}: expected the number of calibration batches "
                             f"held out to measure each unit's gain (0 = off, the proxy's plan; e.g. 8)")
        self.measure_batches = measure_batches
        self.measure_step = check_measure_step(measure_step, int(rank_multiple)) if measure_batches else measure_step
        self.unit = check_unit(unit)
        self.compensation = check_compensation(compensation, "method.compensation")
        if not isinstance(share_bases, bool) and not (isinstance(share_bases, (list, tuple)) and share_bases and all(
                isinstance(kind, str) and kind for kind in share_bases)):
            raise ValueError(f"method.share_bases={share_bases!r}: expected true (the layers that read one input share "
                             f"one input basis), false, or the kinds that share, e.g. [gate_proj, up_proj]")
        self.share_bases = share_bases if isinstance(share_bases, bool) else list(share_bases)
        if isinstance(core_dropout, bool) or not isinstance(core_dropout, (int, float)) or not 0 <= core_dropout < 1:
            raise ValueError(f"method.core_dropout={core_dropout!r}: expected a dropout probability in [0, 1) on the "
                             f"cores' change (0 = off; e.g. 0.05, LoRA's default)")
        self.core_dropout = float(core_dropout)
        self._anchored: int | None = None  # id of the model whose cores are anchored
        if self.core_dropout:
            self.shardable = False
            self.unshardable_reason = ("method.core_dropout copies each core's full tensor at the first step, which a "
                                       "sharding strategy splits across ranks")
        if isinstance(dense_adapter_r, bool) or not isinstance(dense_adapter_r, int) or dense_adapter_r < 0:
            raise ValueError(f"method.dense_adapter_r={dense_adapter_r!r}: expected a LoRA rank >= 0 for the targets "
                             f"the plan keeps dense (0 = off, they stay frozen; e.g. 8)")
        if dense_adapter_r:
            check_lora_options("jactus (dense_adapter)", dense_adapter_r, dense_adapter_alpha, 0.0)
        self.dense_adapter_r, self.dense_adapter_alpha = dense_adapter_r, float(dense_adapter_alpha)
        self.dense_adapted: list[str] = []
        self._budget = check_budget(budget, "jactus")
        if isinstance(sparse_share, bool) or not isinstance(sparse_share, (int, float)) or not 0 <= sparse_share < 1:
            raise ValueError(f"method.sparse_share={sparse_share!r}: expected a fraction of the budget in [0, 1) "
                             f"(0 = off; e.g. 0.02), leaving the rest to the low-rank layers")
        self.sparse_share = float(sparse_share)
        self.sparse_init = choice(sparse_init, SPARSE_INITS, "method.sparse_init")
        self.sparse_nnz: dict[str, int] = {}
        self.sparse_index_bytes = 0
        self.scope = choice(scope, SCOPES, "budget.scope")
        self.allocator = choice(allocator, ALLOCATORS, "allocator")
        self.stats_mode = choice(stats_mode, STATS_MODES, "method.stats_mode")
        self.weight_basis = choice(weight_basis, WEIGHT_BASES, "method.weight_basis")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"method.rho={rho}: expected a fraction in [0, 1]")
        if rank_multiple < 1:
            raise ValueError(f"allocator.rank_multiple={rank_multiple}: expected a positive integer")
        if damping < 0:
            raise ValueError(f"calib.damping={damping}: expected >= 0")
        self.rank_multiple, self.rho, self.damping = int(rank_multiple), float(rho), float(damping)
        self.targets = list(targets) if targets else None
        self.mask_key = mask_key
        self.calib = CalibSettings.from_config(calib)
        self.compress_stats: dict | None = None

    @property
    def budget(self) -> float:
        return self._budget

    def apply(self, ctx: MethodContext) -> nn.Module:
        if ctx.calibration_batches is None:
            raise ValueError("jactus needs calibration batches (the datamodule's calibration_dataloader())")
        self.head_names = list(ctx.head_names)
        targets = find_targets(ctx.model, self.targets) if self.sparse_share else {}
        if self.unit == "bytes" and self.sparse_share:  # the dense model's bytes, before compression changes it
            byte_budget = ByteBudget.of(ctx.model, self.budget, self.scope, targets)
        low_rank_budget = self.params_budget(ctx.model, self.budget * (1.0 - self.sparse_share), self.targets)
        dense = None  # the targets' dense weights, on the CPU, for a sparse share that starts at the residual
        if self.sparse_share and self.sparse_init == "residual":
            dense = {name: module.weight.detach().to("cpu", copy=True) for name, module in targets.items()}
        try:
            model, self.plan = self.compress(ctx, low_rank_budget)
        except ValueError as err:
            if not self.sparse_share:
                raise
            raise ValueError(f"method.sparse_share={self.sparse_share} leaves {low_rank_budget:.4f} of the model to "
                             f"the low-rank layers, which no plan meets ({err}); lower the sparse share") from err
        self.compress_stats = model.jactus_compress_stats
        if self.sparse_share:
            if self.unit == "bytes":  # each non-zero stores its value and an int32 position
                nnz = math.floor(self.sparse_share * byte_budget.limit) // (byte_budget.itemsize
                                                                            + SPARSE_POSITION_BYTES)
            else:  # the plan's params_original: the parameters in the budget's scope (model or targets)
                nnz = math.floor(self.sparse_share * self.budget * self.plan.params_original)
            self._add_sparse(model, ctx, nnz, dense)
        return self._adapt_dense(model)

    def _adapt_dense(self, model: nn.Module) -> nn.Module:
        """LoRA on the targets the plan kept dense (`dense_adapter_r` > 0), trained with the cores."""
        if not self.dense_adapter_r:
            return model
        self.dense_adapted = sorted(name for name, rank in self.plan.ranks.items() if rank is None)
        if not self.dense_adapted:
            return model  # every target is factorized: nothing stays dense, nothing to adapt
        config = lora_config(self.dense_adapted, r=self.dense_adapter_r, lora_alpha=self.dense_adapter_alpha,
                             lora_dropout=0.0)
        model = inject_adapter_in_model(config, model)
        train_cores(model, self.head_names, also=lambda name, _: is_adapter_parameter(name))
        return model

    def on_train_batch_start(self, model: nn.Module, step: int, max_steps: int) -> None:
        """Core dropout: anchor every core at the first training batch (after a checkpoint's weights are loaded)."""
        if self.core_dropout and self._anchored != id(model):
            for layer in model.modules():
                if isinstance(layer, FactorizedLinear):
                    layer.anchor_core_dropout(self.core_dropout)
            self._anchored = id(model)

    def export(self, model: nn.Module) -> nn.Module:
        """Merge the dense targets' adapters (if any) into their weights, then fold every core (U <- U C)."""
        return super().export(merge_adapters(model))

    def _add_sparse(self, model: nn.Module, ctx: MethodContext, nnz_total: int,
                    dense: dict[str, torch.Tensor] | None = None) -> None:
        """The sparse share on every factorized layer: support from the weight Fisher `F` on the factorized model;
        values zero, or with `dense` (the targets' dense weights, `sparse_init=residual`) the residual `R = W - U C
        V^T` at the support chosen by `F * R^2` (the loss the diagonal Fisher assigns to leaving that entry out)."""
        layers = {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}
        if not layers:
            raise ValueError(f"method.sparse_share={self.sparse_share}: the plan kept every target dense, so there "
                             f"is no low-rank layer to correct; lower the budget or the sparse share")
        counts = uniform_nnz({name: (m.out_features, m.in_features) for name, m in layers.items()}, nnz_total)
        scores = weight_fisher(model, layers, list(ctx.calibration_batches), ctx.loss_fn)
        for name, layer in layers.items():
            values = None
            if dense is not None:
                residual = sparse_residual(dense[name], layer)
                index = top_support(scores[name] * residual.square(), counts[name])
                values = residual.flatten()[index].to(layer.U.device)  # fp32, as every trainable tensor
            else:
                index = top_support(scores[name], counts[name])
            layer.sparse = SparseDelta(layer.out_features, layer.in_features, index.to(layer.U.device), values)
        self.sparse_nnz = counts
        self.sparse_index_bytes = sparse_index_bytes(layer.sparse for layer in layers.values())
        train_cores(model, self.head_names)  # the values train with the cores

    def compress(self, ctx: MethodContext, budget: float | list[float], **options):
        """The one compression driver with this method's options (`options`: further `compress_model` keywords):
        `(model, plan)`, or a list of them for a list of budgets (`jactus-compress`: one calibration for all)."""
        batches, held_out = ctx.calibration_batches, None
        if self.measure_batches:
            batches = list(batches)
            if self.measure_batches >= len(batches):
                raise ValueError(f"method.measure_batches={self.measure_batches} holds out every one of the "
                                 f"{len(batches)} calibration batches; hold out fewer, or calibrate on more items "
                                 f"(calib.num_samples)")
            batches, held_out = batches[:-self.measure_batches], batches[-self.measure_batches:]
            options = {"measure_batches": held_out, "measure_step": self.measure_step, **options}
        return compress_model(
            ctx.model,
            batches,
            ctx.loss_fn,
            budget,
            targets=self.targets,
            allocator=self.allocator,
            scope=self.scope,
            rank_multiple=self.rank_multiple,
            rho=self.rho,
            weight_basis=self.weight_basis,
            stats_mode=self.stats_mode,
            damping=self.damping,
            mask_key=self.mask_key,
            head_names=ctx.head_names,
            device=ctx.device,
            **self.calib.driver_kwargs(),
            **{"share_bases": self.share_bases, "compensation": self.compensation,
               "input_batches": ctx.input_batches, **options},
        )

    def structure(self) -> dict | None:
        structure = super().structure()
        if structure is not None and self.sparse_nnz:
            structure["sparse_nnz"] = self.sparse_nnz
        return structure

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        self.sparse_nnz = dict(structure.get("sparse_nnz") or {})
        return super().rebuild(model, structure)

    def prepare_rebuilt(self, model: nn.Module) -> nn.Module:
        attach_sparse_structure(model, self.sparse_nnz)  # the supports and values come from the checkpoint
        self.sparse_index_bytes = sparse_index_bytes(model.get_submodule(name).sparse for name in self.sparse_nnz)
        return self._adapt_dense(super().prepare_rebuilt(model))

    def summary(self) -> dict:
        summary = super().summary()
        if summary and self.compress_stats:
            summary["compress_stats"] = self.compress_stats
        if summary and self.sparse_nnz:
            summary["sparse"] = {"share": self.sparse_share, "nnz": sum(self.sparse_nnz.values()),
                                 "layers": len(self.sparse_nnz), "index_bytes_csr_int32": self.sparse_index_bytes}
        if summary and self.plan is not None and self.plan.shared:
            summary["shared_bases"] = self.plan.shared
        if summary and self.measure_batches:
            summary["measured_gains"] = {"batches": self.measure_batches, "step": self.measure_step}
        if summary and self.core_dropout:
            summary["core_dropout"] = self.core_dropout
        if summary and self.dense_adapter_r:
            summary["dense_adapter"] = {"r": self.dense_adapter_r, "alpha": self.dense_adapter_alpha,
                                        "layers": len(self.dense_adapted)}
        return summary
