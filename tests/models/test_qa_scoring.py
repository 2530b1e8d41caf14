"""The QA loss and choice scores run the LM head on the labelled positions only; they must equal the full path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jactus.lit.qa import CausalLMQA, choice_scores, labelled_logits
from jactus.models import create_causal_lm

from .conftest import TINY_LLAMA


def _batch(vocab: int, seed: int = 0):
    """Right-padded rows of different prompt and answer lengths; labels only on each row's answer."""
    generator = torch.Generator().manual_seed(seed)
    lengths, answers = [9, 14, 6], [3, 1, 4]
    width = max(lengths)
    input_ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (n, a) in enumerate(zip(lengths, answers, strict=True)):
        attention_mask[row, :n] = 1
        labels[row, n - a:n] = input_ids[row, n - a:n]
    return input_ids, attention_mask, labels


def _model():
    model = create_causal_lm(config=TINY_LLAMA).model
    model.eval()
    return model


def test_labelled_logits_equal_the_full_logits_at_the_labelled_positions():
    model = _model()
    input_ids, attention_mask, labels = _batch(model.config.vocab_size)
    logits, targets, rows = labelled_logits(model, input_ids, attention_mask, labels)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    mask = labels[:, 1:] != -100
    assert logits.shape == (int(mask.sum()), model.config.vocab_size)
    torch.testing.assert_close(logits, full[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, labels[:, 1:][mask])
    assert rows.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    # the hook is gone afterwards: a plain forward gives every position again
    assert model(input_ids=input_ids, attention_mask=attention_mask).logits.shape[1] == input_ids.shape[1]


def test_loss_and_gradients_equal_hf_causal_lm_loss():
    model = _model()
    module = CausalLMQA(model)
    input_ids, attention_mask, labels = _batch(model.config.vocab_size, seed=1)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    ours = module.calibration_loss(model, batch)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert ours_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_choice_scores_are_the_mean_log_probability_of_each_answer():
    model = _model()
    input_ids, attention_mask, labels = _batch(model.config.vocab_size, seed=2)
    scores = choice_scores(model, input_ids, attention_mask, labels)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1], dim=-1)
    expected = []
    for row in range(input_ids.shape[0]):
        positions = (labels[row, 1:] != -100).nonzero()[:, 0]
        expected.append(logp[row, positions, labels[row, 1:][positions]].mean())
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_score_batch_nll_is_the_gold_answers_negative_log_likelihood():
    """Two questions over the three rows of `_batch` (choices 0, 1 | 2); `nll` is minus the gold choice's score."""
    model = _model()
    module = CausalLMQA(model)
    input_ids, attention_mask, labels = _batch(model.config.vocab_size, seed=3)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "choice_owner": torch.tensor([0, 0, 1]), "gold": torch.tensor([1, 0]), "task_idx": torch.tensor([0, 0])}
    with torch.no_grad():
        scored = module.score_batch(batch)
        scores = choice_scores(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(scored["nll"], -scores[[1, 2]])
    assert scored["correct"].tolist() == [bool(scores[1] > scores[0]), True]
