from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jactus.data import VISION_DATASETS, VisionDataModule, get_vision_dataset
from jactus.data.vision import ImageBatchCollator


def test_builtin_datasets_are_registered():
    assert {"synthetic_vision", "fashion_mnist", "mnist5k"} <= set(VISION_DATASETS)


def test_synthetic_batches_splits_and_calibration_are_deterministic():
    def make():
        return VisionDataModule("synthetic_vision", num_classes=5, img_size=16, batch_size=8, train_size=40,
                                val_size=8, test_size=12, calib_num_samples=10, seed=3)

    dm, again = make(), make()
    dm.setup()
    assert dm.family == "vision" and dm.num_classes == 5
    assert dm.split_sizes() == {"train": 40, "val": 8, "calib": 10, "test": 12}
    images, labels, example_idx = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    # the indices name the training examples: the same image and label as the split's item at that position
    direct, _ = dm.collate([dm._split("train")[int(i)] for i in example_idx])
    torch.testing.assert_close(images, direct)
    assert labels.shape == (8,) and labels.dtype == torch.long and labels.max() < 5
    calib = torch.cat([x for x, _ in dm.calibration_dataloader()])
    torch.testing.assert_close(calib, torch.cat([x for x, _ in again.calibration_dataloader()]))
    assert set(dm._split("calib").indices) <= set(range(40))  # drawn from the training subset
    val, train = set(dm._split("val").indices), set(dm._split("train").indices)
    assert not val & train
    assert sum(len(y) for _, y in dm.test_dataloader()) == 12


def test_synthetic_task_is_learnable_by_a_linear_probe():
    dm = VisionDataModule("synthetic_vision", img_size=32, batch_size=256, train_size=512, test_size=256)
    x, y, _ = next(iter(dm.train_dataloader()))
    tx, ty = next(iter(dm.test_dataloader()))
    features, test_features = x.flatten(1), tx.flatten(1)
    centroids = torch.stack([features[y == c].mean(0) for c in range(5)])
    assert (torch.cdist(test_features, centroids).argmin(1) == ty).float().mean() > 0.9


def test_collator_makes_three_channels_from_grayscale_and_mixed_pil_sizes():
    collate = ImageBatchCollator(24, mean=(0.5,) * 3, std=(0.5,) * 3)
    gray = Image.fromarray(np.full((10, 12), 255, dtype=np.uint8))
    rgb = Image.fromarray(np.zeros((30, 20, 3), dtype=np.uint8))
    images, labels = collate([(gray, 1), (rgb, 2), (torch.zeros(1, 28, 28, dtype=torch.uint8), 0)])
    assert images.shape == (3, 3, 24, 24) and labels.tolist() == [1, 2, 0]
    torch.testing.assert_close(images[0], torch.ones(3, 24, 24))
    torch.testing.assert_close(images[1], -torch.ones(3, 24, 24))


def test_bad_names_sizes_and_paths_fail_with_the_bad_value(tmp_path):
    with pytest.raises(ValueError, match="unknown vision dataset 'fashion'.*fashion_mnist"):
        VisionDataModule("fashion")
    with pytest.raises(ValueError, match="train_size=0"):
        VisionDataModule("synthetic_vision", train_size=0)
    with pytest.raises(ValueError, match="batch_size=-2"):
        VisionDataModule("synthetic_vision", batch_size=-2)
    with pytest.raises(ValueError, match="num_classes=10 but dataset 'synthetic_vision' has 5"):
        VisionDataModule("synthetic_vision", num_classes=10)
    with pytest.raises(ValueError, match="exceed the 1024 training items"):
        VisionDataModule("synthetic_vision", train_size=1000, val_size=100).setup("fit")
    dm = VisionDataModule("fashion_mnist", root=str(tmp_path / "nowhere"), img_size=28)
    with pytest.raises(FileNotFoundError, match=r"nowhere/train-images-idx3-ubyte.gz.*apt-get install dataset-fashion"):
        dm.setup("fit")


@pytest.mark.assets
def test_fashion_mnist_has_60k_train_10k_test():
    info = get_vision_dataset("fashion_mnist")
    train, test = info.builder(None, "train"), info.builder(None, "test")
    assert (len(train), len(test), info.num_classes) == (60000, 10000, 10)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    dm = VisionDataModule("fashion_mnist", img_size=56, batch_size=16, test_size=64)
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (16, 3, 56, 56) and dm.split_sizes()["train"] == 60000


@pytest.mark.assets
def test_mnist5k_is_a_seeded_4000_1000_split_of_5000_digits():
    info = get_vision_dataset("mnist5k")
    train, test = info.builder(None, "train"), info.builder(None, "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert sorted(torch.cat([train.labels, test.labels]).unique().tolist()) == list(range(10))
    torch.testing.assert_close(info.builder(None, "test").images, test.images)
    assert not torch.equal(info.builder(None, "test", split_seed=1).labels, test.labels)
