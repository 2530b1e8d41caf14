"""The continuation texts the lm-eval tasks send: lm-eval encodes prompt + continuation whole and splits it after
the prompt, jactus encodes the prompt and each choice apart; the text must give jactus's tokens (tokenizers built
here, no items or lm-eval needed; tests/test_lm_eval_agreement.py compares the scores)."""

from __future__ import annotations

import logging

import pytest

import jactus.lm_eval_tasks as lm_eval_tasks
from jactus.data.qa import QAItem
from jactus.lm_eval_tasks import continuations, task_docs
from jactus.models.causal_lm import byte_level_tokenizer

PROMPT = "Q?\n"
CHOICES = ["yes", "no"]
BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


def _sentencepiece_tokenizer(legacy: bool):
    """Llama-2's tokenizer class over a handful of pieces: `▁yes` and `▁no` as whole words, `yes` and `no` inside
    one (after a newline, which is the byte token <0x0A>). `legacy` picks where the Metaspace marks a text's start
    (Llama-2 checkpoints' tokenizer_config sets it either way)."""
    from transformers import LlamaTokenizer

    pieces = ["<unk>", "<s>", "</s>", *BYTE_TOKENS, "▁", "Q", "?", "y", "e", "s", "n", "o", "ye", "yes", "no", "▁Q",
              "▁yes", "▁no"]
    merges = [("y", "e"), ("ye", "s"), ("n", "o"), ("▁", "Q"), ("▁", "yes"), ("▁", "no")]
    return LlamaTokenizer(vocab={piece: index for index, piece in enumerate(pieces)}, merges=merges,
                          add_bos_token=True, legacy=legacy)


def _merging_tokenizer():
    """Byte-level BPE with one merge across the prompt/choice boundary (newline + `y`): no text after the prompt
    tokenises as jactus tokenises `yes` alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate([*alphabet, "Ċy", "<s>", "</s>"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "y")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _tokens(tokenizer, text: str, special: bool = True) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=special)["input_ids"])


def test_byte_level_keeps_the_choices():
    assert continuations(byte_level_tokenizer(), PROMPT, CHOICES) == (CHOICES, [3, 2], [])


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_continuation_carries_the_word_marker(legacy):
    tokenizer = _sentencepiece_tokenizer(legacy)
    assert _tokens(tokenizer, "yes", special=False) == ["▁yes"]
    assert _tokens(tokenizer, PROMPT + "yes")[-2:] == ["<0x0A>", "yes"]  # the choice's own text: other tokens
    texts, counts, differences = continuations(tokenizer, PROMPT, CHOICES)
    assert texts == [" yes", " no"] and counts == [1, 1] and differences == []
    for text, choice in zip(texts, CHOICES, strict=True):
        assert _tokens(tokenizer, PROMPT + text) == _tokens(tokenizer, PROMPT) + _tokens(tokenizer, choice, False)


def test_no_matching_text_keeps_the_choice_and_warns(monkeypatch, caplog):
    tokenizer = _merging_tokenizer()
    texts, counts, differences = continuations(tokenizer, PROMPT, CHOICES)
    # `yes`: lm-eval scores [Ċy, e, s] less the newline [Ċ], two tokens more than the prompt; `no` matches
    assert texts == CHOICES and counts == [2, 2]
    assert differences == ["'yes': jactus scores ['Ċ', 'y', 'e', 's'], lm-eval ['Ċy', 'e', 's']"]

    monkeypatch.setattr(lm_eval_tasks, "task_items", lambda task, **options: [QAItem(task, PROMPT, CHOICES, 0)])
    with caplog.at_level(logging.WARNING, logger="jactus"):
        docs = task_docs("boolq", tokenizer=tokenizer)
    assert docs == [{"prompt": PROMPT, "choices": CHOICES, "gold": 0, "continuations": CHOICES,
                     "choice_tokens": [2, 2]}]
    assert "jactus_boolq: for 1 of 2 choices no continuation text" in caplog.text and differences[0] in caplog.text
