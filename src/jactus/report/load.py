"""Reading a sweep: summary.json files (and their .hydra configs) into rows, labels and a long DataFrame."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

MISSING, FAILED = "—", "failed"
AVERAGE = "Avg."
RATIO = "Params (%)"
BYTES = "Bytes (%)"  # mean bytes_ratio: the deployed model's stored bytes over the dense model's
# The paper's column order; columns not listed follow in the order they first appear.
COLUMN_ORDER = ("oxford_pets", "stanford_cars", "cifar10", "dtd", "eurosat", "fgvc_aircraft", "resisc45", "cifar100",
                "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
# Full-size methods first, compressing ones after; within a budget, JACTUS last (as in the paper).
METHOD_ORDER = ("zero_shot", "linear_probe", "full_ft", "lora", "dora", "pissa", "compress_then_adapt", "tunecomp",
                "cersa", "jactus", "jactus_palette")


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
            compresses = summary.get("budget") is not None or summary.get("palette")
            if compresses and summary.get("budget_scope") is None:
                summary["budget_scope"] = _scope_from_config(summary)  # runs written before summaries carried it
            summaries += palette_rows(summary)
    return summaries, unreadable


MEMBER_MARK = "#budget="  # "<summary path>#budget=<b>": a palette member's row (report.items reads its items)


def palette_rows(summary: dict) -> list[dict]:
    """A palette run (jactus_palette: one fine-tuning run, one compact model per budget) as one row per member, each
    with the member's budget, size and metrics, so that tables and the accuracy-vs-parameters plot show the palette
    as one line across budgets beside independent runs; any other summary as itself."""
    members = summary.get("palette")
    if not members:
        return [summary]
    rank_maps = {plan.get("budget"): plan.get("rank_map") for plan in summary.get("palette_plans") or []}
    rows = []
    for member in members:
        row = {key: value for key, value in summary.items() if key != "palette"}
        row.update(budget=member["budget"], metrics=member.get("metrics") or {},
                   params_deployed=member.get("params_deployed"), params_ratio=member.get("params_ratio"),
                   bytes_deployed=member.get("bytes_deployed"), bytes_ratio=member.get("bytes_ratio"),
                   rank_map=rank_maps.get(member["budget"]))
        if "_path" in summary:  # one run, one row per member: the member's items are the ones tagged with its budget
            row["_path"] = f"{summary['_path']}{MEMBER_MARK}{member['budget']}"
        rows.append(row)
    return rows


def _as_paths(dirs) -> list[Path]:
    return [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]


def row_label(summary: dict) -> str:
    """The table row of a run: its method, with "@budget" for methods that compress to a budget, and " (scope=
    targets)" where that budget counts only the target linears (`budget.scope`; the default, model, is unmarked), and
    " (bytes)" where it counts stored bytes (`budget.unit`; the default, params, is unmarked): the same budget over
    another scope or unit is another model, never a re-run of the same seed.

    Three significant digits: a budget asked for reads as given (0.8), a measured ratio (CERSA at a fixed spectral
    energy reports the ratio it gave) does not spell out every digit."""
    budget = summary.get("budget")
    label = summary["method"] if budget is None else f"{summary['method']}@{budget:.3g}"
    if budget is not None and summary.get("budget_scope") not in (None, "model"):
        label += f" (scope={summary['budget_scope']})"
    if budget is not None and summary.get("budget_unit") not in (None, "params"):
        label += f" ({summary['budget_unit']})"  # a budget in bytes: another model than the same ratio in parameters
    return label + summary.get("_split", "")


def _scope_from_config(summary: dict) -> str | None:
    """`budget.scope` of the run's .hydra config (None where it has none)."""
    scope = _dotted(_run_config(summary), "budget.scope")
    return scope if isinstance(scope, str) else None


def _run_config(summary: dict) -> dict:
    """The run's `.hydra/config.yaml` next to its summary.json ({} where there is none)."""
    path = Path(summary["_path"]).parent / ".hydra" / "config.yaml"
    return _read_yaml(path) if path.is_file() else {}


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
                config = _run_config(summary)
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


def run_metrics(summary: dict, before: bool = False) -> dict:
    """The run's metrics: after fine-tuning (`metrics`), or, with `before`, the compressed model's before it
    (`metrics_before.method`, written by runs with `evaluate_before=true`; {} where the run has none)."""
    if before:
        return (summary.get("metrics_before") or {}).get("method") or {}
    return summary.get("metrics") or {}


def results_frame(summaries: list[dict], metric: str = "test/acc", before: bool = False) -> pd.DataFrame:
    """Long format: one row per (run, column). Runs with `<metric>_<task>` metrics give one row per task. `before`:
    the metrics of the model before fine-tuning (`run_metrics`).

    A failed run counts against every column its dataset has in the successful runs of the same model
    (just the dataset name when no run of it succeeded). `value` is NaN for failed runs and where `metric` is absent.
    """
    if before:  # a run that did not score its compressed model before fine-tuning has no row here
        summaries = [summary for summary in summaries if _status(summary) != "ok" or run_metrics(summary, True)]
    task_prefix = f"{metric}_"
    columns_of: dict[tuple, list[str]] = {}  # (model, data) -> columns seen in successful runs
    for summary in summaries:
        if _status(summary) == "ok":
            tasks = [key[len(task_prefix):] for key in run_metrics(summary, before) if key.startswith(task_prefix)]
            known = columns_of.setdefault((summary["model"], summary["data"]), [])
            known += [column for column in (tasks or [summary["data"]]) if column not in known]

    records = []
    for summary in summaries:
        status, metrics = _status(summary), run_metrics(summary, before)
        base = {
            "experiment": summary.get("experiment") or "", "model": summary["model"], "method": summary["method"],
            "budget": summary.get("budget"), "label": row_label(summary), "data": summary["data"],
            "seed": summary.get("seed"), "status": status, "metric": metric,
            **{key: summary.get(key) for key in ("params_ratio", "params_original", "params_deployed", "bytes_ratio",
                                                 "bytes_deployed",
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
