"""The one small interface every method (JACTUS and each baseline) implements.

A method changes a backbone before training (factorize, add adapters, add a teacher branch), may steer training
(schedules, penalties), and says what its deployable model is. The Lightning shell (`jactus.callbacks`) calls these
hooks; the methods themselves are plain PyTorch and never import Lightning or Hydra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.bounded import parse_bytes, resolve_max_stats_bytes
from ..core.freeze import is_norm, set_trainable, train_cores  # noqa: F401  (re-exported for the methods)
from ..core.linalg import EIG_METHODS

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class MethodContext:
    """What a method may use while it prepares the backbone."""

    model: nn.Module
    loss_fn: LossFn
    calibration_batches: Iterable | None
    head_names: Sequence[str] = ()
    family: str = "vision"  # "vision" | "causal_lm"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # batches that add to the input covariances only (generic text beside the task's items; docs/METHOD.md 1):
    # given only to a method with `input_batches = True`
    input_batches: Iterable | None = None


def input_batches_for(method: Method, datamodule) -> Iterable | None:
    """The datamodule's input-only calibration batches (`calibration_input_dataloader()`, e.g. generic text; None
    where it has none) for `method`; a method that does not take them fails rather than ignore them."""
    loader = getattr(datamodule, "calibration_input_dataloader", lambda: None)()
    if loader is not None and not method.input_batches:
        raise ValueError(f"the datamodule gives input-only calibration batches (generic text: "
                         f"data.module.calib_text={getattr(datamodule, 'calib_text', '?')}), which method "
                         f"{method.name!r} does not take (jactus, jactus_palette and compress_then_adapt do); "
                         f"set data.module.calib_text=0")
    return loader


STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}
COMPUTE_DTYPES = {"auto": "auto", "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class CalibSettings:
    """How a compressing method holds and decomposes its calibration statistics: the memory options of the `calib`
    config group, passed to the one compression driver `compress_model` (docs/SCALING.md)."""

    max_stats_bytes: int | str | None = None  # None: one pass; bytes, "22GB"/"20GiB", or "auto"
    stats_dtype: str = "float64"
    offload_to_cpu: bool = False
    park_layers_on_cpu: bool = False
    compute_dtype: str = "auto"
    eig_method: str = "auto"
    stats_cache: str | None = None  # a directory of cached statistics (core.stats_cache); None: calibrate every run
    stats_cache_max_bytes: int | str | None = None  # bound on that directory (least recently used files go); None: none

    def __post_init__(self):
        choice(self.stats_dtype, list(STATS_DTYPES), "calib.stats_dtype")
        choice(self.compute_dtype, list(COMPUTE_DTYPES), "calib.compute_dtype")
        choice(self.eig_method, list(EIG_METHODS), "calib.eig_method")
        for key in ("offload_to_cpu", "park_layers_on_cpu"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"calib.{key}={getattr(self, key)!r}: expected true or false")
        if self.stats_cache is not None and (not isinstance(self.stats_cache, str) or not self.stats_cache.strip()):
            raise ValueError(f"calib.stats_cache={self.stats_cache!r}: expected a directory path or null")
        try:
            parse_bytes(self.stats_cache_max_bytes, "stats_cache_max_bytes")
        except ValueError as err:
            raise ValueError(f"calib.{err}") from None
        if not (isinstance(self.max_stats_bytes, str) and self.max_stats_bytes.strip().lower() == "auto"):
            try:
                resolve_max_stats_bytes(self.max_stats_bytes)
            except ValueError as err:
                raise ValueError(f"calib.{err}") from None

    @classmethod
    def from_config(cls, calib: Mapping | None) -> CalibSettings:
        """The memory options from a `calib` mapping (the group's other keys, e.g. num_samples, are not ours)."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in (calib or {}).items() if key in names})

    def driver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `compress_model`."""
        return {"max_stats_bytes": self.max_stats_bytes, "stats_dtype": STATS_DTYPES[self.stats_dtype],
                "offload_to_cpu": self.offload_to_cpu, "park_layers_on_cpu": self.park_layers_on_cpu,
                "compute_dtype": COMPUTE_DTYPES[self.compute_dtype], "eig_method": self.eig_method,
                "stats_cache": self.stats_cache, "stats_cache_max_bytes": self.stats_cache_max_bytes}


class Method:
    """Base class. Subclasses set `name`, and `compresses = True` when the deployed model is smaller.

    `shardable = False` marks a method whose training-time hooks need every layer's full tensors on each rank
    (TuneComp's pruning), which a sharding strategy (FSDP) does not give; the Lightning shell refuses that pairing.
    """

    name: ClassVar[str] = "base"
    compresses: ClassVar[bool] = False
    shardable: bool = True  # an instance may turn it off for one of its options (jactus's core_dropout)
    unshardable_reason: str = "its training-time hooks read and prune whole layers, which a sharding strategy splits " \
                              "across ranks"
    # distill.weight when the config leaves it null (docs/METHOD.md section 9): TACO's recipe distils, the others do not
    default_distill_weight: ClassVar[float] = 0.0
    # True: distillation uses the method's own teacher (`distill_teacher`) instead of a cache of the dense model
    own_teacher: ClassVar[bool] = False
    # True: the method's calibration takes input-only batches (`MethodContext.input_batches`)
    input_batches: ClassVar[bool] = False

    def apply(self, ctx: MethodContext) -> nn.Module:
        """Prepare `ctx.model` for training; return the module to train (usually the same object)."""
        raise NotImplementedError

    def on_train_batch_start(self, model: nn.Module, step: int, max_steps: int) -> None:
        """Per-step schedules (TuneComp's teacher decay, pruning)."""

    def loss_terms(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Extra terms of the training loss on this batch, by name (penalties; {} for none). The LightningModule adds
        them to the task loss in `training_step`, so the precision plugin's loss scaling and gradient accumulation
        treat them as they treat the task loss; each is logged as `train/<name>`."""
        return {}

    def distill_teacher(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """For a method with `own_teacher`: a context in which `model` computes its teacher's outputs (TuneComp:
        every teacher branch at full weight). Other methods distil from a cache of the dense model built before
        `apply`."""
        raise NotImplementedError(f"method {self.name!r} has no teacher of its own")

    def export(self, model: nn.Module) -> nn.Module:
        """The deployable model: adapters merged, factors folded, teacher branches dropped."""
        return model

    def params_deployed(self, deployed: nn.Module) -> int:
        """Parameters of the deployed model (`export`'s output) as the budget counts them: every parameter by default;
        a sparse method counts its non-zeros."""
        from ..core import count_params

        return count_params(deployed)

    def params_trainable(self, model: nn.Module) -> int:
        """Parameters the optimizer updates in the prepared `model`: every trainable parameter by default; a method
        that trains part of a tensor (TACO's surviving weights) counts that part."""
        from ..core import count_params

        return count_params(model, trainable_only=True)

    def structure(self) -> dict | None:
        """What a checkpoint needs to rebuild this method's module structure without recalibrating."""
        return None

    def rebuild(self, model: nn.Module, structure: dict) -> nn.Module:
        """Rebuild the structure recorded by `structure()` (resume from a checkpoint); no calibration."""
        raise NotImplementedError(f"method {self.name!r} cannot rebuild a checkpointed structure")

    @property
    def budget(self) -> float | None:
        """The budget this method compresses to, a ratio of parameters or of bytes (`unit`); None for full-size
        methods."""
        return None

    unit: str = "params"  # what `budget` counts: retained parameters, or stored bytes (core.byte_budget)

    def params_budget(self, model: nn.Module, budget: float, targets: Sequence[str] | None) -> float:
        """`budget` as the retained-parameter ratio a low-rank planner takes: itself in parameters; with
        `unit=bytes` the ratio whose deployed model stores at most that share of the dense model's bytes."""
        if self.unit == "params":
            return budget
        from ..core.byte_budget import params_ratio_for_bytes
        from ..core.targets import find_targets

        return params_ratio_for_bytes(model, budget, self.scope, find_targets(model, targets))

    def summary(self) -> dict:
        """Method-specific figures for summary.json (rank statistics, compression time, memory)."""
        return {}

    def palette_members(self) -> list[tuple[float, Callable[[nn.Module], None]]]:
        """A method that trains a palette of compact models in one run (jactus_palette): `(budget, activate)` per
        member, smallest budget first, where `activate(model)` makes `model` compute that member and `export` return
        it; jactus-train evaluates and exports each. [] for a method with one deployed model."""
        return []


REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: `@register("lora")` makes the method known by that name."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def get_method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(REGISTRY)}")
    return REGISTRY[name]


def choice(value, valid: Sequence[str], key: str):
    if value not in valid:
        raise ValueError(f"{key}={value!r}: expected one of {list(valid)}")
    return value


def check_positive(value, key: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}={value!r}: expected a positive integer{' or null' if allow_none else ''}")
    return value


def check_budget(budget: float, method: str) -> float:
    """A retained-parameter budget must be a ratio in (0, 1]."""
    if not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"budget.ratio={budget!r} for method {method!r}: expected a ratio in (0, 1], e.g. 0.8")
    return float(budget)
