"""Console tables (rich): rank maps and before/after accuracy and NLL."""

from __future__ import annotations

import re
from collections import defaultdict

from rich.console import Console
from rich.table import Table
from torch import nn

_DIGITS = re.compile(r"\.\d+\.")


def print_rank_table(rank_map: dict[str, int | None], model: nn.Module | None = None) -> None:
    """One row per kind of layer (q_proj, fc1, ...): how many, rank range, how many kept dense."""
    groups: dict[str, list[int | None]] = defaultdict(list)
    for name, rank in rank_map.items():
        groups[_DIGITS.sub(".*.", name)].append(rank)
    table = Table(title="rank allocation", show_lines=False)
    for column in ("layers", "count", "rank min", "rank mean", "rank max", "dense"):
        table.add_column(column, justify="right" if column != "layers" else "left")
    for pattern, ranks in sorted(groups.items()):
        factored = [r for r in ranks if r is not None]
        dense = len(ranks) - len(factored)
        if factored:
            row = (str(min(factored)), f"{sum(factored) / len(factored):.1f}", str(max(factored)))
        else:
            row = ("-", "-", "-")
        table.add_row(pattern, str(len(ranks)), *row, str(dense))
    Console().print(table)


def _console_column(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name.startswith("acc") or name == "nll"


def print_results_table(title: str, rows: list[tuple[str, dict[str, float]]], params: dict[str, str] | None = None):
    """Rows of (stage, metrics); columns: the accuracies (the split's overall accuracy first, then per task), then
    the overall NLL. Per-task NLLs stay in summary.json (sixteen columns do not fit a terminal)."""
    keys: list[str] = []
    for _, metrics in rows:
        keys += [k for k in metrics if k not in keys and _console_column(k)]
    keys.sort(key=lambda k: (k.endswith("/nll"), not k.endswith("/acc"), k))
    table = Table(title=title)
    table.add_column("stage")
    if params:
        table.add_column("params")
    for key in keys:
        table.add_column(key.split("/", 1)[-1], justify="right")
    for stage, metrics in rows:
        cells = [f"{metrics[k]:.2f}" if k in metrics else "-" for k in keys]
        table.add_row(stage, *([params.get(stage, "")] if params else []), *cells)
    Console().print(table)
