"""Figures: accuracy against retained parameters, deployed bytes or measured latency, and the per-layer rank heatmap."""

from __future__ import annotations

import math
from pathlib import Path

from .curves import BUDGET
from .load import (  # noqa: F401
    AVERAGE,
    row_label,
)
from .tables import (  # noqa: F401
    ResultTable,
    _row_key,
    _seed_key,
)


def _figure(width: float, height: float):
    """A pyplot-free Figure: rendered by Agg on save, whatever backend (inline, GUI) the session uses."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


X_AXES = {"params": "retained parameters (%)", "bytes": "deployed bytes (% of the dense model's)",
          "latency": "latency (% of the dense model's time)"}


PANELS = ("all", "average")  # every column and the average, or the average alone


def plot_acc_vs_params(tables: list[ResultTable], path, metric: str = "test/acc", x: str = "params",
                       latency: dict[str, float] | None = None, x_label: str | None = None,
                       panels: str = "all") -> Path:
    """One panel per (table, column incl. the average): accuracy against retained parameters (`x="params"`), the
    deployed model's stored bytes (`x="bytes"`: rows whose runs record them) or its measured latency (`x="latency"`:
    `latency`, row label -> % of the dense model's time), a line per method; rows without a budget (dense methods)
    as dashed reference lines with their std band. `panels="average"`: the average column alone (one panel per
    table)."""
    if panels not in PANELS:
        raise ValueError(f"panels={panels!r}: expected one of {list(PANELS)}")
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: expected one of {list(X_AXES)}")
    if x == "latency" and latency is None:
        raise ValueError("x='latency' needs latency= (row label -> % of the dense model's time)")
    import matplotlib

    panels = [(table, column) for table in tables
              for column in ([*table.columns, AVERAGE] if panels == "all" else [AVERAGE])]
    lines = list(dict.fromkeys(BUDGET.sub("", row) for table in tables for row in table.rows))
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
        references: list[tuple[str, float, float]] = []
        for row in table.rows:
            cell = table.cell(row, column)
            if cell.mean is not None and BUDGET.search(row) is None:
                # a dense method (LoRA, DoRA, full fine-tuning): one model, not a curve; a reference line across
                # the panel, its band the std over seeds
                references.append((row, cell.mean, cell.std or 0.0))
                continue
            if x == "latency":
                position = latency.get(row)
            else:
                ratio = (table.ratio if x == "params" else table.bytes_ratio).get(row)
                position = None if ratio is None else 100 * ratio
            if cell.mean is None or position is None:
                continue
            line = BUDGET.sub("", row)  # one line per method (and --split-by values) across budgets
            series.setdefault(line, []).append((position, cell.mean, cell.std or 0.0))
        for method, points in series.items():
            points.sort()
            xs, ys, errs = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=errs, capsize=2, label=method, **style(method))
        for row, mean, std in references:
            color = style(row)["color"]
            ax.axhline(mean, color=color, linestyle="--", linewidth=1, label=row)
            if std:
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.12, linewidth=0)
        ax.set_title(column if len(tables) == 1 else f"{column} · {table.title}", fontsize=9)
        ax.set_xlabel(x_label or X_AXES[x], fontsize=8)
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
