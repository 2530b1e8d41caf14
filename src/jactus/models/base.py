"""What every backbone builder returns, and where converted weights are cached."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn


@dataclass
class LoadedModel:
    """A backbone and what the rest of jactus needs to know about it.

    `head_names` are the task-head submodules that stay trainable whatever a method freezes
    (["head"] for a timm classifier with a new head, [] for a causal LM).
    """

    model: nn.Module
    tokenizer: object | None
    family: str  # "vision" | "causal_lm"
    name: str
    head_names: list[str] = field(default_factory=list)


def cache_dir() -> Path:
    """The user cache for converted weights: $JACTUS_CACHE, else ~/.cache/jactus (created on demand)."""
    path = Path(os.environ.get("JACTUS_CACHE") or Path.home() / ".cache" / "jactus").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(package: str, install_hint: str) -> Path:
    """The directory of an installed asset package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed; install it with `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))
