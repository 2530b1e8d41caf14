"""The paper's vision sets on tiny fixtures written in their real on-disk layouts."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from jactus.data import vision_paper
from jactus.data.registry import get_vision_dataset

PAPER_SETS = {"oxford_pets": 37, "stanford_cars": 196, "cifar10": 10, "dtd": 47, "eurosat": 10,
              "fgvc_aircraft": 100, "resisc45": 45, "cifar100": 100}


def _png(path, value: int, size: int = 8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def _labels(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def test_all_eight_are_registered():
    for name, num_classes in PAPER_SETS.items():
        info = get_vision_dataset(name)
        assert info.num_classes == num_classes
        assert info.default_root.endswith(name) and "ImageFolder" in info.layout


def test_cifar10_pickles(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    for i in range(1, 6):  # 2 images per training batch, labels i-1 and i
        _dump(batches / f"data_batch_{i}", {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                                            "labels": [i - 1, i]})
    test_data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _dump(batches / "test_batch", {"data": test_data, "labels": [9, 0, 1]})
    _dump(batches / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})

    train = get_vision_dataset("cifar10").builder(tmp_path, "train")
    test = get_vision_dataset("cifar10").builder(tmp_path, "test")
    assert len(train) == 10 and len(test) == 3
    assert _labels(train) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5] and _labels(test) == [9, 0, 1]
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and isinstance(label, int)
    # torchvision's CIFAR layout: 3072 bytes = R plane, G plane, B plane of a 32x32 image
    assert np.array_equal(np.asarray(image), test_data[0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert train.classes[3] == "class3"


def test_cifar100_pickles(tmp_path):
    batches = tmp_path / "cifar-100-python"
    for split, labels in (("train", [5, 99]), ("test", [42])):
        _dump(batches / split, {"data": np.zeros((len(labels), 3072), np.uint8), "fine_labels": labels,
                                "coarse_labels": [0] * len(labels)})
    _dump(batches / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    builder = get_vision_dataset("cifar100").builder
    assert _labels(builder(tmp_path, "train")) == [5, 99]
    assert _labels(builder(tmp_path, "test")) == [42]


@pytest.mark.parametrize("name", sorted(PAPER_SETS))
def test_image_folder_route(tmp_path, name):
    # the test split lacks class "b": labels must still follow the union of class folders
    for cls, value in (("a", 10), ("b", 20), ("c", 30)):
        _png(tmp_path / "train" / cls / "0.png", value)
        _png(tmp_path / "train" / cls / "1.jpg", value)
    _png(tmp_path / "test" / "c" / "0.png", 30)
    _png(tmp_path / "test" / "a" / "0.png", 10)
    builder = get_vision_dataset(name).builder
    train, test = builder(tmp_path, "train"), builder(tmp_path, "test")
    assert _labels(train) == [0, 0, 1, 1, 2, 2]
    assert _labels(test) == [0, 2]
    image, _ = test[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.getpixel((0, 0)) == (30, 30, 30)


def test_hf_save_to_disk_route(tmp_path):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["x", "y", "z"])})
    for split, labels in (("train", [0, 2, 1, 2]), ("test", [1])):
        images = [Image.fromarray(np.full((6, 6), 50 * lab, np.uint8), mode="L") for lab in labels]
        Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(tmp_path / split))
    builder = get_vision_dataset("dtd").builder
    train = builder(tmp_path, "train")
    assert len(train) == 4 and _labels(train) == [0, 2, 1, 2] and train.classes == ["x", "y", "z"]
    image, label = builder(tmp_path, "test")[0]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (50, 50, 50) and label == 1


@pytest.mark.parametrize("name,folder", [("eurosat", "eurosat/2750"), ("resisc45", "NWPU-RESISC45")])
def test_seeded_split_of_single_folder_sets(tmp_path, name, folder):
    for c, cls in enumerate(("AnnualCrop", "Forest")):
        for i in range(5):
            _png(tmp_path / folder / cls / f"{cls}_{i}.jpg", 10 * c + i)
    builder = get_vision_dataset(name).builder
    train, test = builder(tmp_path, "train"), builder(tmp_path, "test")
    assert len(train) == 8 and len(test) == 2  # 20% of each class
    assert sorted(_labels(test)) == [0, 1] and sorted(_labels(train)) == [0] * 4 + [1] * 4
    pixels = lambda ds: {ds[i][0].getpixel((0, 0)) for i in range(len(ds))}  # noqa: E731
    assert not pixels(train) & pixels(test)
    assert pixels(builder(tmp_path, "test")) == pixels(test)  # deterministic
    assert len(builder(tmp_path, "test", test_fraction=0.4)) == 4


def test_oxford_pets_torchvision_layout(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    for image_id, value in (("Abyssinian_1", 1), ("Abyssinian_2", 2), ("beagle_1", 3), ("beagle_2", 4)):
        _png(base / "images" / f"{image_id}.jpg", value)
    (base / "annotations").mkdir()
    (base / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nbeagle_1 2 2 1\nbeagle_2 2 2 1\n")
    (base / "annotations" / "test.txt").write_text("Abyssinian_2 1 1 1\n")
    builder = get_vision_dataset("oxford_pets").builder
    assert _labels(builder(tmp_path, "train")) == [0, 1, 1]
    image, label = builder(tmp_path, "test")[0]
    assert label == 0 and image.getpixel((0, 0)) == (2, 2, 2)


def test_dtd_torchvision_layout_train_is_train_plus_val(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    for cls in ("banded", "zigzagged"):
        for i in range(3):
            _png(data / "images" / cls / f"{cls}_{i}.jpg", i)
    (data / "labels").mkdir()
    (data / "labels" / "train1.txt").write_text("banded/banded_0.jpg\nzigzagged/zigzagged_0.jpg\n")
    (data / "labels" / "val1.txt").write_text("banded/banded_1.jpg\nzigzagged/zigzagged_1.jpg\n")
    (data / "labels" / "test1.txt").write_text("banded/banded_2.jpg\nzigzagged/zigzagged_2.jpg\n")
    builder = get_vision_dataset("dtd").builder
    assert _labels(builder(tmp_path, "train")) == [0, 1, 0, 1]
    assert _labels(builder(tmp_path, "test")) == [0, 1]


@pytest.mark.parametrize("name", sorted(PAPER_SETS))
def test_missing_dataset_says_where_and_how(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        get_vision_dataset(name).builder(root, "train")
    message = str(err.value)
    assert str(root) in message and "download is disabled" in message and "To obtain it" in message
    assert get_vision_dataset(name).layout in message


def test_default_root_follows_jactus_data(tmp_path, monkeypatch):
    monkeypatch.setenv("JACTUS_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cifar10")):
        get_vision_dataset("cifar10").builder(None, "train")


@pytest.mark.parametrize("name,folder", [("stanford_cars", "stanford_cars"), ("fgvc_aircraft", "fgvc-aircraft-2013b")])
def test_incomplete_torchvision_layout_is_a_clear_error(tmp_path, name, folder):
    (tmp_path / folder).mkdir()
    with pytest.raises(FileNotFoundError, match="torchvision download is disabled"):
        get_vision_dataset(name).builder(tmp_path, "train")


def test_bad_split_and_too_many_classes(tmp_path):
    with pytest.raises(ValueError, match="split='val'"):
        get_vision_dataset("cifar10").builder(tmp_path, "val")
    for i in range(11):
        (tmp_path / "train" / f"class{i}").mkdir(parents=True)
    with pytest.raises(ValueError, match="11 class folders"):
        vision_paper.build_eurosat(tmp_path, "train")
