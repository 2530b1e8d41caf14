"""The QA loss and choice scores run the LM head on the labelled positions only; they must equal the full path."""

from __future__ import annotations

import pytest
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


# ---- shared-prefix scoring: the prompt runs once, the choices continue from its cache ----------------------------


def _questions(vocab: int, seed: int = 4) -> list:
    """Questions with 1-4 choices of different lengths (1 to 9 tokens); prompts of 8 to 45 tokens that start with
    the same 5 (a prompt template)."""
    from jactus.data.qa import EncodedQA

    generator = torch.Generator().manual_seed(seed)

    def tokens(count):
        return torch.randint(3, vocab, (count,), generator=generator).tolist()

    template = tokens(5)
    shapes = [(12, [1, 3]), (40, [5, 2, 9, 1]), (3, [4]), (25, [2, 2, 7]), (18, [9, 1])]
    return [EncodedQA(template + tokens(prompt), [tokens(n) for n in choices], gold=0, task_idx=0)
            for prompt, choices in shapes]


@pytest.mark.parametrize("max_length", [64, 20, 8])  # 20 and 8 cut long prompts from the left, per choice
def test_shared_prefix_scores_equal_the_full_path(max_length):
    from jactus.data.qa import EvalCollator

    model = _model()
    batch = EvalCollator(pad_id=0, eos_id=1, max_length=max_length)(_questions(model.config.vocab_size))
    with torch.no_grad():
        full = choice_scores(model, batch["input_ids"], batch["attention_mask"], batch["labels"], scoring="full")
        shared = choice_scores(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               scoring="shared_prefix")
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    module = CausalLMQA(model)
    assert module.scoring == "shared_prefix"
    with torch.no_grad():
        fast, reference = module.score_batch(batch), CausalLMQA(model, scoring="full").score_batch(batch)
    torch.testing.assert_close(fast["nll"], reference["nll"], rtol=0, atol=1e-5)
    assert torch.equal(fast["correct"], reference["correct"]) and torch.equal(fast["item_idx"], batch["item_idx"])


def test_shared_prefix_runs_each_prompt_once(monkeypatch):
    """Three passes per batch: the template all prompts start with, the rest of each distinct prompt, then every
    choice row (not one row per choice with its whole prompt)."""
    from jactus.data.qa import EvalCollator

    model = _model()
    questions = _questions(model.config.vocab_size)
    batch = EvalCollator(pad_id=0, eos_id=1, max_length=64)(questions)
    shapes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    with torch.no_grad():
        choice_scores(model, batch["input_ids"], batch["attention_mask"], batch["labels"], scoring="shared_prefix")
    rows = sum(len(q.choice_ids) for q in questions)
    assert shapes == [(1, 5), (len(questions), 40), (rows, 9)]


def test_shared_prefix_falls_back_without_a_cache(caplog):
    """A model whose forward takes no cache, or a batch not laid out as prompt + answer, takes the full path."""
    from jactus.lit import qa

    model = _model()
    input_ids, attention_mask, labels = _batch(model.config.vocab_size, seed=5)
    labels[0, 2] = input_ids[0, 2]  # a labelled token inside the prompt: not one answer block

    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    qa._WARNED.clear()
    with torch.no_grad(), caplog.at_level("WARNING", logger="jactus"):
        full = choice_scores(model, input_ids, attention_mask, labels)
        torch.testing.assert_close(choice_scores(model, input_ids, attention_mask, labels, "shared_prefix"), full)
        torch.testing.assert_close(choice_scores(NoCache(model), input_ids, attention_mask, labels, "shared_prefix"),
                                   full)
    assert "not right-padded prompt + labelled answer rows" in caplog.text
    assert "NoCache.forward takes no cache or past_key_values, position_ids, use_cache" in caplog.text
    with pytest.raises(ValueError, match="scoring='fast'"):
        CausalLMQA(model, scoring="fast")


@pytest.mark.slow
def test_shared_prefix_scores_equal_the_full_path_on_smollm2(smollm2):
    """The real model and tokenizer on a handful of commonsense questions, one with a prompt longer than max_length."""
    from jactus.data.qa import EvalCollator, QAItem, encode_items

    items = [QAItem("piqa", "### Instruction:\nHow do I open a jar?\n\n### Response:\n",
                    ["Twist the lid.", "Eat the jar whole, glass and all."], 0),
             QAItem("hellaswag", "A man is sitting on a roof. He", ["starts pulling up roofing.", "is ducking.",
                                                                      "holds a ball.", "sings."], 0),
             QAItem("boolq", "Is the sky blue? " * 40, ["yes", "no"], 0)]
    encoded = encode_items(items, smollm2.tokenizer, ["piqa", "hellaswag", "boolq"])
    batch = EvalCollator(smollm2.tokenizer.pad_token_id, smollm2.tokenizer.eos_token_id, 64)(encoded)
    model = smollm2.model.eval()
    with torch.no_grad():
        full = choice_scores(model, batch["input_ids"], batch["attention_mask"], batch["labels"], scoring="full")
        shared = choice_scores(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               scoring="shared_prefix")
    # the same sums of fp32 log-probabilities in another order: equal to float rounding, which grows with the score
    # (|score| ~ 15 here: 1e-5 apart seen where earlier tests left another intra-op thread count); a wrong token
    # moves a score by far more
    torch.testing.assert_close(shared, full, rtol=2e-6, atol=1e-5)


def test_evaluate_keeps_per_item_results_with_stable_ids():
    """encode_items numbers each task's items; evaluate keeps one record per question; their means are the metrics."""
    from jactus.data.qa import EvalCollator, QAItem, encode_items

    loaded = create_causal_lm(config=TINY_LLAMA)
    tasks = ["piqa", "boolq"]
    items = [QAItem(task, f"question {n} of {task}?", ["yes", "no", "maybe"][: 2 + n % 2], n % 2)
             for task in tasks for n in range(3)]
    encoded = encode_items(items, loaded.tokenizer, tasks)
    assert [(item.task_idx, item.item_idx) for item in encoded] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    collate = EvalCollator(loaded.tokenizer.pad_token_id, loaded.tokenizer.eos_token_id, 32)
    module = CausalLMQA(loaded.model.eval(), task_names=tasks)
    metrics = module.evaluate([collate(encoded[:4]), collate(encoded[4:])], progress=False)
    records = module.item_records("test")
    assert [(r["split"], r["task"], r["index"]) for r in records] == [("test", t, n) for t in tasks for n in range(3)]
    for task in tasks:
        mine = [r for r in records if r["task"] == task]
        assert metrics[f"test/acc_{task}"] == pytest.approx(100 * sum(r["correct"] for r in mine) / 3)
        assert metrics[f"test/nll_{task}"] == pytest.approx(sum(r["nll"] for r in mine) / 3, rel=1e-6)


def test_sequence_calibration_loss_is_the_summed_lm_loss_over_every_real_token():
    from jactus.core.calibration import default_loss_normalizer
    from jactus.core.stats_cache import _qualname

    model = _model()
    input_ids, attention_mask, labels = _batch(model.config.vocab_size, seed=2)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    task, sequence = CausalLMQA(model), CausalLMQA(model, calib_loss="sequence")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    real = attention_mask[:, 1:].bool()
    summed = F.cross_entropy(logits[real], input_ids[:, 1:][real], reduction="sum")
    # calibrate multiplies by the answer-token count: the statistics are those of the summed loss on every token
    scaled = sequence.calibration_loss(model, batch) * default_loss_normalizer(batch)
    torch.testing.assert_close(scaled, summed, rtol=1e-5, atol=1e-4)
    assert real.sum() > (labels[:, 1:] != -100).sum()  # more gradient rows than the answers give
    torch.testing.assert_close(task.calibration_loss(model, batch), task.loss_and_logits(model, batch)[0])
    # the statistics cache tells the two losses apart
    assert _qualname(task.calibration_loss) != _qualname(sequence.calibration_loss)
    with pytest.raises(ValueError, match=r"calib.loss='prompt': expected one of \['task', 'sequence'\]"):
        CausalLMQA(model, calib_loss="prompt")
