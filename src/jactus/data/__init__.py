"""Datasets (plain PyTorch, registered by name) and, apart, the LightningDataModules for vision and QA.

The plain modules (`vision`, `vision_paper`, `qa`, `registry`) import no Lightning; `VisionDataModule` and
`QADataModule` (`vision_datamodule`, `qa_datamodule`) load Lightning when first asked for.
"""

from . import registry, vision, vision_paper  # noqa: F401  (importing registers the datasets)
from .qa import COMMONSENSE_TASKS, SYNTHETIC_TASKS, TASK_SIZES, QAItem
from .registry import VISION_DATASETS, get_vision_dataset, register_vision_dataset
from .vision import TensorImages

_DATAMODULES = {"QADataModule": "qa_datamodule", "VisionDataModule": "vision_datamodule"}


def __getattr__(name: str):
    if name in _DATAMODULES:
        import importlib

        return getattr(importlib.import_module(f".{_DATAMODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["COMMONSENSE_TASKS", "QADataModule", "QAItem", "SYNTHETIC_TASKS", "TASK_SIZES", "TensorImages",
           "VISION_DATASETS", "VisionDataModule", "get_vision_dataset", "register_vision_dataset"]
