"""Training batches that carry their examples' dataset indices (what a per-example teacher cache is keyed by).

`Indexed(dataset)` yields `(index, item)`; `IndexedCollator(collate)` collates the items as before and adds the
indices: as `batch["example_idx"]` for a dict batch (QA), as a third element for a tuple batch (vision
`(images, labels, example_idx)`). Task code reads `batch[0], batch[1]` / named keys, so the extra entry is inert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.data import Dataset


class Indexed(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class IndexedCollator:
    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, pairs):
        index = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        batch = self.collate([item for _, item in pairs])
        if isinstance(batch, dict):
            return {**batch, "example_idx": index}
        if isinstance(batch, (tuple, list)):
            return (*batch, index)
        raise TypeError(f"cannot add example indices to a batch of type {type(batch).__name__}")


def calibration_indices(order: list[int], requested: int, what: str) -> list[int]:
    """The first `requested` of a shuffled `order` of training items; says so when the split has fewer (the
    calibration then takes every training item, not the number asked for)."""
    if requested > len(order):
        logging.getLogger("jactus").warning(
            "calib.num_samples=%d, but the training split of %s has %d items: calibrating on all %d of them",
            requested, what, len(order), len(order))
    return list(order[:requested])
