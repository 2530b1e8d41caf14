"""summary.json: the one record of a run that reports, sweeps and checks read.

Keys (always present): method, model, data, budget (null for full-size methods), seed, params_original,
params_deployed, params_trainable, params_ratio (= deployed / original), bytes_deployed (the deployed model's bytes
as `save_compact` stores them: `jactus.core.stored_bytes`; null in a failed run), metrics ({"test/acc": ..., "test/nll": ...
(mean negative log-likelihood of the gold label / answer), and "test/acc_<task>", "test/nll_<task>" where several
tasks; "val/..." the same on the validation split}), wall_s, git_sha, status ("ok" | "failed").
Optional: bytes_original (the dense model's bytes in the deployed model's dtype), bytes_ratio (= bytes_deployed /
bytes_original), bytes_breakdown (bytes by kind: dense, low_rank, sparse_values, sparse_index, buffers), budget_scope (model | targets: what a compressing method's budget counts), budget_unit (params | bytes: the
budget counts retained parameters or stored bytes), experiment, metrics_before, compress_wall_s, compress_peak_mem_gb, rank_stats, rank_map, rank_residual
(per target, the whitened weight's spectral energy beyond its rank: with stats_mode=kfac the K-FAC proxy of the loss
increase the plan predicts for that layer; 0 where dense), error, run_dir, items (the name of the per-item file below,
when one was written).

items.jsonl.gz, next to summary.json (jactus-train, jactus-eval): the per-item results behind `metrics`, one JSON
object per line, gzip-compressed: {"split": "test" | "val", "task": "piqa" (the dataset name for single-task data),
"index": 12, "correct": true, "nll": 0.83}. `index` is the item's position among its task's items of the split, so
(split, task, index) names the same question in every run with the same data settings and seed (the seed fixes the
split): jactus-report pairs two methods on it for its bootstrap intervals. `correct` and `nll` are as in `metrics`
(the mean of `correct` x 100 over a task's items is `<split>/acc_<task>`; the mean of `nll` is `<split>/nll_<task>`).
A palette run (jactus_palette) writes every member's records, each with the member's "budget".
"""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

ITEMS_FILE = "items.jsonl.gz"
ITEM_KEYS = ("split", "task", "index", "correct", "nll")
ITEM_OPTIONAL_KEYS = ("budget",)  # a palette run's records name the member they belong to
REQUIRED_KEYS = (
    "method", "model", "data", "budget", "seed", "params_original", "params_deployed", "params_trainable",
    "params_ratio", "bytes_deployed", "metrics", "wall_s", "git_sha", "status",
)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def bytes_fields(deployed, bytes_original: int | None = None) -> dict:
    """summary.json's byte keys for a deployed model: bytes_deployed, bytes_breakdown and, given the dense model's
    bytes (in the deployed dtype), bytes_original and bytes_ratio."""
    from .core import stored_bytes

    counts = stored_bytes(deployed)
    fields = {"bytes_deployed": counts.pop("total"), "bytes_breakdown": counts}
    if bytes_original:
        fields.update(bytes_original=bytes_original, bytes_ratio=fields["bytes_deployed"] / bytes_original)
    return fields


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    missing = [key for key in REQUIRED_KEYS if key not in summary]
    if missing:
        raise ValueError(f"summary is missing keys {missing}")
    path = Path(run_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def read_summary(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_items(run_dir: str | Path, records: list[dict]) -> Path:
    """Write per-item records ({split, task, index, correct, nll}, + budget for a palette member) to
    `run_dir`/items.jsonl.gz."""
    for record in records[:1]:
        if not set(ITEM_KEYS) <= set(record) <= set(ITEM_KEYS + ITEM_OPTIONAL_KEYS):
            raise ValueError(f"an item record has keys {sorted(record)}; expected {list(ITEM_KEYS)} "
                             f"(and optionally {list(ITEM_OPTIONAL_KEYS)})")
    path = Path(run_dir) / ITEMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({key: record[key] for key in ITEM_KEYS + ITEM_OPTIONAL_KEYS if key in record})
                         + "\n")
    return path


def read_items(path: str | Path) -> list[dict]:
    """The records of an items.jsonl.gz file (or of the one in a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / ITEMS_FILE
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
