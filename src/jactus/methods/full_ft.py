"""Full fine-tuning and the linear probe: the two ends of the 100%-parameter spectrum."""

from __future__ import annotations

from torch import nn

from .base import Method, MethodContext, register, set_trainable


@register("full_ft")
class FullFineTuning(Method):
    """Every parameter trains; the deployed model is the original size."""

    def apply(self, ctx: MethodContext) -> nn.Module:
        for param in ctx.model.parameters():
            param.requires_grad_(True)
        return ctx.model


@register("linear_probe")
class LinearProbe(Method):
    """Only the task head trains (for causal LMs, which have no new head, only the norms)."""

    def apply(self, ctx: MethodContext) -> nn.Module:
        set_trainable(ctx.model, head_names=ctx.head_names, norms=not ctx.head_names)
        return ctx.model
