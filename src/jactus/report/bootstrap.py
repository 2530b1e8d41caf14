"""Paired bootstrap intervals of a gap between two methods over items and seeds, from per-item results.

The statistic is the mean over seeds of the mean over tasks of the mean over a task's items of REF minus OTHER on the
same item (one task for a per-task gap; every task of the table for the average, each weighing as much as in the
table's average). A resample draws the seeds with replacement and, for each drawn seed, every task's items with
replacement (within the task, so every task keeps its size); the interval is the percentile interval of the
statistic over the resamples. Pairing on the item removes the items' shared difficulty, which is most of the noise
of a single method's accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES, LEVEL, SEED = 1000, 0.95, 0


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    observed: float  # the statistic on the data as it is
    seeds: int  # seeds paired
    items: int  # paired items per seed, over the tasks (the smallest count over seeds)


def paired_differences(ref: dict, other: dict) -> np.ndarray:
    """REF minus OTHER on the item ids both have ({item id: value} each), in sorted id order."""
    common = sorted(ref.keys() & other.keys())
    return np.array([ref[key] - other[key] for key in common], dtype=np.float64)


def paired_bootstrap(differences: dict, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
                     ) -> Interval | None:
    """The interval of the mean paired difference: `differences[seed][task]` holds the per-item differences of one
    task under one seed (every seed needs the same tasks). None when no seed has an item in every task."""
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level={level}, resamples={resamples}: expected 0 < level < 1 and resamples >= 1")
    seeds = [task_diffs for task_diffs in differences.values()
             if task_diffs and all(len(diffs) for diffs in task_diffs.values())]
    if not seeds:
        return None
    tasks = sorted(seeds[0])
    if any(sorted(task_diffs) != tasks for task_diffs in seeds):
        raise ValueError(f"every seed needs the same tasks; got {[sorted(d) for d in seeds]}")
    rng = np.random.default_rng(seed)
    observed = float(np.mean([np.mean([task_diffs[t].mean() for t in tasks]) for task_diffs in seeds]))
    picks = rng.integers(0, len(seeds), size=(resamples, len(seeds)))  # the seeds drawn in each resample
    totals = np.zeros(resamples)
    for draw in range(len(seeds)):  # every drawn seed gets its own item resample, even when drawn twice
        per_seed = np.stack([_item_means(task_diffs, tasks, resamples, rng) for task_diffs in seeds])
        totals += per_seed[picks[:, draw], np.arange(resamples)]
    stats = totals / len(seeds)
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    items = min(sum(len(diffs) for diffs in task_diffs.values()) for task_diffs in seeds)
    return Interval(float(low), float(high), observed, len(seeds), items)


def _item_means(task_diffs: dict, tasks: list[str], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples] means over tasks of the mean of each task's items drawn with replacement."""
    means = np.zeros(resamples)
    for task in tasks:
        diffs = task_diffs[task]
        means += diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    return means / len(tasks)
