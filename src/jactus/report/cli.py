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
  acc_vs_params.png   the metric against retained parameters (%; named <metric>_vs_*.png after the metric's last
                      part: nll_vs_params.png for --metric val/nll), one panel per column (`--panels average`: the
                      average alone), one line per method; rows without a budget (dense methods) as dashed lines.
  acc_vs_bytes.png    the same against the deployed model's stored bytes (% of the dense model's), where runs record
                      them (summary.json's bytes_ratio).
  acc_vs_latency.png  with `--latency BENCH_JSON`: the same against the deployed format's measured latency (% of the
                      dense model's time; `--latency-measure`, default prefill_b8), from experiments/bench/
                      infer_real.py's side-by-side ratios (`jactus.report.latency` says which format a row deploys
                      as; rows with none are named in report.md).
  rank_heatmap.png    per-layer ranks of the runs that carry a `rank_map` (grey = kept dense); skipped with a note
                      in report.md when none does.
  gaps.csv            with `--gaps REF:OTHER[,OTHER...]` (repeatable; labels as in the table's rows, e.g.
                      "jactus@0.8", "lora", "jactus@0.8 (scope=targets)" for a budget over the target linears
                      only): per table a "Gaps" section in report.md, one row per OTHER, the mean over the seeds
                      both rows ran of REF minus OTHER per column and on the average ("+1.23", "-0.40"; "—" where
                      either is missing; the difference of the means marked "(unpaired)" where they share no
                      seed), "± s" where at least two seeds pair up: the sample std of the per-seed differences
                      (a seed fixes the data split, so pairing removes the split's share of the noise); gaps.csv
                      holds the same in long format. A label that is not a row of a table fails
                      with a message listing that table's rows. Where the runs wrote per-item results
                      (items.jsonl.gz next to summary.json; jactus.summary), each gap also gets "[low, high] (n=N x S)":
                      a paired bootstrap interval (`--level`, default 95%; `--resamples`, default 1000; seeded) over
                      items and seeds -- the same items of the same seed under both methods, items resampled within
                      each task, seeds resampled, the average's interval resampling the items of every task -- with
                      N paired items per seed and S seeds; gaps.csv adds ci_low, ci_high, ci_gap (the paired gap the
                      interval is about), ci_seeds, ci_items. Runs without per-item results (older runs) are listed
                      under the gaps and take no part; no interval is invented for them.
  curves.csv          with `--curves REF` (repeatable; REF a row without a budget, e.g. lora): per table a "Budget
                      curves" section in report.md: every method line (a row label without its "@budget") on the
                      average column at each budget it ran, its gap to REF with the paired bootstrap interval (as
                      --gaps), the budget from which each line meets REF (the interval reaches zero there and at every
                      larger budget run) and the best line at each budget with its gap to the runner-up (ranked on
                      the seeds every line at that budget ran; `jactus.report.curves`); curves.csv holds the same in
                      long format.
  items               for --metric <split>/acc or <split>/nll: under each table, the items each cell holds ("150 x
                      3": items per seed x seeds; "?" where a run has no items file), or a note that no run of the
                      table has per-item results.

`--before` tables the compressed models before fine-tuning instead (summary.json's `metrics_before`, from runs with
`evaluate_before=true`; a LoRA row is then the dense model): the compressed start on every budget; its values carry
no interval (the per-item files hold the fine-tuned model's results).

`--split-by KEY` (repeatable) splits each method's row by a run value, e.g. `--split-by lr --metric val/acc` for a
learning-rate search: rows "lora (lr=0.001)". KEY is a summary.json key (dotted for nested ones) or, where the
summary lacks it, a dotted path into the run's `.hydra/config.yaml` (e.g. `optim.lr`).

The average of a row is taken per seed over the row's columns, over the seeds that have every column.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..summary import ITEMS_FILE
from .curves import Curves, build_curves
from .gaps import (  # noqa: F401
    GapsError,
    GapTable,
    build_gaps,
    parse_gaps,
)
from .items import counts_markdown
from .latency import LatencyError, load_latency, row_latency
from .load import (  # noqa: F401
    AVERAGE,
    BYTES,
    FAILED,
    MISSING,
    RATIO,
    _as_paths,
    _status,
    load_summaries,
    results_frame,
    split_values,
)
from .plots import (  # noqa: F401
    PANELS,
    plot_acc_vs_params,
    plot_rank_heatmap,
)
from .tables import (  # noqa: F401
    ResultTable,
    build_tables,
    lower_is_better,
)


@dataclass
class Report:
    summaries: list[dict]
    frame: pd.DataFrame
    tables: list[ResultTable]
    files: dict[str, Path]
    gaps: list[GapTable] = field(default_factory=list)  # one per table when gaps were asked for
    repeated: list[str] = field(default_factory=list)  # `repeated_seeds` of the frame
    curves: list[Curves] = field(default_factory=list)  # per table and --curves reference it has


def repeated_seeds(frame: pd.DataFrame) -> list[str]:
    """"label, seed s: N runs (paths)" for every cell (row of a table, on one dataset) whose seed has more than one
    successful run; the same row and seed on two datasets (two columns) is not a repeat."""
    keys = [key for key in ("experiment", "model", "data") if key in frame.columns]
    ok = frame[(frame["status"] == "ok") & frame["seed"].notna()].drop_duplicates(["label", "seed", "path"])
    out = []
    for group, runs in ok.groupby([*keys, "label", "seed"], sort=False, dropna=False):
        if len(runs) > 1:
            label, seed = group[-2], group[-1]
            data = f" on {group[keys.index('data')]}" if "data" in keys else ""
            paths = ", ".join(str(Path(path).parent) for path in runs["path"])
            out.append(f"{label}{data}, seed {format(seed, 'g') if isinstance(seed, float) else seed}: {len(runs)} "
                       f"runs ({paths})")
    return out


def figure_names(metric: str) -> dict[str, str]:
    """The figures' file names for `metric`, by their key in `Report.files`: "<m>_vs_params.png" and so on, `<m>` the
    metric's last part (acc_vs_bytes.png for test/acc, nll_vs_bytes.png for val/nll)."""
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.rsplit("/", 1)[-1]) or "metric"
    return {f"acc_vs_{x}": f"{tail}_vs_{x}.png" for x in ("params", "bytes", "latency")}


def write_report(dirs, out, metric: str = "test/acc", digits: int = 2, gaps: list[str] = (),
                 split_by: list[str] = (), resamples: int = 1000, level: float = 0.95,
                 latency: str | Path | None = None, latency_measure: str | None = None,
                 curves: list[str] = (), panels: str = "all", before: bool = False) -> Report:
    """Read the summaries under `dirs` and write report.md, results.csv and the plots to `out`.

    `gaps`: "REF:OTHER[,OTHER...]" specs (see the module docstring); they also write gaps.csv. `split_by`: keys whose
    values split a method's row (e.g. ["lr"] for a learning-rate search), labels like "lora (lr=0.001)".
    `resamples`, `level`: the gaps' paired bootstrap (where the runs wrote per-item results). `latency`: a bench JSON
    of the deployed formats' speed (`report.latency`), which adds acc_vs_latency.png (`latency_measure`: which
    measure, default prefill_b8 where measured). `curves`: reference rows (e.g. ["lora"]) for the budget curves
    section and curves.csv (`report.curves`). `panels`: "all" (a panel per column and the average) or "average".
    `before`: the compressed models before fine-tuning (`metrics_before`; no per-item intervals).
    """
    specs = [parse_gaps(spec) for spec in gaps]
    measured = load_latency(latency, latency_measure) if latency is not None else None
    summaries, unreadable = load_summaries(dirs)
    if not summaries:
        raise FileNotFoundError(f"no summary.json under {', '.join(map(str, _as_paths(dirs)))}")
    for summary in summaries:
        summary["_split"] = split_values(summary, list(split_by))
    frame = results_frame(summaries, metric, before)
    if before and (frame.empty or frame["value"].notna().sum() == 0):
        raise FileNotFoundError(f"--before: no run under {', '.join(map(str, _as_paths(dirs)))} has {metric} before "
                                f"fine-tuning (summary.json's metrics_before, written with evaluate_before=true)")
    tables = build_tables(frame, digits, per_item=not before)
    gap_tables = [build_gaps(table, specs, resamples, level) for table in tables] if specs else []
    absent = [reference for reference in curves if not any(reference in table.rows for table in tables)]
    if absent:
        raise GapsError(f"--curves: {', '.join(map(repr, absent))} is a row of no table; the rows: "
                        f"{', '.join(dict.fromkeys(row for table in tables for row in table.rows))}")
    curve_sets = [[build_curves(table, reference, resamples, level) for reference in curves
                   if reference in table.rows] for table in tables]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    named = figure_names(metric)
    files = {"csv": out / "results.csv", "acc_vs_params": plot_acc_vs_params(tables, out / named["acc_vs_params"],
                                                                         metric, panels=panels)}
    if any(ratio is not None for table in tables for ratio in table.bytes_ratio.values()):
        files["acc_vs_bytes"] = plot_acc_vs_params(tables, out / named["acc_vs_bytes"], metric, x="bytes",
                                                    panels=panels)
    unmeasured: list[str] = []
    if measured is not None:
        measure, speed = measured
        rows = list(dict.fromkeys(row for table in tables for row in table.rows))
        by_row = {row: row_latency(row, speed) for row in rows}
        unmeasured = [row for row, value in by_row.items() if value is None]
        files["acc_vs_latency"] = plot_acc_vs_params(
            tables, out / named["acc_vs_latency"], metric, x="latency", latency=by_row,
            x_label=f"latency, {measure} (% of the dense model's time)", panels=panels)
    frame.to_csv(files["csv"], index=False)
    if gap_tables:
        files["gaps"] = out / "gaps.csv"
        records = [record for gap_table in gap_tables for record in gap_table.to_records()]
        pd.DataFrame.from_records(records).to_csv(files["gaps"], index=False)
    if curves:
        files["curves"] = out / "curves.csv"
        records = [record for sets in curve_sets for curve in sets for record in curve.to_records()]
        pd.DataFrame.from_records(records).to_csv(files["curves"], index=False)
    heatmap = plot_rank_heatmap(summaries, out / "rank_heatmap.png")
    if heatmap is not None:
        files["rank_heatmap"] = heatmap

    n_failed = sum(_status(s) != "ok" for s in summaries)
    lines = [f"# Sweep report: {metric}{' before fine-tuning' if before else ''}", "",
             f"{len(summaries)} runs ({n_failed} failed) from {', '.join(map(str, _as_paths(dirs)))}.",
             f"Cells: mean ± sample std over seeds (the mean alone for one seed; a seed run twice counts once, as the "
             f"mean of its runs); {MISSING} = no run; "
             f"{FAILED} = every run failed; best mean per column in bold "
             f"({'lowest' if lower_is_better(metric) else 'highest'}). {RATIO}: mean params_deployed / "
             f"params_original; {BYTES} (where runs record it): mean bytes_deployed / bytes_original, the stored "
             f"bytes. {AVERAGE}: per seed over the row's columns, over the seeds that have every column.", ""]
    for index, table in enumerate(tables):
        lines += [f"## {table.title}", "", table.to_markdown(), "", *_items_section(table)]
        if gap_tables:
            gap_table = gap_tables[index]
            lines += ["### Gaps", "", f"Mean over the seeds both rows ran of Ref minus Other (± sample std of the "
                      f"per-seed differences where two or more seeds pair; the difference of the means, marked "
                      f"unpaired, where they share no seed); {MISSING} where either is missing. [low, high] (n=N x S): "
                      f"{100 * level:g}% paired bootstrap interval ({resamples} resamples of items within each task "
                      f"and of seeds; the average resamples the items of every task) over N paired items per seed "
                      f"and S seeds, from the runs' per-item results; none where they are missing.", "",
                      gap_table.to_markdown(), ""]
            if gap_table.without_items:
                lines += [f"No per-item results ({ITEMS_FILE}) for: {', '.join(gap_table.without_items)}; these "
                          f"runs take no part in the intervals.", ""]
        for curve in curve_sets[index]:
            lines += [f"### Budget curves against {curve.reference} ({AVERAGE})", "",
                      f"Each method line's mean at each budget (gap to {curve.reference}, {100 * level:g}% paired "
                      f"bootstrap interval as in the gaps).", "", curve.to_markdown(), ""]
        if curves and not curve_sets[index]:
            lines += [f"No budget curves: no row {', '.join(map(repr, curves))} in this table.", ""]
    shown = metric.rsplit("/", 1)[-1]
    lines += ["## Plots", "", f"![{shown} vs retained parameters]({named['acc_vs_params']})", ""]
    if "acc_vs_bytes" in files:
        lines += [f"![{shown} vs deployed bytes]({named['acc_vs_bytes']})", ""]
    if "acc_vs_latency" in files:
        lines += [f"![{shown} vs measured latency]({named['acc_vs_latency']})", "",
                  f"Latency: `{measured[0]}` from {latency}, the dense model's time over each deployed format's, "
                  f"measured side by side (adapters deploy merged, as the dense model; other low-rank rows as "
                  f"JACTUS's factors at their budget)."
                  + (f" No measured format for: {', '.join(unmeasured)}." if unmeasured else ""), ""]
    if heatmap is not None:
        lines += ["![rank allocation per layer](rank_heatmap.png)", ""]
    else:
        lines += ["No run carries a `rank_map`: rank heatmap skipped.", ""]
    repeated = repeated_seeds(frame)
    if repeated:
        lines += ["## Seeds run more than once", "", "Each counts once, as the mean of its runs; if the runs differ in "
                  "more than chance, split the row (`--split-by KEY`):", "", *[f"- {item}" for item in repeated], ""]
    if unreadable:
        lines += ["## Unreadable summaries", "", *[f"- {item}" for item in unreadable], ""]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(lines))
    return Report(summaries, frame, tables, files, gap_tables, repeated,
                  [curve for sets in curve_sets for curve in sets])


def _items_section(table: ResultTable) -> list[str]:
    if not table.per_item:
        return ["Items per cell: as after fine-tuning (the same questions); the per-item results are the fine-tuned "
                "model's, so these values carry no interval.", ""]
    counts = counts_markdown(table)
    if counts is None:
        return [f"Items per cell: unknown (no run of this table wrote per-item results, {ITEMS_FILE}).", ""]
    return ["Items per cell (items per seed x seeds; ? where a run has no per-item results):", "", counts, ""]


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
        for key in ("acc_vs_params", "acc_vs_bytes", "acc_vs_latency", "rank_heatmap"):
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
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the gaps' intervals")
    parser.add_argument("--level", type=float, default=0.95, help="coverage of the gaps' bootstrap intervals")
    parser.add_argument("--split-by", action="append", default=[], metavar="KEY",
                        help="split rows by this run value (summary.json key or .hydra/config.yaml dotted path, e.g. "
                             "lr or optim.lr); repeatable")
    parser.add_argument("--latency", default=None, metavar="BENCH_JSON",
                        help="the deployed formats' measured speed (experiments/bench/infer_real.py's JSON): adds "
                             "acc_vs_latency.png")
    parser.add_argument("--latency-measure", default=None,
                        help="which measure of --latency (prefill_b1, prefill_b8, decode_b1, images_b8; default "
                             "prefill_b8 where measured)")
    parser.add_argument("--curves", action="append", default=[], metavar="REF",
                        help="budget curves of every compressing method against the row REF (e.g. lora): where "
                             "each meets it, the best at each budget, curves.csv; repeatable")
    parser.add_argument("--panels", choices=PANELS, default="all",
                        help="the figures' panels: one per column and the average (all), or the average alone")
    parser.add_argument("--before", action="store_true",
                        help="the compressed models before fine-tuning (summary.json's metrics_before, from runs "
                             "with evaluate_before=true); no per-item intervals")
    parser.add_argument("--wandb", action="store_true", help="log the table and plots to W&B (WANDB_MODE honoured)")
    parser.add_argument("--wandb-project", default="jactus")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dirs, args.out or args.sweep_dirs[0], args.metric, args.digits, args.gaps,
                              args.split_by, args.resamples, args.level, args.latency, args.latency_measure,
                              args.curves, args.panels, args.before)
    except (FileNotFoundError, GapsError, LatencyError) as err:
        print(f"jactus-report: {err}", file=sys.stderr)
        return 1
    for index, table in enumerate(report.tables):
        print(f"\n{table.title}\n{table.to_markdown()}")
        print("\n".join(_items_section(table)))
        if report.gaps:
            print(f"\nGaps\n{report.gaps[index].to_markdown()}")
            if report.gaps[index].without_items:
                print(f"no per-item results for: {', '.join(report.gaps[index].without_items)}")
    for curve in report.curves:
        print(f"\nBudget curves against {curve.reference} ({curve.table.title})\n{curve.to_markdown()}")
    if report.repeated:
        print("\nseeds run more than once (each counts once, as the mean of its runs):\n" + "\n".join(report.repeated))
    print("\nwrote " + ", ".join(str(path) for path in report.files.values()))
    if args.wandb or wants_wandb(report.summaries):
        log_to_wandb(report, project=args.wandb_project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
