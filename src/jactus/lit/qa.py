"""Multiple-choice QA over any HF causal LM.

Training: prompt + answer, loss on the answer tokens only (labels are -100 elsewhere; HF shifts them).
Evaluation: each choice is scored by its length-normalised log-likelihood (mean log-probability of the choice's
tokens given the prompt); the prediction is the argmax over a question's choices, and a question's `nll` is minus the
gold choice's score (the gold answer's per-token negative log-likelihood).
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

    def loss_and_logits(self, model, batch):
        """Mean cross-entropy over the labelled (answer) tokens: HF's causal-LM loss, computed without the
        vocabulary-sized head on the unlabelled prompt positions (see `labelled_logits`)."""
        logits, targets, rows = labelled_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return F.cross_entropy(logits.float(), targets), logits, rows

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
        rows = torch.arange(gold.shape[0], device=table.device)
        return {"correct": table.argmax(dim=-1) == gold, "nll": -table[rows, gold], "task_idx": batch["task_idx"]}


def labelled_logits(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits at the labelled positions only: (logits [M, V], targets [M], row of each [M]).

    Position t predicts token t + 1, so the rows of `labels[:, 1:] != -100` are kept. The answer tokens are a small
    fraction of a QA batch, and the LM head (576 x 49152 for SmolLM2, a fifth of its linear FLOPs) costs as much per
    position as a transformer block; a forward pre-hook on the output embedding hands it only those positions, in
    the forward and the backward. Models without `get_output_embeddings()` take the full-logits path."""
    targets = labels[:, 1:]
    mask = targets != -100
    rows = torch.nonzero(mask)[:, 0]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
        return logits, targets[mask], rows

    def keep_labelled(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
            raise RuntimeError(f"the output embedding got hidden states of shape {tuple(hidden.shape)}; expected "
                               f"[batch, length, hidden] for input_ids {tuple(input_ids.shape)}")
        return (hidden[:, :-1][mask], *args[1:])

    handle = head.register_forward_pre_hook(keep_labelled)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()
    return logits, targets[mask], rows


def choice_scores(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean log-probability of each row's labelled tokens (labels != -100), [N].

    Only the labelled positions go through the LM head and the (vocabulary-sized) log-softmax."""
    logits, targets, rows = labelled_logits(model, input_ids, attention_mask, labels)
    token_logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    totals = torch.zeros(input_ids.shape[0], device=token_logp.device).index_add_(0, rows, token_logp)
    counts = torch.bincount(rows, minlength=input_ids.shape[0]).to(totals.dtype)
    return totals / counts.clamp_min(1)
