"""Per-item results of the runs behind a table (items.jsonl.gz next to summary.json; see `jactus.summary`)."""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

from ..summary import ITEMS_FILE, read_items
from .load import AVERAGE, MEMBER_MARK, MISSING
from .tables import ResultTable

# metric name (after "<split>/") -> (the item field, the factor that puts it on the metric's scale)
ITEM_FIELDS = {"acc": ("correct", 100.0), "nll": ("nll", 1.0)}


def metric_field(metric: str) -> tuple[str, str, float] | None:
    """(split, item field, scale) of a metric whose mean over items the items file holds ("test/acc" ->
    ("test", "correct", 100)); None for other metrics."""
    split, _, name = metric.partition("/")
    if name not in ITEM_FIELDS:
        return None
    return (split, *ITEM_FIELDS[name])


def run_items(summary_path: str) -> tuple[dict, ...] | None:
    """The item records of the run whose summary.json is `summary_path`; None when it wrote none (older runs).

    A palette member's row carries `<summary path>#budget=<b>` (`load.palette_rows`): its records are those the
    run tagged with that budget."""
    summary_path, _, member = summary_path.partition(MEMBER_MARK)
    path = Path(summary_path).parent / ITEMS_FILE
    if not path.is_file():
        return None
    records = _read(str(path), path.stat().st_mtime_ns)
    if member:
        records = tuple(r for r in records if r.get("budget") is not None and float(r["budget"]) == float(member))
    return records


@functools.lru_cache(maxsize=4096)
def _read(path: str, mtime_ns: int) -> tuple[dict, ...]:
    return tuple(read_items(path))


def seed_values(table: ResultTable, row: str, seed) -> dict[tuple[str, int], float] | None:
    """{(task, index): value on the metric's scale} of a row's runs of one seed (a re-run seed: the mean of its
    runs per item); None when a run of it has no items file or the metric has no per-item values."""
    field = metric_field(table.metric)
    paths = table.runs.get((row, seed), [])
    if field is None or not paths or not table.per_item:
        return None
    split, name, scale = field
    collected: dict[tuple[str, int], list[float]] = {}
    for path in paths:
        records = run_items(path)
        if records is None:
            return None
        for record in records:
            if record["split"] == split:
                collected.setdefault((record["task"], record["index"]), []).append(scale * float(record[name]))
    return {key: statistics.fmean(values) for key, values in collected.items()}


def seeds_of(table: ResultTable, row: str) -> list:
    return [seed for label, seed in table.runs if label == row]


def count_text(table: ResultTable, row: str, column: str) -> str:
    """How many items a cell holds: "150 x 3" (items per seed x seeds; "148-150 x 3" where seeds differ), "?" where
    a run has no items file, the missing mark where no run exists."""
    seeds = seeds_of(table, row)
    if not seeds or table.cell(row, column).mean is None:  # no run, or no value in this cell (another dataset's row)
        return MISSING
    tasks = table.columns if column == AVERAGE else [column]
    counts = []
    for seed in seeds:
        values = seed_values(table, row, seed)
        if values is None:
            return "?"
        counts.append(sum(1 for task, _ in values if task in tasks))
    span = str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    return f"{span} x {len(counts)}"


def counts_markdown(table: ResultTable) -> str | None:
    """The table's shape with item counts per cell; None when no run of the table has an items file."""
    if not table.per_item or metric_field(table.metric) is None or not any(
            run_items(path) is not None for paths in table.runs.values() for path in paths):
        return None
    columns = [*table.columns, AVERAGE]
    lines = ["| " + " | ".join(["Method", *columns]) + " |", "|" + "|".join([":---"] + ["---:"] * len(columns)) + "|"]
    lines += ["| " + " | ".join([row, *(count_text(table, row, column) for column in columns)]) + " |"
              for row in table.rows]
    return "\n".join(lines)
