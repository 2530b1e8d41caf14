"""The PEFT anchors: LoRA, DoRA and PiSSA adapters (HF PEFT) on the full-size model (docs/METHOD.md section 6).

Adapters are injected in place (`peft.inject_adapter_in_model`), so the trained module keeps the backbone's class,
parameter names and forward signature (timm models and HF causal LMs alike); `export` merges every adapter into its
base weight and puts the plain `nn.Linear` back, so the deployed model is the original architecture at 100% size.
"""

from __future__ import annotations

from collections.abc import Sequence

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core import find_targets
from .base import Method, MethodContext, register, set_trainable

ADAPTER_PARAMETER_MARKERS = ("lora_A", "lora_B", "lora_magnitude_vector")


def is_adapter_parameter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_PARAMETER_MARKERS)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every PEFT adapter into its base layer and put the base layer back in its place (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def lora_config(
    target_modules: Sequence[str],
    *,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    rank_pattern: dict | None = None,
    use_dora: bool = False,
    init_lora_weights: bool | str = True,
) -> LoraConfig:
    """A LoRA config on exactly the named modules (full names: no suffix match can catch e.g. a patch-embed `proj`)."""
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        rank_pattern=dict(rank_pattern or {}),
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        bias="none",
    )


def check_lora_options(method: str, r: int, lora_alpha: float, lora_dropout: float) -> None:
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"method.r={r!r} for {method!r}: expected a positive integer rank, e.g. 16")
    if lora_alpha <= 0:
        raise ValueError(f"method.lora_alpha={lora_alpha!r} for {method!r}: expected > 0, e.g. 2 * r")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"method.lora_dropout={lora_dropout!r} for {method!r}: expected a probability in [0, 1)")


class PeftAdapterMethod(Method):
    """LoRA-family adapters on the target linears (the JACTUS targets by default); adapters and heads train."""

    use_dora: bool = False

    def __init__(
        self,
        r: int = 16,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] | None = None,
        rank_pattern: dict | None = None,
    ):
        check_lora_options(self.name, r, lora_alpha, lora_dropout)
        self.r, self.lora_alpha, self.lora_dropout = r, float(lora_alpha), float(lora_dropout)
        self.target_patterns = list(target_modules) if target_modules else None
        self.rank_pattern = dict(rank_pattern or {})
        self.adapted_layers: list[str] = []
        self.head_names: list[str] = []
        self.params_adapter: int | None = None

    def init_lora_weights(self) -> bool | str:
        return True

    def _inject(self, model: nn.Module, init_lora_weights: bool | str) -> nn.Module:
        config = lora_config(
            self.adapted_layers,
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            rank_pattern=self.rank_pattern,
            use_dora=self.use_dora,
            init_lora_weights=init_lora_weights,
        )
        model = inject_adapter_in_model(config, model)
        set_trainable(model, head_names=self.head_names, extra=lambda name, _: is_adapter_parameter(name))
        self.params_adapter = sum(p.numel() for n, p in model.named_parameters() if is_adapter_parameter(n))
        return model

    def apply(self, ctx: MethodContext) -> nn.Module:
        self.adapted_layers = sorted(find_targets(ctx.model, self.target_patterns))
        if not self.adapted_layers:
            raise ValueError(f"method {self.name!r}: no linear layer matches target_modules={self.target_patterns!r}")
        self.head_names = list(ctx.head_names)
        return self._inject(ctx.model, self.init_lora_weights())

    def export(self, model: nn.Module) -> nn.Module:
        return merge_adapters(model)

    def structure(self) -> dict | None:
        if not self.adapted_layers:
            return None
        return {"adapted_layers": self.adapted_layers, "head_names": self.head_names}

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        # The checkpoint holds every weight (PiSSA's residual base weights too), so the cheap default init suffices.
        self.adapted_layers = list(structure["adapted_layers"])
        self.head_names = list(structure["head_names"])
        return self._inject(model, True)

    def summary(self) -> dict:
        return {"adapter_rank": self.r, "lora_alpha": self.lora_alpha, "adapted_layers": len(self.adapted_layers),
                "params_adapter": self.params_adapter}


@register("lora")
class LoRA(PeftAdapterMethod):
    """LoRA: W + (alpha / r) B A with B = 0 at init."""


@register("dora")
class DoRA(PeftAdapterMethod):
    """DoRA: magnitude-direction decomposition, m * (W + (alpha / r) B A) / ||W + (alpha / r) B A||_col."""

    use_dora = True


@register("pissa")
class PiSSA(PeftAdapterMethod):
    """PiSSA: the adapter starts as the principal singular components of W, the base weight keeps the residual.

    `pissa_niter` null = an exact SVD, an integer = PEFT's fast randomised SVD with that many subspace iterations."""

    def __init__(self, *args, pissa_niter: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if pissa_niter is not None and (not isinstance(pissa_niter, int) or pissa_niter <= 0):
            raise ValueError(f"method.pissa_niter={pissa_niter!r}: expected null (exact SVD) or a positive integer")
        self.pissa_niter = pissa_niter

    def init_lora_weights(self) -> str:
        return "pissa" if self.pissa_niter is None else f"pissa_niter_{self.pissa_niter}"
