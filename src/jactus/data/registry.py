"""Name -> dataset builder registries. Plain Python: datasets register themselves on import."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass(frozen=True)
class VisionDatasetInfo:
    """A vision dataset the `data=` configs can name.

    `builder(root, split, **kwargs)` returns a torch Dataset of `(image, label)` where `image` is a PIL image or a
    uint8/float tensor `[C, H, W]`; `split` is "train" or "test". `root=None` means the dataset's default location.
    """

    name: str
    num_classes: int
    builder: Callable[..., Dataset]
    default_root: str | None = None
    layout: str = ""  # the expected on-disk layout, quoted in "missing dataset" errors


VISION_DATASETS: dict[str, VisionDatasetInfo] = {}


def register_vision_dataset(name: str, num_classes: int, default_root: str | None = None, layout: str = ""):
    """Decorator: `@register_vision_dataset("cifar10", 10, layout="...")` over `builder(root, split, **kw)`."""

    def wrap(builder: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in VISION_DATASETS:
            raise ValueError(f"vision dataset {name!r} is registered twice")
        VISION_DATASETS[name] = VisionDatasetInfo(name, num_classes, builder, default_root, layout)
        return builder

    return wrap


def get_vision_dataset(name: str) -> VisionDatasetInfo:
    if name not in VISION_DATASETS:
        raise ValueError(f"unknown vision dataset {name!r}; valid: {sorted(VISION_DATASETS)}")
    return VISION_DATASETS[name]
