"""Datasets (plain, registered by name) and the LightningDataModules for vision and QA."""

from . import registry, vision, vision_paper  # noqa: F401  (importing registers the datasets)
from .registry import VISION_DATASETS, get_vision_dataset, register_vision_dataset
from .vision import TensorImages, VisionDataModule

__all__ = ["VISION_DATASETS", "TensorImages", "VisionDataModule", "get_vision_dataset", "register_vision_dataset"]
