"""jactus-report: turn the `summary.json` files of a sweep into the paper's table, a long CSV and plots.

    jactus-report logs/multiruns/2026-11-02 [more dirs...] --out reports/vit8 --metric test/acc [--wandb]
    jactus-report logs/multiruns/2026-11-02 --gaps jactus@0.8:lora,dora,compress_then_adapt@0.8 [--gaps REF:...]

Writes to `--out` (default: the first sweep dir):
  report.md           one table per (experiment, model): rows = methods ("jactus@0.8"), a retained-parameter
                      column, one column per dataset (or per task where runs carry `<metric>_<task>`), the average;
                      cells "mean ± std" over seeds (sample std; the mean alone for one seed; a seed run more than
                      once counts once, as the mean of its runs), "—" where no run
                      exists, "failed" where every run failed; the best mean of each column in bold.
  results.csv         long format: one row per (run, column), failed runs included with an empty value.
  acc_vs_params.png   accuracy against retained parameters (%), one panel per column, one line per method.
  rank_heatmap.png    per-layer ranks of the runs that carry a `rank_map` (grey = kept dense); skipped with a note
                      in report.md when none does.
  gaps.csv            with `--gaps REF:OTHER[,OTHER...]` (repeatable; labels as in the table's rows, e.g.
                      "jactus@0.8", "lora"): per table a "Gaps" section in report.md, one row per OTHER, the mean of
                      REF minus the mean of OTHER per column and on the average ("+1.23", "-0.40"; "—" where either
                      is missing), "± s" where at least two seeds pair up: the sample std of the per-seed differences
                      (a seed fixes the data split, so pairing removes the split's share of the noise); gaps.csv
                      holds the same in long format. A label that is not a row of a table fails
                      with a message listing that table's rows.

`--split-by KEY` (repeatable) splits each method's row by a run value, e.g. `--split-by lr --metric val/acc` for a
learning-rate search: rows "lora (lr=0.001)". KEY is a summary.json key (dotted for nested ones) or, where the
summary lacks it, a dotted path into the run's `.hydra/config.yaml` (e.g. `optim.lr`).

The average of a row is taken per seed over the row's columns, over the seeds that have every column.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

MISSING, FAILED = "—", "failed"
AVERAGE = "Avg."
RATIO = "Params (%)"
# The paper's column order; columns not listed follow in the order they first appear.
COLUMN_ORDER = ("oxford_pets", "stanford_cars", "cifar10", "dtd", "eurosat", "fgvc_aircraft", "resisc45", "cifar100",
                "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
# Full-size methods first, compressing ones after; within a budget, JACTUS last (as in the paper).
METHOD_ORDER = ("zero_shot", "linear_probe", "full_ft", "lora", "dora", "pissa", "compress_then_adapt", "tunecomp",
                "cersa", "jactus")


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_summaries(dirs) -> tuple[list[dict], list[str]]:
    """Every `summary.json` under `dirs` (recursively), each with its path under "_path"; and the unreadable ones."""
    summaries, unreadable = [], []
    for directory in _as_paths(dirs):
        if not directory.is_dir():
            raise FileNotFoundError(f"sweep dir {directory} does not exist")
        for path in sorted(directory.rglob("summary.json")):
            try:
                summary = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                unreadable.append(f"{path} ({err})")
                continue
            missing = [key for key in ("method", "model", "data") if key not in summary]
            if missing:
                unreadable.append(f"{path} (no {', '.join(missing)})")
                continue
            summary["_path"] = str(path)
            summaries.append(summary)
    return summaries, unreadable


def _as_paths(dirs) -> list[Path]:
    return [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]


def row_label(summary: dict) -> str:
    """The table row of a run: its method, with "@budget" for methods that compress to a budget.

    Three significant digits: a budget asked for reads as given (0.8), a measured ratio (CERSA at a fixed spectral
    energy reports the ratio it gave) does not spell out every digit."""
    budget = summary.get("budget")
    label = summary["method"] if budget is None else f"{summary['method']}@{budget:.3g}"
    return label + summary.get("_split", "")


def split_values(summary: dict, keys: list[str]) -> str:
    """" (lr=0.001, ...)": the value of each `--split-by` key for this run, looked up as a dotted path in the summary,
    then in the run's `.hydra/config.yaml` ("?" where neither has it)."""
    if not keys:
        return ""
    config = None
    values = []
    for key in keys:
        value = _dotted(summary, key)
        if value is None:
            if config is None:
                path = Path(summary["_path"]).parent / ".hydra" / "config.yaml"
                config = _read_yaml(path) if path.is_file() else {}
            value = _dotted(config, key)
        values.append(f"{key}={'?' if value is None else format(value, 'g') if isinstance(value, float) else value}")
    return f" ({', '.join(values)})"


def _dotted(data, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _status(summary: dict) -> str:
    return summary.get("status") or "ok"


def results_frame(summaries: list[dict], metric: str = "test/acc") -> pd.DataFrame:
    """Long format: one row per (run, column). Runs with `<metric>_<task>` metrics give one row per task.

    A failed run counts against every column its dataset has in the successful runs of the same model
    (just the dataset name when no run of it succeeded). `value` is NaN for failed runs and where `metric` is absent.
    """
    task_prefix = f"{metric}_"
    columns_of: dict[tuple, list[str]] = {}  # (model, data) -> columns seen in successful runs
    for summary in summaries:
        if _status(summary) == "ok":
            tasks = [key[len(task_prefix):] for key in summary.get("metrics") or {} if key.startswith(task_prefix)]
            known = columns_of.setdefault((summary["model"], summary["data"]), [])
            known += [column for column in (tasks or [summary["data"]]) if column not in known]

    records = []
    for summary in summaries:
        status, metrics = _status(summary), summary.get("metrics") or {}
        base = {
            "experiment": summary.get("experiment") or "", "model": summary["model"], "method": summary["method"],
            "budget": summary.get("budget"), "label": row_label(summary), "data": summary["data"],
            "seed": summary.get("seed"), "status": status, "metric": metric,
            **{key: summary.get(key) for key in ("params_ratio", "params_original", "params_deployed",
                                                 "params_trainable", "wall_s", "git_sha")},
            "path": summary["_path"],
        }
        tasks = {key[len(task_prefix):]: value for key, value in metrics.items() if key.startswith(task_prefix)}
        if status != "ok":
            cells = {column: math.nan for column in columns_of.get((summary["model"], summary["data"]),
                                                                    [summary["data"]])}
        elif tasks:
            cells = tasks
        else:
            cells = {summary["data"]: metrics.get(metric, math.nan)}
        records += [{**base, "column": column, "value": _number(value)} for column, value in cells.items()]
    return pd.DataFrame.from_records(records)


def _number(value) -> float:
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------------------------------------------
# The table


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

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.get((row, column), Cell())

    def text(self, row: str, column: str) -> str:
        if column == RATIO:
            ratio = self.ratio.get(row)
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
        return [RATIO, *self.columns, AVERAGE]

    def to_frame(self, bold: bool = False) -> pd.DataFrame:
        """Display strings: index = rows, columns = ratio, datasets/tasks, average."""
        data = {}
        for column in self.all_columns:
            best = self.best(column) if bold and column != RATIO else set()
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


def build_table(frame: pd.DataFrame, title: str = "", digits: int = 2) -> ResultTable:
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
    ratio = {}
    for label in rows:
        runs = frame[(frame["label"] == label) & (frame["status"] == "ok")].drop_duplicates("path")
        ratios = runs["params_ratio"].dropna()
        ratio[label] = float(ratios.mean()) if len(ratios) else None
    metrics = frame["metric"].dropna().unique()
    return ResultTable(title, rows, columns, cells, ratio, digits,
                       lower_is_better=len(metrics) > 0 and lower_is_better(str(metrics[0])))


def build_tables(frame: pd.DataFrame, digits: int = 2) -> list[ResultTable]:
    """One table per (experiment, model), in the order they first appear."""
    tables = []
    sections = list(dict.fromkeys(zip(frame["experiment"], frame["model"], strict=True)))
    for experiment, model in sections:
        part = frame[(frame["experiment"] == experiment) & (frame["model"] == model)]
        title = f"{model} ({experiment})" if experiment else model
        tables.append(build_table(part, title, digits))
    return tables


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


def _figure(width: float, height: float):
    """A pyplot-free Figure: rendered by Agg on save, whatever backend (inline, GUI) the session uses."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_acc_vs_params(tables: list[ResultTable], path, metric: str = "test/acc") -> Path:
    """One panel per (table, column incl. the average): accuracy against retained parameters, a line per method."""
    import matplotlib

    panels = [(table, column) for table in tables for column in [*table.columns, AVERAGE]]
    lines = list(dict.fromkeys(re.sub(r"@[0-9.eE+-]+", "", row) for table in tables for row in table.rows))
    colors = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"].colors
    markers = "osD^vP*X"

    def style(line: str) -> dict:
        """The same colour and marker for a line in every panel; distinct for up to 20 x 8 lines."""
        index = lines.index(line)
        return {"color": colors[index % len(colors)], "marker": markers[(index // len(colors)) % len(markers)]}

    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(3.6 * ncols, 3.0 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (table, column) in zip(axes.flat, panels, strict=False):
        series: dict[str, list[tuple[float, float, float]]] = {}
        for row in table.rows:
            cell, ratio = table.cell(row, column), table.ratio.get(row)
            if cell.mean is None or ratio is None:
                continue
            line = re.sub(r"@[0-9.eE+-]+", "", row)  # one line per method (and --split-by values) across budgets
            series.setdefault(line, []).append((100 * ratio, cell.mean, cell.std or 0.0))
        for method, points in series.items():
            points.sort()
            xs, ys, errs = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=errs, capsize=2, label=method, **style(method))
        ax.set_title(column if len(tables) == 1 else f"{column} · {table.title}", fontsize=9)
        ax.set_xlabel("retained parameters (%)", fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = {}, []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    legend_rows = 0
    if handles:
        ncol = min(4, len(labels))
        legend_rows = math.ceil(len(labels) / ncol)
        # The figure grows by the legend's height, so many lines (a learning-rate search) never cover the panels.
        fig.set_size_inches(fig.get_figwidth(), fig.get_figheight() + 0.22 * legend_rows + 0.2)
        fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=ncol, fontsize=8,
                   bbox_to_anchor=(0.5, 0.0), frameon=False)
    bottom = (0.22 * legend_rows + 0.25) / fig.get_figheight() if legend_rows else 0
    fig.tight_layout(rect=(0, bottom, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a legend wider than the panels is kept whole
    return path


def plot_rank_heatmap(summaries: list[dict], path) -> Path | None:
    """Rows = runs with a `rank_map` in table order, columns = layers (first-seen order); grey = kept dense. None when no run has one."""
    runs = [s for s in summaries if s.get("rank_map")]
    if not runs:
        return None
    # the table's row order, then data and seed (not the order the files were found in)
    runs.sort(key=lambda s: (_row_key(s["method"], s.get("budget"), row_label(s)), str(s["data"]),
                             *_seed_key(s.get("seed"))))
    import matplotlib
    import numpy as np

    layers = list(dict.fromkeys(name for s in runs for name in s["rank_map"]))
    grid = np.full((len(runs), len(layers)), np.nan)
    for i, summary in enumerate(runs):
        for j, layer in enumerate(layers):
            rank = summary["rank_map"].get(layer, None)
            if rank is not None:
                grid[i, j] = rank
    labels = [f"{row_label(s)} · {s['data']} · s{s.get('seed')}" for s in runs]
    names_height = 0.06 * max(len(name) for name in layers)  # the layer names stand vertically under the grid
    fig = _figure(min(24, max(6.0, 2.5 + 0.18 * len(layers))), 1.2 + 0.3 * len(runs) + names_height)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(runs)), labels, fontsize=7)
    step = max(1, len(layers) // 40)  # at most ~40 layer names on the axis
    ax.set_xticks(range(0, len(layers), step), layers[::step], rotation=90, fontsize=6)
    ax.set_title("rank per layer (grey = dense)", fontsize=9)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class Report:
    summaries: list[dict]
    frame: pd.DataFrame
    tables: list[ResultTable]
    files: dict[str, Path]
    gaps: list[GapTable] = field(default_factory=list)  # one per table when gaps were asked for


def write_report(dirs, out, metric: str = "test/acc", digits: int = 2, gaps: list[str] = (),
                 split_by: list[str] = ()) -> Report:
    """Read the summaries under `dirs` and write report.md, results.csv and the plots to `out`.

    `gaps`: "REF:OTHER[,OTHER...]" specs (see the module docstring); they also write gaps.csv. `split_by`: keys whose
    values split a method's row (e.g. ["lr"] for a learning-rate search), labels like "lora (lr=0.001)".
    """
    specs = [parse_gaps(spec) for spec in gaps]
    summaries, unreadable = load_summaries(dirs)
    if not summaries:
        raise FileNotFoundError(f"no summary.json under {', '.join(map(str, _as_paths(dirs)))}")
    for summary in summaries:
        summary["_split"] = split_values(summary, list(split_by))
    frame = results_frame(summaries, metric)
    tables = build_tables(frame, digits)
    gap_tables = [build_gaps(table, specs) for table in tables] if specs else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "results.csv", "acc_vs_params": plot_acc_vs_params(tables, out / "acc_vs_params.png", metric)}
    frame.to_csv(files["csv"], index=False)
    if gap_tables:
        files["gaps"] = out / "gaps.csv"
        records = [record for gap_table in gap_tables for record in gap_table.to_records()]
        pd.DataFrame.from_records(records).to_csv(files["gaps"], index=False)
    heatmap = plot_rank_heatmap(summaries, out / "rank_heatmap.png")
    if heatmap is not None:
        files["rank_heatmap"] = heatmap

    n_failed = sum(_status(s) != "ok" for s in summaries)
    lines = [f"# Sweep report: {metric}", "",
             f"{len(summaries)} runs ({n_failed} failed) from {', '.join(map(str, _as_paths(dirs)))}.",
             f"Cells: mean ± sample std over seeds (the mean alone for one seed; a seed run twice counts once, as the "
             f"mean of its runs); {MISSING} = no run; "
             f"{FAILED} = every run failed; best mean per column in bold "
             f"({'lowest' if lower_is_better(metric) else 'highest'}). {RATIO}: mean params_deployed / "
             f"params_original. {AVERAGE}: per seed over the row's columns, over the seeds that have every column.", ""]
    for index, table in enumerate(tables):
        lines += [f"## {table.title}", "", table.to_markdown(), ""]
        if gap_tables:
            lines += ["### Gaps", "", f"Mean of Ref minus mean of Other (± sample std of the per-seed differences "
                      f"where two or more seeds pair); {MISSING} where either is missing.", "",
                      gap_tables[index].to_markdown(), ""]
    lines += ["## Plots", "", "![accuracy vs retained parameters](acc_vs_params.png)", ""]
    if heatmap is not None:
        lines += ["![rank allocation per layer](rank_heatmap.png)", ""]
    else:
        lines += ["No run carries a `rank_map`: rank heatmap skipped.", ""]
    if unreadable:
        lines += ["## Unreadable summaries", "", *[f"- {item}" for item in unreadable], ""]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(lines))
    return Report(summaries, frame, tables, files, gap_tables)


def wants_wandb(summaries: list[dict]) -> bool:
    """True when a run logged to W&B: its run dir (the summary's folder) holds a `wandb/` folder."""
    return any((Path(s["_path"]).parent / "wandb").is_dir() for s in summaries)


def log_to_wandb(report: Report, project: str = "jactus", name: str | None = None) -> None:
    """Log the tables and plots as one W&B run (job_type=report); WANDB_MODE (offline, disabled) is honoured."""
    import wandb

    out_dir = report.files["report"].parent
    run = wandb.init(project=project, name=name, job_type="report", dir=str(out_dir),
                     mode=os.environ.get("WANDB_MODE", "offline"))
    try:
        payload = {}
        for index, table in enumerate(report.tables):
            frame = table.to_frame().reset_index()
            payload[f"report/table_{index}"] = wandb.Table(dataframe=frame)
        for index, gaps in enumerate(report.gaps):
            payload[f"report/gaps_{index}"] = wandb.Table(dataframe=pd.DataFrame.from_records(gaps.to_records()))
        payload["report/results"] = wandb.Table(dataframe=report.frame.astype(str))
        for key in ("acc_vs_params", "rank_heatmap"):
            if key in report.files:
                payload[f"report/{key}"] = wandb.Image(str(report.files[key]))
        run.log(payload)
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jactus-report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="folders searched for summary.json")
    parser.add_argument("--out", default=None, help="output folder (default: the first SWEEP_DIR)")
    parser.add_argument("--metric", default="test/acc", help="metric key in summary['metrics'] (default test/acc)")
    parser.add_argument("--digits", type=int, default=2, help="decimals in the table")
    parser.add_argument("--gaps", action="append", default=[], metavar="REF:OTHER[,OTHER...]",
                        help="per table, REF's mean minus each OTHER's per column (row labels, e.g. "
                             "jactus@0.8:lora,dora); repeatable")
    parser.add_argument("--split-by", action="append", default=[], metavar="KEY",
                        help="split rows by this run value (summary.json key or .hydra/config.yaml dotted path, e.g. "
                             "lr or optim.lr); repeatable")
    parser.add_argument("--wandb", action="store_true", help="log the table and plots to W&B (WANDB_MODE honoured)")
    parser.add_argument("--wandb-project", default="jactus")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dirs, args.out or args.sweep_dirs[0], args.metric, args.digits, args.gaps,
                              args.split_by)
    except (FileNotFoundError, GapsError) as err:
        print(f"jactus-report: {err}", file=sys.stderr)
        return 1
    for index, table in enumerate(report.tables):
        print(f"\n{table.title}\n{table.to_markdown()}")
        if report.gaps:
            print(f"\nGaps\n{report.gaps[index].to_markdown()}")
    print("\nwrote " + ", ".join(str(path) for path in report.files.values()))
    if args.wandb or wants_wandb(report.summaries):
        log_to_wandb(report, project=args.wandb_project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
