"""The vision LightningDataModule over the registered (plain) datasets of `jactus.data.vision`."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .indexed import Indexed, IndexedCollator, calibration_indices
from .registry import get_vision_dataset
from .vision import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBatchCollator,
    synthetic_vision,
)


class VisionDataModule(L.LightningDataModule):
    """Train/val/test/calibration loaders over a registered vision dataset.

    Splits (all deterministic given `seed`):
    - val and train come from the dataset's train split: after a seeded shuffle the first `val_size` items are the
      validation set and the next `train_size` (None: all remaining) the training set;
    - test is the dataset's test split, or the first `test_size` items of a seeded shuffle of it;
    - calibration is the first `calib_num_samples` items of a seeded shuffle of the training set (all of it if smaller).
    `dataset_kwargs` go to the dataset builder (e.g. `{"train_items": 256}` for synthetic_vision).
    """

    family = "vision"

    def __init__(
        self,
        dataset: str,
        root: str | None = None,
        num_classes: int | None = None,
        img_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_size: int | None = None,
        val_size: int = 0,
        test_size: int | None = None,
        calib_num_samples: int = 128,
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        dataset_kwargs: dict | None = None,
    ):
        super().__init__()
        self.info = get_vision_dataset(dataset)
        self.dataset_kwargs = dict(dataset_kwargs or {})
        expected_classes = self.dataset_kwargs.get("num_classes", self.info.num_classes)
        if num_classes is not None and num_classes != expected_classes:
            raise ValueError(f"num_classes={num_classes} but dataset {dataset!r} has {expected_classes} classes")
        for key, value, minimum in (("img_size", img_size, 1), ("batch_size", batch_size, 1),
                                    ("eval_batch_size", eval_batch_size, 1), ("train_size", train_size, 1),
                                    ("val_size", val_size, 0), ("test_size", test_size, 1),
                                    ("calib_num_samples", calib_num_samples, 1), ("num_workers", num_workers, 0)):
            if value is not None and (not isinstance(value, int) or value < minimum):
                raise ValueError(f"{key}={value!r}: expected an integer >= {minimum}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={list(mean)}, std={list(std)}: expected 3 values each, std positive")
        self.dataset_name, self.root = dataset, root
        self.num_classes = expected_classes
        self.img_size, self.batch_size = img_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.train_size, self.val_size, self.test_size, self.calib_num_samples = train_size, val_size, test_size, calib_num_samples
        self.collate = ImageBatchCollator(img_size, mean, std)
        self._splits: dict[str, Dataset] = {}

    # ---- splits --------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self._split("train")
        if stage in (None, "test", "predict"):
            self._split("test")

    def _build(self, split: str) -> Dataset:
        return self.info.builder(self.root, split, **self.dataset_kwargs)

    def _permutation(self, n: int, salt: int) -> list[int]:
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + salt)).tolist()

    def _split(self, name: str) -> Dataset:
        """"train", "val" and "calib" are built together from the train split; "test" from the test split."""
        if name in self._splits:
            return self._splits[name]
        if name == "test":
            source = self._build("test")
            if self.test_size is not None:
                if self.test_size > len(source):
                    raise ValueError(f"test_size={self.test_size} but {self.dataset_name} test has {len(source)}")
                source = Subset(source, self._permutation(len(source), 1)[: self.test_size])
            self._splits["test"] = source
        else:
            source = self._build("train")
            wanted = self.val_size + (self.train_size or 0)
            if wanted > len(source) or (self.train_size is None and self.val_size >= len(source)):
                raise ValueError(f"val_size={self.val_size} + train_size={self.train_size} exceed the "
                                 f"{len(source)} training items of {self.dataset_name}")
            order = self._permutation(len(source), 0)
            end = None if self.train_size is None else self.val_size + self.train_size
            self._splits["val"] = Subset(source, order[: self.val_size])
            self._splits["train"] = Subset(source, order[self.val_size:end])
            train = self._splits["train"]
            calib = calibration_indices(self._permutation(len(train), 2), self.calib_num_samples, self.dataset_name)
            self._splits["calib"] = Subset(train, calib)
        return self._splits[name]

    def split_sizes(self) -> dict[str, int]:
        return {name: len(self._split(name)) for name in ("train", "val", "calib", "test")}

    # ---- loaders -------------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, indexed: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(Indexed(dataset) if indexed else dataset, batch_size=batch_size, shuffle=shuffle,
                          generator=generator, num_workers=self.num_workers,
                          collate_fn=IndexedCollator(self.collate) if indexed else self.collate,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Batches `(images, labels, example_idx)`: the indices key the distillation targets."""
        return self._loader(self._split("train"), self.batch_size, shuffle=True, indexed=True)

    def distillation_dataloader(self) -> DataLoader:
        """The training set once, in order, batched as `train_dataloader` batches it (the teacher cache's pass)."""
        return self._loader(self._split("train"), self.eval_batch_size, shuffle=False, indexed=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), self.eval_batch_size, shuffle=False)

    def calibration_dataloader(self) -> DataLoader:
        return self._loader(self._split("calib"), self.batch_size, shuffle=False)
