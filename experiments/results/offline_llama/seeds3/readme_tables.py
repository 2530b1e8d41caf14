"""The README's two tables from the reports' CSVs (report/ for accuracy, report_nll/ for NLL):
    python experiments/results/offline_llama/seeds3/readme_tables.py experiments/results/offline_llama/seeds3
The results table: per row, the seeds, params, stored bytes (where the runs recorded them), per-task accuracy and its average (mean ± sample std over seeds of
the per-seed average over the eight tasks) and the NLL average. The gaps table: every --gaps pair on the average."""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"]
ORDER = ["zero_shot", "lora", "dora", "compress_then_adapt@0.8", "tunecomp@0.8", "taco@0.8", "taco@0.8 (bytes)",
         "jactus@0.8", "jactus+shared@0.8", "jactus+pool@0.8",
         "jactus+kd@0.8", "compress_then_adapt@0.8 (scope=targets)", "jactus@0.8 (scope=targets)"]


def fmt(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) < 2 else f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def per_seed(path: Path) -> tuple[dict, dict, dict]:
    """label -> column -> seed -> value, label -> params_ratio, and label -> bytes_ratio (runs that recorded it)."""
    values: dict = defaultdict(lambda: defaultdict(dict))
    params, stored = {}, {}
    for row in csv.DictReader(path.open()):
        values[row["label"]][row["column"]][int(row["seed"])] = float(row["value"])
        params[row["label"]] = float(row["params_ratio"])
        if row.get("bytes_ratio"):
            stored[row["label"]] = float(row["bytes_ratio"])
    return values, params, stored


def averages(columns: dict) -> list[float]:
    seeds = set.intersection(*(set(columns[t]) for t in TASKS))
    return [statistics.fmean(columns[t][s] for t in TASKS) for s in sorted(seeds)]


def main(folder: Path) -> None:
    acc, params, stored = per_seed(folder / "report" / "results.csv")
    nll, _, _ = per_seed(folder / "report_nll" / "results.csv")
    print("| Method | seeds | Params (%) | Bytes (%) | " + " | ".join(TASKS) + " | Avg. | NLL |")
    print("|:---|---:|---:|---:|" + "---:|" * (len(TASKS) + 2))
    for label in [lab for lab in ORDER if lab in acc] + sorted(set(acc) - set(ORDER)):
        columns = acc[label]
        seeds = len(averages(columns))
        cells = [fmt(list(columns[t].values())) for t in TASKS]
        size = f"{100 * stored[label]:.1f}" if label in stored else "—"  # runs before bytes_deployed existed: —
        print(f"| {label} | {seeds} | {100 * params[label]:.1f} | {size} | " + " | ".join(cells)
              + f" | {fmt(averages(columns))} | {statistics.fmean(averages(nll[label])):.2f} |")
    print()
    gaps = {m: {(r["ref"], r["other"]): r for r in csv.DictReader((folder / d / "gaps.csv").open())
                if r["column"] == "Avg."} for m, d in (("acc", "report"), ("nll", "report_nll"))}
    print("| Ref minus Other | accuracy (points) | NLL (nats a token; lower is better) | seeds |")
    print("|:---|---:|---:|---:|")
    for key, row in gaps["acc"].items():
        cells = []
        for metric in ("acc", "nll"):
            r = gaps[metric][key]
            spread = f" ± {float(r['paired_std']):.2f}" if r["paired_std"] not in ("", "nan") else ""
            cells.append(f"{float(r['gap']):+.2f}{spread} [{float(r['ci_low']):+.2f}, {float(r['ci_high']):+.2f}]")
        print(f"| {key[0]} - {key[1]} | {cells[0]} | {cells[1]} | {row['paired_seeds']} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
