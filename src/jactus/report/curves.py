"""Budget curves: each compressing method's rows across budgets, against a reference row and against each other.

`jactus-report ... --curves lora` adds, per table, the average column of every method line ("jactus", "taco
(bytes)": a row label without its "@budget") at each budget it ran, with the paired gap to the reference row and its
bootstrap interval (`gaps.build_gaps`, over the runs' per-item results); the budget from which each line meets the
reference; and the best line at each budget with its gap to the runner-up. Lines are ranked at a budget on the
seeds every line there ran (a line run on one more seed is not ranked on a different sample than the others); where
they share no seed, on each line's own mean, and the text says so.

"Meets the reference" at a budget: the interval of the line minus the reference reaches zero or beyond in the line's
favour (it is not measurably worse); where the runs have no per-item results, the mean gap decides and the text says
so. A line meets the reference *from* budget b when it does at b and at every larger budget it ran: one budget that
happens to touch zero below a measured loss is not a crossing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .gaps import GapsError, GapTable, _signed, build_gaps
from .load import AVERAGE, MISSING
from .tables import ResultTable, _seed_key

BUDGET = re.compile(r"@([0-9.eE+-]+)")


def line_and_budget(row: str) -> tuple[str, float] | None:
    """("taco (bytes)", 0.8) for the row "taco@0.8 (bytes)"; None for a row without a budget (a dense method)."""
    match = BUDGET.search(row)
    if match is None:
        return None
    return row[:match.start()] + row[match.end():], float(match.group(1))


@dataclass
class Curves:
    """One table's curves on its average column: `rows[line][budget]` is the row label, `gaps` holds the pairs
    (row, reference) and, per budget, (best, runner-up)."""

    table: ResultTable
    reference: str
    rows: dict[str, dict[float, str]]
    gaps: GapTable
    best: dict[float, tuple[str, str | None]]  # budget -> (best line, runner-up line or None)
    ranked_on: dict[float, list | None]  # budget -> the seeds the ranking used (None: no shared seed, own means)

    @property
    def budgets(self) -> list[float]:
        return sorted({budget for by_budget in self.rows.values() for budget in by_budget})

    def mean(self, row: str) -> float | None:
        return self.table.cell(row, AVERAGE).mean

    def _favours(self, gap: float) -> bool:
        """A gap of line minus reference at zero or in the line's favour."""
        return gap <= 0 if self.table.lower_is_better else gap >= 0

    def meets(self, row: str) -> tuple[bool, bool] | None:
        """(meets the reference, judged by an interval) for one row; None where either mean is missing."""
        interval = self.gaps.intervals.get((row, self.reference, AVERAGE))
        if interval is not None:
            edge = interval.low if self.table.lower_is_better else interval.high
            return self._favours(edge), True
        gap = self.gaps.gap(row, self.reference, AVERAGE)
        return None if gap is None else (self._favours(gap), False)

    def crossing(self, line: str) -> tuple[float | None, bool]:
        """(the smallest budget from which `line` meets the reference at every larger budget it ran, or None; whether
        every verdict from there on had an interval)."""
        verdicts = [(budget, self.meets(row)) for budget, row in sorted(self.rows[line].items())]
        verdicts = [(budget, verdict) for budget, verdict in verdicts if verdict is not None]
        start, by_interval = None, True
        for budget, (meets, judged) in reversed(verdicts):
            if not meets:
                break
            start, by_interval = budget, by_interval and judged
        return start, by_interval

    def cell_text(self, row: str) -> str:
        mean = self.mean(row)
        if mean is None:
            return MISSING
        digits = self.table.digits
        gap = self.gaps.gap(row, self.reference, AVERAGE)
        if gap is None:
            return f"{mean:.{digits}f}"
        interval = self.gaps.intervals.get((row, self.reference, AVERAGE))
        spread = "" if interval is None else f" [{_signed(interval.low, digits)}, {_signed(interval.high, digits)}]"
        return f"{mean:.{digits}f} ({_signed(gap, digits)}{spread})"

    def best_text(self, budget: float) -> str:
        best, runner_up = self.best[budget]
        if runner_up is None:
            return f"{best} (alone)"
        rows = self.rows[best][budget], self.rows[runner_up][budget]
        seeds = self.ranked_on.get(budget)
        if seeds is None:
            basis = "; ranked on each line's own seeds: they share none"
        else:
            ran = {seed for line in self.rows if budget in self.rows[line]
                   for seed in self.table.cell(self.rows[line][budget], AVERAGE).by_seed()}
            basis = "" if len(ran) == len(seeds) else f"; ranked on seed(s) {', '.join(map(str, seeds))}, shared by all"
        return f"{best}: {self.gaps.text(*rows, AVERAGE)} over {runner_up}{basis}"

    def to_records(self) -> list[dict]:
        """Long format: one record per (line, budget) on the average column, and the crossing per line."""
        records = []
        for line, by_budget in self.rows.items():
            start, by_interval = self.crossing(line)
            for budget, row in sorted(by_budget.items()):
                interval = self.gaps.intervals.get((row, self.reference, AVERAGE))
                verdict = self.meets(row)
                records.append({
                    "table": self.table.title, "metric": self.table.metric, "reference": self.reference,
                    "line": line, "budget": budget, "row": row, "mean": self.mean(row),
                    "std": self.table.cell(row, AVERAGE).std, "bytes_ratio": self.table.bytes_ratio.get(row),
                    "params_ratio": self.table.ratio.get(row),
                    "gap": self.gaps.gap(row, self.reference, AVERAGE),
                    "ci_low": None if interval is None else interval.low,
                    "ci_high": None if interval is None else interval.high,
                    "ci_seeds": 0 if interval is None else interval.seeds,
                    "ci_items": 0 if interval is None else interval.items,
                    "meets": None if verdict is None else verdict[0], "meets_from": start,
                    "best": self.best.get(budget, (None,))[0] == line})
        return records

    def to_markdown(self) -> str:
        budgets = self.budgets
        header = ["Method", *(f"{budget:g}" for budget in budgets)]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * len(budgets)) + "|"]
        lines.append("| " + " | ".join([f"{self.reference} (reference)",
                                        *([self.table.cell(self.reference, AVERAGE).text(self.table.digits)]
                                          * len(budgets))]) + " |")
        for line, by_budget in self.rows.items():
            lines.append("| " + " | ".join([line, *(self.cell_text(by_budget[b]) if b in by_budget else MISSING
                                                    for b in budgets)]) + " |")
        meets = []
        for line in self.rows:
            start, by_interval = self.crossing(line)
            where = "at no budget run" if start is None else f"from {start:g}"
            meets.append(f"{line} {where}" + ("" if by_interval or start is None else " (means only: no per-item "
                                                                                      "results)"))
        lines += ["", f"Meets {self.reference} (the interval of the gap reaches zero, at that budget and every larger "
                      f"one run): {'; '.join(meets)}.", "",
                  "Best at each budget (its gap to the runner-up, paired over seeds and items):", ""]
        lines += [f"- {budget:g}: {self.best_text(budget)}" for budget in budgets if budget in self.best]
        return "\n".join(lines)


def build_curves(table: ResultTable, reference: str, resamples: int, level: float) -> Curves:
    """The curves of `table` against its row `reference` (a label of the table; unknown labels fail listing the
    rows)."""
    if reference not in table.rows:
        raise GapsError(f"--curves {reference!r}: not a row of the table {table.title!r}; its rows: "
                        f"{', '.join(table.rows)}")
    if line_and_budget(reference) is not None:
        raise GapsError(f"--curves {reference!r}: the reference is a row without a budget (a dense method: "
                        f"lora, dora, full_ft); the table's: "
                        f"{', '.join(row for row in table.rows if line_and_budget(row) is None) or 'none'}")
    rows: dict[str, dict[float, str]] = {}
    for row in table.rows:
        parsed = line_and_budget(row)
        if parsed is not None and table.cell(row, AVERAGE).mean is not None:
            rows.setdefault(parsed[0], {})[parsed[1]] = row
    best: dict[float, tuple[str, str | None]] = {}
    ranked_on: dict[float, list | None] = {}
    for budget in sorted({b for by_budget in rows.values() for b in by_budget}):
        lines = [line for line in rows if budget in rows[line]]
        means, ranked_on[budget] = _ranking_means(table, [rows[line][budget] for line in lines])
        ranked = sorted(lines, key=lambda line: means[rows[line][budget]], reverse=not table.lower_is_better)
        best[budget] = (ranked[0], ranked[1] if len(ranked) > 1 else None)
    specs = [(row, [reference]) for by_budget in rows.values() for row in by_budget.values()]
    specs += [(rows[top][budget], [rows[second][budget]]) for budget, (top, second) in best.items()
              if second is not None]
    gaps = build_gaps(table, specs, resamples, level)
    return Curves(table, reference, rows, gaps, best, ranked_on)


def _ranking_means(table: ResultTable, labels: list[str]) -> tuple[dict[str, float], list | None]:
    """Each row's mean of the average column over the seeds all `labels` ran, and those seeds; each row's own mean
    and None where they share no seed."""
    by_seed = {label: table.cell(label, AVERAGE).by_seed() for label in labels}
    shared = set.intersection(*(set(values) for values in by_seed.values()))
    if not shared:
        return {label: table.cell(label, AVERAGE).mean for label in labels}, None
    seeds = sorted(shared, key=_seed_key)
    return {label: sum(by_seed[label][seed] for seed in seeds) / len(seeds) for label in labels}, seeds
