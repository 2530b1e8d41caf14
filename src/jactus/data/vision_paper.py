"""The paper's eight vision sets, read from their standard on-disk layouts (never downloaded).

Each set is found under `root` (default `$JACTUS_DATA/<name>`, `$JACTUS_DATA` defaulting to `~/data`) in the first
of these layouts that is present:

1. its native layout: the folder torchvision's class reads (CIFAR pickles, `oxford-iiit-pet/`, `dtd/dtd/`,
   `fgvc-aircraft-2013b/`, `stanford_cars/`, `eurosat/2750/`) or, for RESISC45, `NWPU-RESISC45/<class>/`;
2. an HF `datasets.save_to_disk` folder per split: `root/train`, `root/test` with an image and a label column;
3. an ImageFolder tree per split: `root/train/<class>/*.jpg`, `root/test/<class>/*.jpg`.

Every builder returns a Dataset of `(PIL RGB image, int label)`. Sets that ship without a train/test split
(EuroSAT, RESISC45) are split per class with a seeded shuffle (`test_fraction`, `split_seed`), the same on every
machine. Where torchvision has a separate validation split it joins the training split (Pets "trainval",
DTD train+val, FGVC-Aircraft "trainval"), as is usual for these benchmarks.
"""

from __future__ import annotations

import os
import pickle
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from .registry import register_vision_dataset

SPLITS = ("train", "test")


def data_home() -> Path:
    """`$JACTUS_DATA`, or `~/data` when unset."""
    return Path(os.environ.get("JACTUS_DATA", "~/data")).expanduser()


def default_root(name: str) -> Path:
    return data_home() / name


# --------------------------------------------------------------------------------------------------------------
# Generic layouts shared by every set


class ImageLabelDataset(Dataset):
    """Wraps any `(image, label)` source so items are always `(PIL RGB image, int label)`."""

    def __init__(self, source, classes: list[str] | None = None):
        self.source = source
        self.classes = classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return image.convert("RGB"), int(label)


class HFImageDataset(Dataset):
    """A split saved with `datasets.Dataset.save_to_disk`: rows with an image column and an integer label column."""

    IMAGE_COLUMNS = ("image", "img")
    LABEL_COLUMNS = ("label", "labels", "fine_label")

    def __init__(self, path: Path):
        from datasets import load_from_disk

        self.table = load_from_disk(str(path))
        columns = self.table.column_names
        self.image_column = _first_present(self.IMAGE_COLUMNS, columns, "image", path)
        self.label_column = _first_present(self.LABEL_COLUMNS, columns, "label", path)
        feature = self.table.features[self.label_column]
        self.classes = list(feature.names) if hasattr(feature, "names") else None

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        row = self.table[int(index)]
        image = row[self.image_column]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return image.convert("RGB"), int(row[self.label_column])


def _first_present(candidates, columns, what: str, path: Path) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"HF dataset at {path} has no {what} column: expected one of {list(candidates)}, has {columns}")


def _is_hf_split(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _class_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_folder(path: Path, classes: list[str]) -> Dataset:
    """torchvision ImageFolder with a fixed class list, so train and test agree on the label of every class."""
    from torchvision.datasets import ImageFolder

    class FixedClasses(ImageFolder):
        def find_classes(self, directory):
            return classes, {name: index for index, name in enumerate(classes)}

    # allow_empty: a class may have no image in one split (its label index still comes from `classes`)
    return ImageLabelDataset(FixedClasses(str(path), allow_empty=True), classes)


def _split_folders(root: Path, split: str, num_classes: int, name: str) -> Dataset | None:
    """The HF `save_to_disk` or ImageFolder tree at `root/<split>`, or None when there is neither."""
    split_dir = root / split
    if not split_dir.is_dir():
        return None
    if _is_hf_split(split_dir):
        return HFImageDataset(split_dir)
    classes = sorted(set().union(*(_class_dirs(root / s) for s in SPLITS if (root / s).is_dir())))
    if not classes:
        return None
    _check_class_count(classes, num_classes, name, root)
    return _image_folder(split_dir, classes)


def _check_class_count(classes: list[str], num_classes: int, name: str, where: Path) -> None:
    if len(classes) > num_classes:
        raise ValueError(f"{name}: {where} has {len(classes)} class folders but {name} has {num_classes} classes")


def seeded_split(labels: list[int], split: str, test_fraction: float, split_seed: int) -> list[int]:
    """Indices of `split` from a per-class seeded shuffle: the first `test_fraction` of each class is the test set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    chosen: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        random.Random(f"{split_seed}-{label}").shuffle(indices)
        n_test = max(1, round(test_fraction * len(indices))) if len(indices) > 1 else 0
        chosen += indices[:n_test] if split == "test" else indices[n_test:]
    return sorted(chosen)


def _seeded_folder_split(folder: Path, split: str, num_classes: int, name: str, test_fraction: float,
                         split_seed: int) -> Dataset:
    classes = _class_dirs(folder)
    _check_class_count(classes, num_classes, name, folder)
    full = _image_folder(folder, classes)
    labels = [label for _, label in full.source.samples]
    return ImageLabelDataset(Subset(full, seeded_split(labels, split, test_fraction, split_seed)), classes)


# --------------------------------------------------------------------------------------------------------------
# Native layouts


def _cifar(batches_dir: Path, files: list[str], label_key: str, meta_file: str, names_key: str) -> Dataset:
    """The CIFAR python pickles (the files torchvision's CIFAR10/100 read; md5 is not checked)."""
    images, labels = [], []
    for file in files:
        with open(batches_dir / file, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch[label_key])
    with open(batches_dir / meta_file, "rb") as handle:
        classes = list(pickle.load(handle, encoding="latin1")[names_key])
    return ImageLabelDataset(list(zip(np.concatenate(images), labels, strict=True)), classes)


def _torchvision(cls_name: str, root: Path, **kwargs) -> Dataset:
    import torchvision.datasets as tvd

    try:
        dataset = getattr(tvd, cls_name)(str(root), download=False, **kwargs)
    except (RuntimeError, OSError) as err:  # torchvision says "Dataset not found", or a listed file is missing
        raise FileNotFoundError(f"torchvision {cls_name} could not read {root} ({err}); torchvision download "
                                f"is disabled here, so the files must be complete on disk") from err
    return ImageLabelDataset(dataset, getattr(dataset, "classes", None))


def _missing(name: str, root: Path, layout: str, source: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} not found under {root}.\nExpected layout: {layout}.\n"
        f"torchvision download is disabled (download=False; no dataset is fetched over the network). "
        f"To obtain it: {source}, then place it under {root} (or pass data.module.root=..., or set JACTUS_DATA)."
    )


_FOLDER_LAYOUTS = ("or an HF save_to_disk dataset at root/train and root/test (image + label columns), "
                   "or ImageFolder trees root/train/<class>/*.jpg and root/test/<class>/*.jpg")


def _paper_dataset(name: str, num_classes: int, native: str, source: str):
    """Register `name`: native layout first, then HF save_to_disk / ImageFolder split folders."""
    layout = f"{native}, {_FOLDER_LAYOUTS}"

    def decorate(read_native):
        @register_vision_dataset(name, num_classes, default_root=str(default_root(name)), layout=layout)
        def builder(root=None, split: str = "train", **kwargs) -> Dataset:
            if split not in SPLITS:
                raise ValueError(f"{name}: split={split!r}, expected one of {SPLITS}")
            root = Path(root).expanduser() if root is not None else default_root(name)
            dataset = read_native(root, split, **kwargs)
            if dataset is None:
                dataset = _split_folders(root, split, num_classes, name)
            if dataset is None:
                raise _missing(name, root, layout, source)
            return dataset

        builder.__name__ = builder.__qualname__ = f"build_{name}"
        builder.__doc__ = f"{name} ({num_classes} classes) from `root` (default $JACTUS_DATA/{name}): {layout}."
        return builder

    return decorate


@_paper_dataset("cifar10", 10, "root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (torchvision CIFAR10)",
                "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it")
def build_cifar10(root: Path, split: str) -> Dataset | None:
    batches = root / "cifar-10-batches-py"
    if not batches.is_dir():
        return None
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _cifar(batches, files, "labels", "batches.meta", "label_names")


@_paper_dataset("cifar100", 100, "root/cifar-100-python/{train,test,meta} (torchvision CIFAR100)",
                "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it")
def build_cifar100(root: Path, split: str) -> Dataset | None:
    batches = root / "cifar-100-python"
    if not batches.is_dir():
        return None
    return _cifar(batches, [split], "fine_labels", "meta", "fine_label_names")


@_paper_dataset("oxford_pets", 37, "root/oxford-iiit-pet/{images,annotations} (torchvision OxfordIIITPet; "
                "train = trainval)", "get images.tar.gz and annotations.tar.gz from "
                "https://www.robots.ox.ac.uk/~vgg/data/pets/ and extract both into root/oxford-iiit-pet")
def build_oxford_pets(root: Path, split: str) -> Dataset | None:
    if not (root / "oxford-iiit-pet").is_dir():
        return None
    return _torchvision("OxfordIIITPet", root, split="trainval" if split == "train" else "test")


@_paper_dataset("stanford_cars", 196, "root/stanford_cars/{devkit/cars_meta.mat,devkit/cars_train_annos.mat,"
                "cars_train/,cars_test/,cars_test_annos_withlabels.mat} (torchvision StanfordCars)",
                "the original URL is gone (torchvision cannot download it either); get the archive from a mirror "
                "(e.g. Kaggle 'stanford-cars-dataset') and arrange it as above")
def build_stanford_cars(root: Path, split: str) -> Dataset | None:
    if not (root / "stanford_cars").is_dir():
        return None
    return _torchvision("StanfordCars", root, split=split)


@_paper_dataset("dtd", 47, "root/dtd/dtd/{images/<class>/,labels/{train,val,test}<partition>.txt} "
                "(torchvision DTD; train = train+val)",
                "get dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and extract it into root/dtd")
def build_dtd(root: Path, split: str, partition: int = 1) -> Dataset | None:
    if not (root / "dtd" / "dtd").is_dir():
        return None
    if split == "test":
        return _torchvision("DTD", root, split="test", partition=partition)
    parts = [_torchvision("DTD", root, split=s, partition=partition) for s in ("train", "val")]
    return ImageLabelDataset(ConcatDataset(parts), parts[0].classes)


@_paper_dataset("fgvc_aircraft", 100, "root/fgvc-aircraft-2013b/data/{images/,images_variant_trainval.txt,"
                "images_variant_test.txt,variants.txt} (torchvision FGVCAircraft, variant level; train = trainval)",
                "get fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and "
                "extract it into root")
def build_fgvc_aircraft(root: Path, split: str) -> Dataset | None:
    if not (root / "fgvc-aircraft-2013b").is_dir():
        return None
    return _torchvision("FGVCAircraft", root, split="trainval" if split == "train" else "test",
                        annotation_level="variant")


@_paper_dataset("eurosat", 10, "root/eurosat/2750/<class>/*.jpg (torchvision EuroSAT RGB; seeded per-class split)",
                "get EuroSAT.zip (RGB) from https://github.com/phelber/EuroSAT and extract it into root/eurosat")
def build_eurosat(root: Path, split: str, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset | None:
    folder = root / "eurosat" / "2750"
    if not folder.is_dir():
        return None
    return _seeded_folder_split(folder, split, 10, "eurosat", test_fraction, split_seed)


@_paper_dataset("resisc45", 45, "root/NWPU-RESISC45/<class>/*.jpg (seeded per-class split)",
                "get NWPU-RESISC45.rar (Cheng et al. 2017; e.g. via the TensorFlow Datasets 'resisc45' page) "
                "and extract it into root")
def build_resisc45(root: Path, split: str, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset | None:
    folder = root / "NWPU-RESISC45"
    if not folder.is_dir():
        return None
    return _seeded_folder_split(folder, split, 45, "resisc45", test_fraction, split_seed)
