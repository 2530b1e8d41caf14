"""Multiple-choice QA over any HF causal LM.

Training: prompt + answer, loss on the answer tokens only (labels are -100 elsewhere; HF shifts them).
Evaluation: each choice is scored by its length-normalised log-likelihood (mean log-probability of the choice's
tokens given the prompt); the prediction is the argmax over a question's choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import TaskModule


class CausalLMQA(TaskModule):
    family = "causal_lm"

    def __init__(self, model, task_names: Sequence[str] = (), **kwargs):
        super().__init__(model, **kwargs)
        self._task_names = list(task_names)

    @property
    def task_names(self) -> list[str]:
        return self._task_names

    def calibration_loss(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def score_batch(self, batch) -> dict[str, torch.Tensor]:
        scores = choice_scores(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        owner, gold = batch["choice_owner"], batch["gold"]
        # Scatter the N choice scores into [B, K_max] rows (padded with -inf), then argmax per question.
        position = torch.zeros_like(owner)
        for row in range(gold.shape[0]):
            mine = owner == row
            position[mine] = torch.arange(int(mine.sum()), device=owner.device)
        table = torch.full((gold.shape[0], int(position.max()) + 1), float("-inf"), device=scores.device)
        table[owner, position] = scores
        return {"correct": table.argmax(dim=-1) == gold, "task_idx": batch["task_idx"]}


def choice_scores(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean log-probability of each row's labelled tokens (labels != -100), [N].

    Only the labelled positions go through the (vocabulary-sized) log-softmax, which keeps memory small."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    token_logp = F.log_softmax(logits[mask].float(), dim=-1).gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    rows = torch.nonzero(mask)[:, 0]
    totals = torch.zeros(input_ids.shape[0], device=token_logp.device).index_add_(0, rows, token_logp)
    return totals / mask.sum(dim=1).clamp_min(1)
