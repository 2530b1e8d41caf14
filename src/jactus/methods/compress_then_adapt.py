"""Compress first, then adapt: task-agnostic low-rank compression to the budget, then LoRA on the factors.

1. Calibrate input statistics only (`Sx`, no task gradients) on the unlabeled calibration inputs (the
   memory-bounded driver `compress_model`, with the `calib` group's memory options).
2. Plan the ranks (`uniform` or `marginal_gain`, the `allocator` group) and factorize every target linear with one of
   the classic compressors: `svd` (plain SVD of W), `asvd` (activation-aware diagonal scaling), `svdllm` (whitening by
   `Sx`); the core is folded at once, so each layer is a deployed `LowRankLinear` (`down` n -> r, `up` r -> m).
3. HF PEFT LoRA on every factor linear (`*.down`, `*.up`); only the adapters (and task heads) train.
`export` merges each adapter into its factor, so the deployed model has exactly the compressed size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from peft import inject_adapter_in_model
from torch import nn

from ..core import BUDGET_ALLOCATORS, SCOPES, LowRankLinear, compress_model, fold_factorized
from ..core.byte_budget import check_unit
from ..core.error_aware import check_compensation
from .base import CalibSettings, MethodContext, check_budget, check_positive, choice, register, set_trainable
from .low_rank import LowRankMethod
from .peft_adapters import check_lora_options, is_adapter_parameter, lora_config, merge_adapters

# compressor -> the statistics mode of core.factorize that implements it
COMPRESSORS = {"svd": "none", "asvd": "asvd", "svdllm": "input"}


def calibration_batches(batches: Iterable | None, method: str) -> list:
    """The calibration set, materialised once (the driver reads it once per pass)."""
    if batches is None:
        raise ValueError(f"method {method!r} needs calibration batches (the datamodule's calibration_dataloader())")
    batches = list(batches)
    if not batches:
        raise ValueError(f"method {method!r}: the calibration set is empty")
    return batches


def factor_linears(model: nn.Module) -> list[str]:
    """Names of the `down`/`up` linears of every `LowRankLinear`: the layers LoRA adapts."""
    return sorted(f"{name}.{part}" for name, module in model.named_modules()
                  if isinstance(module, LowRankLinear) for part in ("down", "up"))


@register("compress_then_adapt")
class CompressThenAdapt(LowRankMethod):
    """A classic compressor to the budget, then LoRA on the factors (docs/METHOD.md section 6)."""

    layer_cls = LowRankLinear  # the core is folded at once; LoRA adapts the factors
    input_batches = True  # input-only batches (generic text) add to its whitening Sx (MethodContext.input_batches)

    def __init__(
        self,
        budget: float = 0.8,
        compressor: str = "svdllm",
        allocator: str = "uniform",
        scope: str = "model",
        rank_multiple: int = 8,
        r: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.05,
        damping: float = 1e-2,
        targets: Sequence[str] | None = None,
        mask_key: str = "attention_mask",
        calib: Mapping | None = None,
        unit: str = "params",
        compensation: float | None = None,
    ):
        super().__init__()
        self._budget = check_budget(budget, "compress_then_adapt")
        self.compensation = check_compensation(compensation, "method.compensation")
        self.unit = check_unit(unit)
        self.compressor = choice(compressor, list(COMPRESSORS), "method.compressor")
        self.allocator = choice(allocator, BUDGET_ALLOCATORS, "allocator")
        self.scope = choice(scope, SCOPES, "budget.scope")
        self.rank_multiple = check_positive(rank_multiple, "allocator.rank_multiple")
        check_lora_options("compress_then_adapt", r, lora_alpha, lora_dropout)
        self.r, self.lora_alpha, self.lora_dropout = r, float(lora_alpha), float(lora_dropout)
        if damping < 0:
            raise ValueError(f"calib.damping={damping!r}: expected >= 0")
        self.damping = float(damping)
        self.targets = list(targets) if targets else None
        self.mask_key = mask_key
        self.calib = CalibSettings.from_config(calib)
        self.adapted_layers: list[str] = []

    @property
    def budget(self) -> float:
        return self._budget

    @property
    def stats_mode(self) -> str:
        return COMPRESSORS[self.compressor]

    def apply(self, ctx: MethodContext) -> nn.Module:
        batches = None if self.stats_mode == "none" else calibration_batches(ctx.calibration_batches, self.name)
        self.head_names = list(ctx.head_names)
        # Task-agnostic: input statistics of the unlabeled inputs only (no task gradients), the weight's own SVD in
        # that metric (rho = 0: no task directions).
        budget = self.params_budget(ctx.model, self.budget, self.targets)
        model, self.plan = compress_model(ctx.model, batches, ctx.loss_fn, budget, targets=self.targets,
                                          allocator=self.allocator, scope=self.scope,
                                          rank_multiple=self.rank_multiple, rho=0.0, weight_basis="whitened",
                                          stats_mode=self.stats_mode, damping=self.damping, mask_key=self.mask_key,
                                          head_names=self.head_names, device=ctx.device,
                                          compensation=self.compensation, input_batches=ctx.input_batches,
                                          **self.calib.driver_kwargs())
        return self._adapt(fold_factorized(model))

    def _adapt(self, model: nn.Module) -> nn.Module:
        self.adapted_layers = factor_linears(model)
        config = lora_config(self.adapted_layers, r=self.r, lora_alpha=self.lora_alpha,
                             lora_dropout=self.lora_dropout)
        model = inject_adapter_in_model(config, model)
        set_trainable(model, head_names=self.head_names, extra=lambda name, _: is_adapter_parameter(name))
        return model

    def export(self, model: nn.Module) -> nn.Module:
        """Merge each LoRA delta into its factor: the LowRankLinear shapes, hence the deployed size, do not change."""
        return merge_adapters(model)

    def prepare_rebuilt(self, model: nn.Module) -> nn.Module:
        return self._adapt(model)

    def summary(self) -> dict:
        summary = super().summary()
        if not summary:
            return {}
        return {"compressor": self.compressor, "allocator": self.allocator, **summary, "adapter_rank": self.r,
                "adapted_layers": len(self.adapted_layers)}
