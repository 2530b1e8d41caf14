"""Gaps of a reference row to other rows, per column and on the average, with the spread over paired seeds and,
where the runs wrote per-item results (items.jsonl.gz), a paired bootstrap interval over items and seeds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from . import items as run_items
from .bootstrap import LEVEL, RESAMPLES, SEED, Interval, paired_bootstrap, paired_differences
from .load import (  # noqa: F401
    AVERAGE,
    MISSING,
)
from .tables import (  # noqa: F401
    ResultTable,
    _number,
)


class GapsError(ValueError):
    """A malformed `--gaps` spec or a label that is not a row of a table."""


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside parentheses: rows split by several keys are labelled
    "jactus@0.8 (method.rho=0, calib.num_samples=512)", one label with a comma inside."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return [*parts, text[start:]]


def parse_gaps(spec: str) -> tuple[str, list[str]]:
    """`"REF:OTHER[,OTHER...]"` -> (REF, [OTHER, ...]); commas inside a label's parentheses stay in the label."""
    ref, colon, others = spec.partition(":")
    ref, other_labels = ref.strip(), [other.strip() for other in _split_top_level(others) if other.strip()]
    if not colon or not ref or not other_labels:
        raise GapsError(f"--gaps {spec!r}: expected REF:OTHER[,OTHER...], e.g. jactus@0.8:lora,dora")
    return ref, other_labels


@dataclass
class GapTable:
    """REF minus OTHER of the means of a `ResultTable`, per column and on the average: one row per (REF, OTHER)."""

    title: str
    pairs: list[tuple[str, str]]
    columns: list[str]
    means: dict[tuple[str, str], float | None]  # (row, column) -> the table's mean
    digits: int = 2
    paired: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)  # (ref, other, column) -> diffs
    intervals: dict[tuple[str, str, str], Interval | None] = field(default_factory=dict)  # bootstrap, where items
    without_items: list[str] = field(default_factory=list)  # "row (seed s)" whose runs have no per-item results
    level: float = LEVEL

    def gap(self, ref: str, other: str, column: str) -> float | None:
        """The mean over the seeds both rows ran of REF minus OTHER (equal to the difference of the rows' means when
        they ran the same seeds, and the statistic the interval is about); the difference of the means where they
        share no seed (`text` marks it unpaired)."""
        differences = self.paired.get((ref, other, column), [])
        if differences:
            return statistics.fmean(differences)
        ref_mean, other_mean = self.means[(ref, column)], self.means[(other, column)]
        return None if ref_mean is None or other_mean is None else ref_mean - other_mean

    def paired_std(self, ref: str, other: str, column: str) -> float | None:
        """Sample std of REF minus OTHER per seed, over the seeds both have (None below two such seeds)."""
        differences = self.paired.get((ref, other, column), [])
        return statistics.stdev(differences) if len(differences) > 1 else None

    def text(self, ref: str, other: str, column: str) -> str:
        gap = self.gap(ref, other, column)
        if gap is None:
            return MISSING
        out = _signed(gap, self.digits)
        if not self.paired.get((ref, other, column)):
            return out + " (unpaired)"
        spread = self.paired_std(ref, other, column)
        if spread is not None:
            out += f" ± {spread:.{self.digits}f}"
        interval = self.intervals.get((ref, other, column))
        if interval is not None:
            out += (f" [{_signed(interval.low, self.digits)}, {_signed(interval.high, self.digits)}] "
                    f"(n={interval.items} x {interval.seeds})")
        return out

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(["Ref", "Other", *self.columns]) + " |",
                 "|" + "|".join([":---", ":---"] + ["---:"] * len(self.columns)) + "|"]
        lines += ["| " + " | ".join([ref, other, *(self.text(ref, other, c) for c in self.columns)]) + " |"
                  for ref, other in self.pairs]
        return "\n".join(lines)

    def to_records(self) -> list[dict]:
        """Long format: one record per (REF, OTHER, column)."""
        return [{"table": self.title, "ref": ref, "other": other, "column": column,
                 "ref_mean": _number(self.means[(ref, column)]), "other_mean": _number(self.means[(other, column)]),
                 "gap": _number(self.gap(ref, other, column)),
                 "paired_seeds": len(self.paired.get((ref, other, column), [])),
                 "paired_std": _number(self.paired_std(ref, other, column)),
                 **_interval_record(self.intervals.get((ref, other, column)), self.level)}
                for ref, other in self.pairs for column in self.columns]


def _unseeded(key) -> bool:
    return isinstance(key, tuple) and key[:1] == ("run",)  # `Cell.by_seed`'s key for a run without a seed


def _signed(value: float, digits: int) -> str:
    return f"{round(value, digits) + 0.0:+.{digits}f}"  # no "-0.00"


def _interval_record(interval: Interval | None, level: float) -> dict:
    if interval is None:
        return {"ci_level": level, "ci_low": _number(None), "ci_high": _number(None), "ci_gap": _number(None),
                "ci_seeds": 0, "ci_items": 0}
    return {"ci_level": level, "ci_low": interval.low, "ci_high": interval.high, "ci_gap": interval.observed,
            "ci_seeds": interval.seeds, "ci_items": interval.items}


def item_intervals(table: ResultTable, pairs: list[tuple[str, str]], columns: list[str], resamples: int = RESAMPLES,
                   level: float = LEVEL, seed: int = SEED) -> tuple[dict, list[str]]:
    """Paired bootstrap intervals of REF minus OTHER per column (the average: over every task of the table) from
    the runs' per-item results, over the seeds both rows ran whose runs all have them; and the "row (seed s)" runs
    without per-item results (they take no part)."""
    intervals, without = {}, []
    for ref, other in pairs:
        values = {}
        for seed_value in run_items.seeds_of(table, ref):
            if (other, seed_value) not in table.runs:
                continue
            pair = (run_items.seed_values(table, ref, seed_value), run_items.seed_values(table, other, seed_value))
            for row, found in zip((ref, other), pair, strict=True):
                if found is None and f"{row} (seed {seed_value})" not in without:
                    without.append(f"{row} (seed {seed_value})")
            if None not in pair:
                values[seed_value] = pair
        for column in columns:
            tasks = table.columns if column == AVERAGE else [column]
            differences = {}
            for seed_value, (ref_values, other_values) in values.items():
                differences[seed_value] = {
                    task: paired_differences({k: v for k, v in ref_values.items() if k[0] == task},
                                             {k: v for k, v in other_values.items() if k[0] == task})
                    for task in tasks}
            intervals[(ref, other, column)] = paired_bootstrap(differences, resamples, level, seed)
    return intervals, without


def build_gaps(table: ResultTable, specs: list[tuple[str, list[str]]], resamples: int = RESAMPLES,
               level: float = LEVEL, seed: int = SEED) -> GapTable:
    """The gaps `specs` (from `parse_gaps`) ask for in `table`; a label that is not one of its rows fails. Where the
    runs wrote per-item results, each gap also gets a paired bootstrap interval (`item_intervals`; `resamples`
    resamples, `level` coverage, `seed` for the generator)."""
    pairs = [(ref, other) for ref, others in specs for other in others]
    unknown = list(dict.fromkeys(label for pair in pairs for label in pair if label not in table.rows))
    if unknown:
        raise GapsError(f"--gaps: unknown row label(s) {', '.join(map(repr, unknown))} in the table "
                        f"{table.title!r}; its rows: {', '.join(table.rows)}")
    columns = [*table.columns, AVERAGE]
    means = {(row, column): table.cell(row, column).mean for row in table.rows for column in columns}
    paired = {}
    for ref, other in pairs:
        for column in columns:
            ref_seeds, other_seeds = table.cell(ref, column).by_seed(), table.cell(other, column).by_seed()
            # A gap pairs seeds (a seed fixes the data split): a row with more seeds than the other contributes only
            # the shared ones, so the gap and its interval describe the same runs. Runs without a seed never pair.
            paired[(ref, other, column)] = [ref_seeds[seed] - other_seeds[seed] for seed in ref_seeds
                                            if seed in other_seeds and not _unseeded(seed)]
    # before fine-tuning the runs' items (the fine-tuned model's) do not apply: no intervals, nothing to list
    intervals, without = item_intervals(table, pairs, columns, resamples, level, seed) if table.per_item else ({}, [])
    return GapTable(table.title, pairs, columns, means, table.digits, paired, intervals, without, level)


# --------------------------------------------------------------------------------------------------------------
# Plots


