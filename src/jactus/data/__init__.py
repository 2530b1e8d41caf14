"""Datasets (plain, registered by name) and the LightningDataModules for vision and QA."""

from . import registry, vision, vision_paper  # noqa: F401  (importing registers the datasets)
from .qa import COMMONSENSE_TASKS, SYNTHETIC_TASKS, TASK_SIZES, QADataModule, QAItem
from .registry import VISION_DATASETS, get_vision_dataset, register_vision_dataset
from .vision import TensorImages, VisionDataModule

__all__ = ["COMMONSENSE_TASKS", "QADataModule", "QAItem", "SYNTHETIC_TASKS", "TASK_SIZES", "TensorImages",
           "VISION_DATASETS", "VisionDataModule", "get_vision_dataset", "register_vision_dataset"]
