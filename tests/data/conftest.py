"""Data fixtures: an offline tokenizer and tiny files in the LLM-Adapters layout."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def byte_tokenizer():
    from jactus.models import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _row(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


@pytest.fixture
def llm_adapters_dir(tmp_path):
    """`dataset/{boolq,piqa}/test.json` and `commonsense_170k.json`, exactly as LLM-Adapters ships them."""
    root = tmp_path / "dataset"
    boolq = [_row(f"Please answer the following question with true or false, question: is {i} even?\n\n"
                  f"Answer format: true/false", "true" if i % 2 == 0 else "false") for i in range(6)]
    piqa = [_row(f"Please choose the correct solution to the question: how to open jar {i}\n\n"
                 f"Solution1: twist the lid\n\nSolution2: eat the lid\n\nAnswer format: solution1/solution2",
                 "solution1") for i in range(5)]
    for folder, rows in (("boolq", boolq), ("piqa", piqa)):
        (root / folder).mkdir(parents=True)
        (root / folder / "test.json").write_text(json.dumps(rows, indent=2))
    train = boolq[:3] + piqa[:3] + [{"instruction": "Say hi", "input": "to Bob", "output": "hi Bob", "answer": ""}]
    (tmp_path / "commonsense_170k.json").write_text(json.dumps(train))
    return root, tmp_path / "commonsense_170k.json"
