"""Distillation from the dense model (docs/METHOD.md section 9), in plain PyTorch.

Before a compressing method replaces the layers, the dense model runs once over the training examples and its
targets are cached per example (`TeacherCache`): for a classifier the logits of the (warmed-up) head, for a causal LM
the top-k log-probabilities at the loss positions plus the log of the remaining mass. Fine-tuning then minimises

    CE(labels) + w * T^2 * KL(teacher_T || student_T)

with no second model in memory. Every training batch carries the indices of its examples (`example_idx` in a QA
batch dict, the third element of a vision batch), which is how the cache finds its rows.

Temperature: a classifier's cached logits are tempered at loss time (exact for any T). An LM's distribution over the
vocabulary is cut to its top k when cached, so it is cached at the run's temperature: the top-k log-probabilities
of softmax(z / T) and log(1 - their mass). The student's side is the same k tokens of its own tempered softmax plus
the complement bucket, so the KL is exact over the k + 1 outcomes (a lower bound of the full-vocabulary KL by the
data-processing inequality) and zero when the student equals the teacher. Such a cache serves only the temperature
and top-k it was built with (`TeacherCache.mismatched_settings`): `Distillation` refuses another temperature, and a
run resumed from a checkpoint with another `distill.temperature` or `distill.topk` fails (`CompressionCallback`).

Memory: a classifier caches N x C floats (CIFAR-100, 50k items: 20 MB); an LM N x answer tokens x k x 8 bytes
(commonsense_170k at k = 32 and ~20 answer tokens an item: ~0.9 GB of host memory). Cost: one forward pass of the
dense model over the training set, once, before compression.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .core.calibration import to_device
from .core.modes import module_modes, restore_modes
from .core.precision import autocast_for

# (loss, logits at the loss positions [B, C] or [M, V], batch row of each position) of a model on a training batch:
# `TaskModule.loss_and_logits`
LossAndLogits = Callable[[torch.nn.Module, object], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def example_indices(batch) -> torch.Tensor:
    """The dataset indices of a training batch's examples (see the module docstring)."""
    if isinstance(batch, dict):
        index = batch.get("example_idx")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 3:
        index = batch[2]
    else:
        index = None
    if index is None:
        raise ValueError("distillation needs the example indices of each training batch (`example_idx` in a QA "
                         "batch, the third element of a vision batch): this datamodule does not provide them")
    return index


@dataclass
class TeacherCache:
    """Per-example teacher targets, on the CPU. `kind` is "logits" (classifier: `logits[i]` [C]) or "topk" (LM:
    `values[i]` [n_i, k] log-probabilities at temperature `temperature`, `indices[i]` [n_i, k] token ids, `rest[i]`
    [n_i] the log of the remaining mass, for the example's n_i loss positions in order)."""

    kind: str
    temperature: float
    topk: int | None = None
    entries: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def gather(self, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The cached targets of a batch's examples, concatenated in batch order (LM: position order)."""
        missing = [int(i) for i in indices.tolist() if int(i) not in self.entries]
        if missing:
            raise KeyError(f"the teacher cache has no entry for examples {missing[:5]} ({len(self)} cached): it was "
                           f"built over another training set")
        parts = [self.entries[int(i)] for i in indices.tolist()]
        join = torch.stack if self.kind == "logits" else torch.cat  # one row per example, or its positions
        return tuple(join([p[j] for p in parts]).to(device) for j in range(len(parts[0])))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.entries.values() for t in entry)

    def mismatched_settings(self, temperature: float, topk: int | None = None) -> list[str]:
        """The settings these targets were built with that differ from `temperature` / `topk` (None: not compared),
        as `distill.<key>: <built> in the cache, <given> in this run` phrases; [] when the targets serve those
        settings. An LM's cache holds softmax(z / T) cut to its top k, so both are in it; a classifier's logits are
        tempered at loss time and hold neither."""
        if self.kind != "topk":
            return []
        given = {"temperature": float(temperature), "topk": topk}
        built = {"temperature": self.temperature, "topk": self.topk}
        return [f"distill.{key}: {built[key]} in the cache, {value} in this run" for key, value in given.items()
                if value is not None and value != built[key]]

    def state_dict(self) -> dict:
        """What a checkpoint stores, so a resumed run distils toward the same targets without the dense model."""
        return {"kind": self.kind, "temperature": self.temperature, "topk": self.topk, "entries": self.entries}

    @classmethod
    def from_state_dict(cls, state: dict) -> TeacherCache:
        return cls(state["kind"], state["temperature"], state["topk"], dict(state["entries"]))


@torch.no_grad()
def build_cache(model: torch.nn.Module, batches: Iterable, loss_and_logits: LossAndLogits, *, family: str,
                topk: int = 32, temperature: float = 1.0, device: torch.device | str = "cpu", progress: bool = True,
                rank: int = 0, world_size: int = 1) -> TeacherCache:
    """Run the (dense) `model` once over `batches` (indexed training batches) and cache its targets per example.

    Under DDP (`world_size` > 1, a process group initialised) each rank runs every `world_size`-th batch and the
    entries are all-gathered, so every rank holds the whole cache: the distributed sampler deals training examples
    to ranks anew every epoch."""
    from .core.progress import progress_bar

    check_options(1.0, temperature, topk)
    device = torch.device(device)
    modes = module_modes(model)
    model.eval()
    cache = TeacherCache("logits" if family == "vision" else "topk", float(temperature),
                         None if family == "vision" else int(topk))
    try:
        for number, batch in enumerate(progress_bar(batches, desc="distillation targets (dense model)",
                                                    disable=not progress or rank != 0, leave=False)):
            if number % world_size != rank:
                continue
            batch = to_device(batch, device)
            index = example_indices(batch).tolist()
            with autocast_for(model, device):
                _, logits, rows = loss_and_logits(model, batch)
            logits = logits.float()
            if cache.kind == "logits":
                for row, example in enumerate(index):
                    cache.entries[int(example)] = (logits[row].cpu(),)
                continue
            logp = F.log_softmax(logits / temperature, dim=-1)
            values, tokens = logp.topk(min(int(topk), logp.shape[-1]), dim=-1)
            rest = _log1mexp(torch.logsumexp(values, dim=-1))
            for row, example in enumerate(index):
                mine = rows == row
                cache.entries[int(example)] = (values[mine].cpu(), tokens[mine].to(torch.int32).cpu(),
                                               rest[mine].cpu())
    finally:
        restore_modes(modes)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        shards: list = [None] * world_size
        torch.distributed.all_gather_object(shards, cache.entries)
        cache.entries = {key: value for shard in shards for key, value in shard.items()}
    return cache


def _log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, floored so that an (almost) complete top-k leaves a finite, tiny remainder."""
    return torch.log(-torch.expm1(log_mass.clamp(max=-1e-7))).clamp_min(-80.0)


def kl_from_cache(student_logits: torch.Tensor, targets: tuple[torch.Tensor, ...], kind: str,
                  temperature: float) -> torch.Tensor:
    """Mean over rows of KL(teacher_T || student_T) (not yet multiplied by T^2)."""
    student_logits = student_logits.float()
    if kind == "logits":
        (teacher,) = targets
        return kl_full(student_logits, teacher, temperature)
    values, tokens, rest = targets
    student = F.log_softmax(student_logits / temperature, dim=-1)
    picked = student.gather(-1, tokens.long())
    student_rest = _log1mexp(torch.logsumexp(picked, dim=-1))
    teacher_p, teacher_rest_p = values.exp(), rest.exp()
    kl = (teacher_p * (values - picked)).sum(-1) + teacher_rest_p * (rest - student_rest)
    return kl.mean()


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of KL(softmax(t / T) || softmax(s / T)) over all classes or tokens."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def check_options(weight: float, temperature: float, topk: int | None) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"distill.weight={weight!r}: expected a number >= 0 (0 = off)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"distill.temperature={temperature!r}: expected a number > 0, e.g. 1.0 or 2.0")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"distill.topk={topk!r}: expected a positive integer, e.g. 32")


@dataclass(frozen=True)
class DistillSettings:
    """The `distill` config group. `weight` None = the method's default (`Method.default_distill_weight`: 0 for
    every method but TACO, whose recipe distils)."""

    weight: float | None = None
    temperature: float = 1.0
    topk: int = 32

    def __post_init__(self):
        check_options(0.0 if self.weight is None else self.weight, self.temperature, self.topk)

    def resolved_weight(self, method) -> float:
        """The weight this run uses with `method`; distillation from the dense model only exists for a method
        that compresses it (a full-size method's dense model is its own starting point)."""
        weight = float(method.default_distill_weight if self.weight is None else self.weight)
        if weight > 0 and not method.compresses:
            raise ValueError(f"distill.weight={weight}: distillation from the dense model is for compressing methods "
                             f"(jactus, cersa, compress_then_adapt, tunecomp, taco); method {method.name!r} trains a "
                             f"full-size model: set distill.weight=0")
        return weight


@dataclass
class Distillation:
    """The distillation term of a run: `weight * T^2 * KL(teacher_T || student_T)` from `cache`, or, when the
    method brings its own teacher (TuneComp's teacher branch), from `teacher_fn(model, batch)` logits."""

    weight: float
    temperature: float = 1.0
    cache: TeacherCache | None = None  # the top-k it holds was chosen when it was built
    teacher_fn: Callable | None = None

    def __post_init__(self):
        check_options(self.weight, self.temperature, None)
        mismatched = self.cache.mismatched_settings(self.temperature) if self.cache is not None else []
        if mismatched:
            # the cached teacher is tempered already: another T would compare a T1 teacher with a T2 student
            raise ValueError(f"the teacher cache was built at another temperature ({', '.join(mismatched)}): "
                             f"distil at the cache's temperature, or rebuild the cache at {self.temperature}")

    def term(self, model: torch.nn.Module, batch, student_logits: torch.Tensor) -> torch.Tensor:
        scale = self.weight * self.temperature ** 2
        if self.teacher_fn is not None:
            with torch.no_grad():
                teacher = self.teacher_fn(model, batch).detach()
            return scale * kl_full(student_logits, teacher, self.temperature)
        if self.cache is None:
            raise RuntimeError("distillation has neither a teacher cache nor a teacher function")
        targets = self.cache.gather(example_indices(batch), student_logits.device)
        if targets[0].shape[0] != student_logits.shape[0]:
            raise RuntimeError(f"the teacher cache holds {targets[0].shape[0]} loss positions for this batch, the "
                               f"student {student_logits.shape[0]}: the batches changed since the cache was built")
        return scale * kl_from_cache(student_logits, targets, self.cache.kind, self.temperature)

