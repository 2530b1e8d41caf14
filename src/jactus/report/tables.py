"""The paper-style result tables: one per (experiment, model), "mean ± std" cells over seeds, bold best."""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

import pandas as pd

from .load import (  # noqa: F401
    AVERAGE,
    BYTES,
    COLUMN_ORDER,
    FAILED,
    METHOD_ORDER,
    MISSING,
    RATIO,
    _number,
    results_frame,
)


@dataclass
class Cell:
    """The seeds of one (row, column): the values of successful runs and how many runs failed."""

    values: list[float] = field(default_factory=list)
    failed: int = 0
    seeds: list = field(default_factory=list)  # the seed of each value

    def by_seed(self) -> dict:
        """seed -> value (the mean where a seed was run more than once; a run without a seed stands alone)."""
        grouped: dict = {}
        seeds = self.seeds or [None] * len(self.values)
        for index, (seed, value) in enumerate(zip(seeds, self.values, strict=True)):
            unseeded = seed is None or (isinstance(seed, float) and math.isnan(seed))
            grouped.setdefault(("run", index) if unseeded else seed, []).append(value)
        return {seed: statistics.fmean(values) for seed, values in grouped.items()}

    # A re-run of a seed is the same experiment again, not another sample: mean and std are over seeds, each seed
    # the mean of its runs (counting re-runs as seeds would shrink the std and weight the re-run seed twice).
    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.by_seed().values()) if self.values else None

    @property
    def std(self) -> float | None:
        per_seed = list(self.by_seed().values())
        return statistics.stdev(per_seed) if len(per_seed) > 1 else None

    def text(self, digits: int = 2) -> str:
        if not self.values:
            return FAILED if self.failed else MISSING
        out = f"{self.mean:.{digits}f}"
        if self.std is not None:
            out += f" ± {self.std:.{digits}f}"
        if self.failed:
            out += f" ({self.failed} failed)"
        return out


@dataclass
class ResultTable:
    """One paper-shaped table: `cells[(row, column)]`, the average column, the retained-parameter ratio per row."""

    title: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    ratio: dict[str, float | None]  # mean params_ratio of the row's successful runs (fraction)
    digits: int = 2
    lower_is_better: bool = False  # a loss (test/nll) rather than an accuracy: the lowest mean is the best
    runs: dict[tuple[str, object], list[str]] = field(default_factory=dict)  # (row, seed) -> successful runs' paths
    metric: str = ""
    bytes_ratio: dict[str, float | None] = field(default_factory=dict)  # mean bytes_ratio (runs that record it)
    per_item: bool = True  # the runs' items.jsonl.gz hold this table's values (not so for the metrics before FT)

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.get((row, column), Cell())

    def text(self, row: str, column: str) -> str:
        if column in (RATIO, BYTES):
            ratio = (self.ratio if column == RATIO else self.bytes_ratio).get(row)
            return MISSING if ratio is None else f"{100 * ratio:.1f}"
        return self.cell(row, column).text(self.digits)

    def best(self, column: str) -> set[str]:
        """Rows whose mean is the best (highest; lowest for a loss) of `column` as displayed (ties all count)."""
        means = {row: round(self.cell(row, column).mean, self.digits) for row in self.rows
                 if self.cell(row, column).mean is not None}
        top = (min if self.lower_is_better else max)(means.values(), default=None)
        return {row for row, mean in means.items() if mean == top}

    @property
    def all_columns(self) -> list[str]:
        # the bytes column where some row's runs recorded their stored bytes (runs before bytes_deployed did not)
        sizes = [RATIO, BYTES] if any(value is not None for value in self.bytes_ratio.values()) else [RATIO]
        return [*sizes, *self.columns, AVERAGE]

    def to_frame(self, bold: bool = False) -> pd.DataFrame:
        """Display strings: index = rows, columns = ratio, datasets/tasks, average."""
        data = {}
        for column in self.all_columns:
            best = self.best(column) if bold and column not in (RATIO, BYTES) else set()
            data[column] = [f"**{self.text(row, column)}**" if row in best else self.text(row, column)
                            for row in self.rows]
        return pd.DataFrame(data, index=pd.Index(self.rows, name="Method"))

    def to_markdown(self) -> str:
        frame = self.to_frame(bold=True)
        header = ["Method", *frame.columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * len(frame.columns)) + "|"]
        lines += ["| " + " | ".join([row, *frame.loc[row]]) + " |" for row in frame.index]
        return "\n".join(lines)


def _ordered_columns(frame: pd.DataFrame) -> list[str]:
    seen = list(dict.fromkeys(frame["column"]))
    rank = {name: index for index, name in enumerate(COLUMN_ORDER)}
    return sorted(seen, key=lambda c: (rank.get(c, len(rank)), seen.index(c)))


def _row_key(method: str, budget, label: str) -> tuple:
    """Full-size methods first, then budgets from the largest down; within a budget, METHOD_ORDER."""
    rank = {name: index for index, name in enumerate(METHOD_ORDER)}
    compressed = budget is not None and not pd.isna(budget)
    return (compressed, -budget if compressed else 0.0, rank.get(method, len(rank)), method,
            _split_numbers(label), label)


def _row_order(frame: pd.DataFrame) -> list[str]:
    first = frame.drop_duplicates("label")
    return [label for _, _, label in sorted(zip(first["method"], first["budget"], first["label"], strict=True),
                                            key=lambda item: _row_key(*item))]


def _seed_key(seed) -> tuple:
    """Numeric seeds in numeric order (2 before 10), anything else after them as text."""
    try:
        return (0, float(seed), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(seed))


def _split_numbers(label: str) -> tuple[float, ...]:
    """The numeric --split-by values of a row label ("lora (lr=1e-05)" -> (1e-05,)), so such rows sort by value."""
    values = re.findall(r"=([-+0-9.eE]+)(?=[,)])", label.rpartition(" (")[2]) if label.endswith(")") else []
    numbers = []
    for value in values:
        try:
            numbers.append(float(value))
        except ValueError:
            numbers.append(math.inf)
    return tuple(numbers)


def lower_is_better(metric: str) -> bool:
    """A loss metric (`test/nll`, `val/loss_<task>`), where the best row is the lowest."""
    return metric.rpartition("/")[2].split("_")[0] in ("nll", "loss")


def build_table(frame: pd.DataFrame, title: str = "", digits: int = 2, per_item: bool = True) -> ResultTable:
    """The table of one section (one experiment and model) of `results_frame`'s output."""
    rows, columns = _row_order(frame), _ordered_columns(frame)
    cells: dict[tuple[str, str], Cell] = {}
    for (label, column), group in frame.groupby(["label", "column"], sort=False):
        ok = group[(group["status"] == "ok") & group["value"].notna()]
        cells[(label, column)] = Cell(values=ok["value"].tolist(), failed=int((group["status"] != "ok").sum()),
                                      seeds=ok["seed"].tolist())
    for label, group in frame.groupby("label", sort=False):
        ok = group[(group["status"] == "ok") & group["value"].notna()]
        per_seed = ok.pivot_table(index="seed", columns="column", values="value", aggfunc="mean")
        complete = per_seed.reindex(columns=columns).dropna()
        cells[(label, AVERAGE)] = Cell(values=complete.mean(axis=1).tolist(), seeds=complete.index.tolist())
    ratio, bytes_ratio = {}, {}
    for label in rows:
        runs = frame[(frame["label"] == label) & (frame["status"] == "ok")].drop_duplicates("path")
        for key, means in (("params_ratio", ratio), ("bytes_ratio", bytes_ratio)):
            values = runs[key].dropna() if key in runs else []
            means[label] = float(values.mean()) if len(values) else None
    runs: dict[tuple[str, object], list[str]] = {}
    for _, run in frame[frame["status"] == "ok"].drop_duplicates("path").iterrows():
        runs.setdefault((run["label"], run["seed"]), []).append(run["path"])
    metrics = frame["metric"].dropna().unique()
    metric = str(metrics[0]) if len(metrics) else ""
    return ResultTable(title, rows, columns, cells, ratio, digits, lower_is_better=lower_is_better(metric),
                       runs=runs, metric=metric, bytes_ratio=bytes_ratio, per_item=per_item)


def build_tables(frame: pd.DataFrame, digits: int = 2, per_item: bool = True) -> list[ResultTable]:
    """One table per (experiment, model), in the order they first appear. `per_item=False`: the values are not the
    ones the runs' per-item files hold (the metrics before fine-tuning), so no interval or item count reads them."""
    tables = []
    sections = list(dict.fromkeys(zip(frame["experiment"], frame["model"], strict=True)))
    for experiment, model in sections:
        part = frame[(frame["experiment"] == experiment) & (frame["model"] == model)]
        title = f"{model} ({experiment})" if experiment else model
        tables.append(build_table(part, title, digits, per_item))
    return tables


