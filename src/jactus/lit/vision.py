"""Image classification over any timm model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import TaskModule


class ImageClassifier(TaskModule):
    family = "vision"

    def calibration_loss(self, model, batch) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def score_batch(self, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        predictions = self.model(images).argmax(dim=-1)
        return {"correct": predictions == labels, "task_idx": torch.zeros_like(labels)}
