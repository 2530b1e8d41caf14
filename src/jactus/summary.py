"""summary.json: the one record of a run that reports, sweeps and checks read.

Keys (always present): method, model, data, budget (null for full-size methods), seed, params_original,
params_deployed, params_trainable, params_ratio (= deployed / original), metrics ({"test/acc": ..., "test/nll": ...
(mean negative log-likelihood of the gold label / answer), and "test/acc_<task>", "test/nll_<task>" where several
tasks; "val/..." the same on the validation split}), wall_s, git_sha, status ("ok" | "failed").
Optional: experiment, metrics_before, compress_wall_s, compress_peak_mem_gb, rank_stats, rank_map, error, run_dir.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REQUIRED_KEYS = (
    "method", "model", "data", "budget", "seed", "params_original", "params_deployed", "params_trainable",
    "params_ratio", "metrics", "wall_s", "git_sha", "status",
)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
