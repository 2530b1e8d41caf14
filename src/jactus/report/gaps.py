"""Gaps of a reference row to other rows, per column and on the average, with the spread over paired seeds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

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


def parse_gaps(spec: str) -> tuple[str, list[str]]:
    """`"REF:OTHER[,OTHER...]"` -> (REF, [OTHER, ...])."""
    ref, colon, others = spec.partition(":")
    ref, other_labels = ref.strip(), [other.strip() for other in others.split(",") if other.strip()]
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

    def gap(self, ref: str, other: str, column: str) -> float | None:
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
        out = f"{round(gap, self.digits) + 0.0:+.{self.digits}f}"  # no "-0.00"
        spread = self.paired_std(ref, other, column)
        return out if spread is None else f"{out} ± {spread:.{self.digits}f}"

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
                 "paired_std": _number(self.paired_std(ref, other, column))}
                for ref, other in self.pairs for column in self.columns]


def build_gaps(table: ResultTable, specs: list[tuple[str, list[str]]]) -> GapTable:
    """The gaps `specs` (from `parse_gaps`) ask for in `table`; a label that is not one of its rows fails."""
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
            paired[(ref, other, column)] = [ref_seeds[seed] - other_seeds[seed] for seed in ref_seeds
                                            if seed in other_seeds]
    return GapTable(table.title, pairs, columns, means, table.digits, paired)


# --------------------------------------------------------------------------------------------------------------
# Plots


