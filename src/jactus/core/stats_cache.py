"""A content-addressed cache of calibration statistics (`calib.stats_cache`).

Sweeps over what comes after calibration -- rho, the budget, the allocator, the weight basis, damping, the core
learning rate -- measure the same statistics again in every run, and calibration is the slowest step of a compressing
run on a small machine. With a cache directory, `compress_model` keys each calibration pass by what its statistics
depend on and loads them when a run with the same key has written them:

- every parameter and buffer of the model as calibration sees it (names, dtypes, shapes and bytes: a head warmed up
  differently, another checkpoint or another dtype is another key);
- every calibration batch (tensors by content, other values by repr);
- the pass's target layers and shared-input groups, whether gradients are taken, the statistics' dtype, the mask key,
  and the loss function's and loss normalizer's qualified names (a bound method's object can name its settings in
  `calibration_loss_key`, as `CausalLMQA` does for `calib.loss=sequence`; a loss with other hidden settings must not
  share a directory with another loss of the same name).

A hit returns exactly the statistics the first run measured, so the run is the same as without the cache (the
statistics are deterministic on the CPU; on a GPU they equal a recalibration up to summation order). Files are
`<dir>/<key>.pt` (`CalibrationStats.save`, written to a temporary name and renamed, so runs sharing the directory
never read half a file); they are the statistics' size (2.2 GB for SmolLM2-135M in float64). Hashing reads the whole
model once (about 1 s per GB). Single-process only: under torch.distributed each rank sees other batches.

`max_bytes` (`calib.stats_cache_max_bytes`) bounds the directory: after a write, the least recently used files
(a hit counts as a use) go until the `.pt` files fit, never the one just written; statistics larger than the bound
alone are not stored (said in the log). Without it the directory grows by one file per distinct calibration.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import CalibrationStats, distributed

log = logging.getLogger("jactus")


def _update_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        flat = tensor.cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.dtype != torch.bool
                      else flat.to(torch.uint8).numpy().tobytes())


def _update_value(digest, value: Any) -> None:
    if torch.is_tensor(value):
        _update_tensor(digest, value)
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _update_value(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _update_value(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


def model_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer of `model` (names, dtypes, shapes, values)."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        _update_tensor(digest, tensor)
    return digest.hexdigest()


def batches_digest(batches: Iterable) -> str:
    """A hash of every calibration batch, in order."""
    digest = hashlib.blake2b(digest_size=20)
    for batch in batches:
        _update_value(digest, batch)
    return digest.hexdigest()


def _qualname(fn: Callable | None) -> str:
    """The function's qualified name, and for a bound method the `calibration_loss_key` of its object when it has
    one (a task module whose calibration loss has settings, e.g. `calib.loss=sequence`)."""
    if fn is None:
        return "None"
    setting = getattr(getattr(fn, "__self__", None), "calibration_loss_key", None)
    fn = getattr(fn, "__func__", fn)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    return name if setting is None else f"{name}[{setting}]"


def stats_key(model_hash: str, batches_hash: str, groups: Sequence[Sequence[str]], *, need_gradients: bool,
              stats_dtype: torch.dtype, mask_key: str, loss_fn: Callable | None,
              loss_normalizer: Callable | None) -> str:
    """The key of one calibration pass (module docstring)."""
    digest = hashlib.blake2b(digest_size=20)
    _update_value(digest, [model_hash, batches_hash, [list(g) for g in groups], need_gradients, str(stats_dtype),
                           mask_key, _qualname(loss_fn), _qualname(loss_normalizer)])
    return digest.hexdigest()


class StatsCache:
    """`cached(key, compute)` -> the statistics stored under `key`, else `compute()`'s, stored under it; with
    `max_bytes`, least recently used files are removed so that the directory's statistics fit (module docstring)."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int | None = None):
        if distributed():
            raise ValueError(f"calib.stats_cache={str(directory)!r} works in a single process only (under "
                             f"torch.distributed every rank calibrates on other batches); set it to null")
        self.directory = Path(directory).expanduser()
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"calib.stats_cache={str(directory)!r} is a file; expected a directory (created if absent)")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"stats_cache_max_bytes={max_bytes!r}: expected a positive number of bytes or None")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evicted: list[str] = []  # file names removed to stay under max_bytes

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def cached(self, key: str, compute: Callable[[], CalibrationStats],
               map_location: torch.device | str = "cpu") -> CalibrationStats:
        path = self.path(key)
        try:
            os.utime(path)  # a use: least-recently-used eviction keeps what sweeps still read
            stats = CalibrationStats.load(path, map_location=map_location)
        except FileNotFoundError:  # never written, or evicted by a run sharing the directory
            pass
        else:
            self.hits += 1
            log.info("calibration statistics from the cache: %s", path)
            return stats
        self.misses += 1
        stats = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        stats.save(partial)
        size = partial.stat().st_size
        if self.max_bytes is not None and size > self.max_bytes:
            partial.unlink()
            log.warning("calibration statistics not cached: %.2f GB is more than calib.stats_cache_max_bytes=%d "
                        "(%.2f GB) alone", size / 1e9, self.max_bytes, self.max_bytes / 1e9)
            return stats
        partial.replace(path)
        log.info("calibration statistics cached: %s", path)
        self._evict(keep=path)
        return stats

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used `.pt` files (oldest modification time first) until the rest fit."""
        if self.max_bytes is None:
            return
        files = []
        for candidate in self.directory.glob("*.pt"):
            try:
                info = candidate.stat()
            except FileNotFoundError:  # removed meanwhile by another run
                continue
            files.append((info.st_mtime, info.st_size, candidate))
        total = sum(size for _, size, _ in files)
        for _, size, candidate in sorted(files, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            if candidate == keep:
                continue
            candidate.unlink(missing_ok=True)
            total -= size
            self.evicted.append(candidate.name)
            log.info("calibration statistics evicted from the cache (calib.stats_cache_max_bytes=%d): %s, %.2f GB",
                     self.max_bytes, candidate, size / 1e9)
