"""Multiple-choice QA over any HF causal LM.

Training: prompt + answer, loss on the answer tokens only (labels are -100 elsewhere; HF shifts them).
Evaluation: each choice is scored by its length-normalised log-likelihood (mean log-probability of the choice's
tokens given the prompt); the prediction is the argmax over a question's choices, and a question's `nll` is minus the
gold choice's score (the gold answer's per-token negative log-likelihood).

Scoring (`CausalLMQA(scoring=...)`): "shared_prefix" (default) runs each distinct prompt of a batch once (and the
template all its prompts start with once per batch) and continues every choice from the KV cache
(`shared_prefix_scores`); "full" runs every choice row with its whole prompt (`choice_scores`, the reference). They
agree to float rounding (tests/models/test_qa_scoring.py); a model that cannot continue from a cache takes the full
path, with the reason logged.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import TaskModule

log = logging.getLogger("jactus")
SCORINGS = ("shared_prefix", "full")
CALIB_LOSSES = ("task", "sequence")


class CausalLMQA(TaskModule):
    family = "causal_lm"

    def __init__(self, model, task_names: Sequence[str] = (), scoring: str = "shared_prefix",
                 calib_loss: str = "task", **kwargs):
        super().__init__(model, **kwargs)
        if scoring not in SCORINGS:
            raise ValueError(f"scoring={scoring!r}: expected one of {list(SCORINGS)}")
        if calib_loss not in CALIB_LOSSES:
            raise ValueError(f"calib.loss={calib_loss!r}: expected one of {list(CALIB_LOSSES)}")
        self._task_names = list(task_names)
        self.scoring = scoring
        self.calib_loss = calib_loss

    @property
    def task_names(self) -> list[str]:
        return self._task_names

    def loss_and_logits(self, model, batch):
        """Mean cross-entropy over the labelled (answer) tokens: HF's causal-LM loss, computed without the
        vocabulary-sized head on the unlabelled prompt positions (see `labelled_logits`)."""
        logits, targets, rows = labelled_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return F.cross_entropy(logits.float(), targets), logits, rows

    @property
    def calibration_loss_key(self) -> str | None:
        """What the statistics cache adds to this loss's name (None: the task loss)."""
        return None if self.calib_loss == "task" else self.calib_loss

    def calibration_loss(self, model, batch) -> torch.Tensor:
        """The loss whose output gradients calibration measures (`calib.loss`). "task": the training loss (the answer
        tokens). "sequence": next-token cross-entropy over every real token, prompt and answer -- far more gradient
        rows per item (a prompt is tens of tokens, an answer a few), at the price of directions the task's loss does
        not weigh. It is returned as the summed loss divided by the answer-token count that `calibrate`'s default
        normaliser multiplies back, so the statistics are those of the summed loss over the calibration set."""
        if self.calib_loss == "task":
            return super().calibration_loss(model, batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        every_token = input_ids.masked_fill(attention_mask == 0, -100)
        logits, targets, _ = labelled_logits(model, input_ids, attention_mask, every_token)
        total = F.cross_entropy(logits.float(), targets, reduction="sum")
        return total / max(int((batch["labels"][:, 1:] != -100).sum()), 1)

    def score_batch(self, batch) -> dict[str, torch.Tensor]:
        scores = choice_scores(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               scoring=self.scoring)
        owner, gold = batch["choice_owner"], batch["gold"]
        # Scatter the N choice scores into [B, K_max] rows (padded with -inf), then argmax per question.
        position = torch.zeros_like(owner)
        for row in range(gold.shape[0]):
            mine = owner == row
            position[mine] = torch.arange(int(mine.sum()), device=owner.device)
        table = torch.full((gold.shape[0], int(position.max()) + 1), float("-inf"), device=scores.device)
        table[owner, position] = scores
        rows = torch.arange(gold.shape[0], device=table.device)
        scored = {"correct": table.argmax(dim=-1) == gold, "nll": -table[rows, gold], "task_idx": batch["task_idx"]}
        if "item_idx" in batch:
            scored["item_idx"] = batch["item_idx"]
        return scored


def _logits_at(model, mask: torch.Tensor, **inputs):
    """(logits at the positions where `mask` [B, L] is true, [M, V]; the model's output). The LM head sees only
    those positions (a forward pre-hook on the output embedding), in the forward and the backward; models without
    `get_output_embeddings()` compute every position's logits and index them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        output = model(**inputs)
        return output.logits[mask], output

    def keep(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != mask.shape:
            raise RuntimeError(f"the output embedding got hidden states of shape {tuple(hidden.shape)}; expected "
                               f"[batch, length, hidden] for inputs of shape {tuple(mask.shape)}")
        return (hidden[mask], *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        output = model(**inputs)
    finally:
        handle.remove()
    return output.logits, output


def labelled_logits(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits at the labelled positions only: (logits [M, V], targets [M], row of each [M]).

    Position t predicts token t + 1, so the rows of `labels[:, 1:] != -100` are kept. The answer tokens are a small
    fraction of a QA batch, and the LM head (576 x 49152 for SmolLM2, a fifth of its linear FLOPs) costs as much per
    position as a transformer block; only those positions go through it (see `_logits_at`)."""
    targets = labels[:, 1:]
    mask = targets != -100
    rows = torch.nonzero(mask)[:, 0]
    at = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)  # [B, L]: position t where token t + 1 is labelled
    logits, _ = _logits_at(model, at, input_ids=input_ids, attention_mask=attention_mask)
    return logits, targets[mask], rows


def choice_scores(model, input_ids, attention_mask, labels, scoring: str = "full") -> torch.Tensor:
    """Mean log-probability of each row's labelled tokens (labels != -100), [N].

    "full": every row runs whole (the reference); only the labelled positions go through the LM head and the
    (vocabulary-sized) log-softmax. "shared_prefix": see `shared_prefix_scores` (same scores, faster)."""
    if scoring == "shared_prefix":
        return shared_prefix_scores(model, input_ids, attention_mask, labels)
    if scoring != "full":
        raise ValueError(f"scoring={scoring!r}: expected one of {list(SCORINGS)}")
    logits, targets, rows = labelled_logits(model, input_ids, attention_mask, labels)
    return _mean_logp(logits, targets, rows, input_ids.shape[0])


def _mean_logp(logits, targets, rows, count: int) -> torch.Tensor:
    token_logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    totals = torch.zeros(count, device=token_logp.device).index_add_(0, rows, token_logp)
    counts = torch.bincount(rows, minlength=count).to(totals.dtype)
    return totals / counts.clamp_min(1)


def shared_prefix_scores(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """`choice_scores` with each distinct prompt run once: the choices continue from its KV cache.

    A row is a prompt (its tokens before the first labelled one) followed by its answer (the labelled tokens up to
    the row's last real token), right padded: what `EvalCollator` builds. Rows with identical prompt tokens (the
    choices of a question, unless `_fit` cut its prompt differently per choice) share one prompt pass; a prompt cut
    differently is simply another prompt, so every row is scored exactly as in the full path. Up to three passes:
    the tokens every prompt of the batch starts with (the prompt template), once; the rest of each distinct prompt
    from that cache, which gives each answer's first logits (at the prompt's last position); every answer, [N,
    longest answer], from its prompt's cache (rows selected per answer), with the attention mask [prompt padding |
    answer padding] and position ids continuing from each prompt's length.

    Falls back to the full path (logged once per reason) for batches that are not laid out as above and for models
    whose forward takes no cache (`cache` / `past_key_values`) or `position_ids`, or returns no cache."""
    keyword, reason = cache_keyword(model)
    reason = reason or _layout_problem(attention_mask, labels)
    if reason is None:
        scores = _shared_prefix_scores(model, keyword, input_ids, attention_mask, labels)
        if scores is not None:
            return scores
        reason = "the model returned no past_key_values"
    _warn_once(reason)
    return choice_scores(model, input_ids, attention_mask, labels, scoring="full")


def _shared_prefix_scores(model, keyword: str, input_ids, attention_mask, labels) -> torch.Tensor | None:
    device, count = input_ids.device, input_ids.shape[0]
    lengths = attention_mask.sum(dim=1)
    starts = (labels != -100).int().argmax(dim=1)  # first labelled position = the prompt's length
    # Group rows by their prompt tokens (a question's choices share one unless their left-cuts differ).
    groups: dict[tuple[int, ...], int] = {}
    group_of = []
    for row, start in enumerate(starts.tolist()):
        group_of.append(groups.setdefault(tuple(input_ids[row, :start].tolist()), len(groups)))
    group_of = torch.tensor(group_of, device=device)
    prompt_lengths = torch.tensor([len(prompt) for prompt in groups], device=device)
    width = int(prompt_lengths.max())
    prompts = torch.zeros(len(groups), width, dtype=input_ids.dtype, device=device)
    positions = torch.arange(width, device=device)
    prompt_mask = (positions < prompt_lengths[:, None]).long()
    for index, prompt in enumerate(groups):
        prompts[index, :len(prompt)] = torch.tensor(prompt, dtype=input_ids.dtype, device=device)
    # Tokens every prompt of the batch starts with (the prompt template) run once for the whole batch, keeping at
    # least one token of each prompt for the second pass (its last position gives the answer's first logits).
    shared = _common_prefix_length(list(groups), int(prompt_lengths.min()) - 1)
    cache = None
    if shared > 0:
        _, output = _logits_at(model, torch.zeros(1, shared, dtype=torch.bool, device=device),
                               input_ids=prompts[:1, :shared], attention_mask=prompt_mask[:1, :shared],
                               position_ids=positions[None, :shared], use_cache=True)
        cache = output_cache(output)
        if cache is None:
            return None
        cache = _select_rows(cache, torch.zeros(len(groups), dtype=torch.long, device=device))
    last = positions[None, shared:] == (prompt_lengths[:, None] - 1)  # the prompt's last position: answer token 0
    first_logits, output = _logits_at(model, last, input_ids=prompts[:, shared:], attention_mask=prompt_mask,
                                      position_ids=positions[shared:].expand(len(groups), -1), use_cache=True,
                                      **({keyword: cache} if cache is not None else {}))
    cache = output_cache(output)
    if cache is None:
        return None
    del output

    answer_lengths = lengths - starts
    answer_width = int(answer_lengths.max())
    steps = torch.arange(answer_width, device=device)
    take = (starts[:, None] + steps[None, :]).clamp_max(input_ids.shape[1] - 1)
    answer_mask = steps[None, :] < answer_lengths[:, None]
    answers = torch.where(answer_mask, input_ids.gather(1, take), torch.zeros_like(take))
    # Answer position j predicts answer token j + 1: all but each answer's last position go through the head.
    predicts = steps[None, :] < (answer_lengths[:, None] - 1)
    rest_targets = answers[:, 1:][predicts[:, :-1]]
    rest_rows = torch.nonzero(predicts)[:, 0]
    if answer_width > 1:
        rest_logits, _ = _logits_at(
            model, predicts, input_ids=answers,
            attention_mask=torch.cat([prompt_mask[group_of], answer_mask.long()], dim=1),
            position_ids=prompt_lengths[group_of][:, None] + steps[None, :],
            use_cache=True, **{keyword: _select_rows(cache, group_of)})
    else:
        rest_logits = first_logits.new_zeros(0, first_logits.shape[-1])
    logits = torch.cat([first_logits[group_of], rest_logits])
    targets = torch.cat([answers[:, 0], rest_targets])
    rows = torch.cat([torch.arange(count, device=device), rest_rows])
    return _mean_logp(logits, targets, rows, count)


def _common_prefix_length(sequences: list[tuple[int, ...]], limit: int) -> int:
    """How many leading tokens all `sequences` share, at most `limit`."""
    length = 0
    first = sequences[0]
    while length < min(limit, len(first)) and all(sequence[length] == first[length] for sequence in sequences):
        length += 1
    return length


def output_cache(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def _select_rows(cache, index: torch.Tensor):
    """The cache with batch rows `index` (repeated as needed): a `transformers.Cache` or legacy tuples."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)  # index_select on every layer; a longer index repeats rows
        return cache
    return tuple(tuple(tensor.index_select(0, index) for tensor in layer) for layer in cache)


def cache_keyword(model) -> tuple[str, str | None]:
    """The forward's cache argument ("cache" in transformers >= 5.2x, "past_key_values" before) and why `model`
    cannot continue from a prompt's cache (None when it can)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "", f"{type(model).__name__} is an encoder-decoder model"
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    keyword = "cache" if "cache" in parameters else "past_key_values"
    missing = [name for name in (keyword, "position_ids", "use_cache") if name not in parameters and not takes_any]
    missing = ["cache or past_key_values" if name == keyword else name for name in missing]
    if missing:
        return keyword, f"{type(model).__name__}.forward takes no {', '.join(missing)}"
    return keyword, None


def _layout_problem(attention_mask, labels) -> str | None:
    """None when every row is right padded and its labels are one block ending at its last real token after a
    non-empty prompt (the layout `shared_prefix_scores` reads prompts and answers from)."""
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
    starts = (labels != -100).int().argmax(dim=1)
    right_padded = torch.equal(attention_mask.bool(), positions < lengths[:, None])
    block = (positions >= starts[:, None]) & (positions < lengths[:, None])
    if not right_padded or not torch.equal(labels != -100, block) or bool((starts < 1).any()):
        return ("the batch is not right-padded prompt + labelled answer rows (each answer one labelled block ending "
                "at the row's last real token, after at least one prompt token)")
    return None


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        log.warning("shared-prefix scoring falls back to the full path: %s", reason)
