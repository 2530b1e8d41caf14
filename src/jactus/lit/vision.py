"""Image classification over any timm model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.modes import module_modes, restore_modes
from .base import TaskModule


class ImageClassifier(TaskModule):
    family = "vision"

    def loss_and_logits(self, model, batch):
        images, labels = batch[0], batch[1]  # training batches also carry their example indices (batch[2])
        logits = model(images)
        return F.cross_entropy(logits, labels), logits, torch.arange(labels.shape[0], device=labels.device)

    def warmup_head(self, batches, steps: int, lr: float) -> None:
        """Linear probe on cached features: the frozen backbone runs once per batch, not once per step.

        Same result as core.warmup_head (the backbone is frozen and in eval mode there) at a fraction of the cost,
        the same under DDP too (rank 0's head, gradients averaged over the ranks' shards). Falls back to it for
        models without timm's forward_features / forward_head."""
        from ..core.calibration import average_gradients, broadcast_parameters

        model = self.model
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")) or steps <= 0:
            return super().warmup_head(batches, steps, lr)
        head = model.get_classifier() if hasattr(model, "get_classifier") else model.get_submodule(self.head_names[0])
        modes = module_modes(model)
        model.eval()
        with torch.no_grad():
            cached = [(model.forward_head(model.forward_features(batch[0]), pre_logits=True), batch[1])
                      for batch in batches]
        params = list(head.parameters())
        broadcast_parameters(params)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for step in range(steps):
            features, labels = cached[step % len(cached)]
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)
            optimizer.step()
        restore_modes(modes)

    def score_batch(self, batch) -> dict[str, torch.Tensor]:
        images, labels = batch[0], batch[1]
        logits = self.model(images)
        return {"correct": logits.argmax(dim=-1) == labels,
                "nll": F.cross_entropy(logits.float(), labels, reduction="none"),
                "task_idx": torch.zeros_like(labels)}
