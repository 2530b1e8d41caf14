"""Copy the small, reviewable part of sweep runs into experiments/results: each run's summary.json and its
.hydra/{config,overrides}.yaml (the exact configuration and command-line overrides) and items.jsonl.gz (per-item
results, 20 KB: what the reports' bootstrap intervals resample), nothing else (no checkpoints,
no weights, no logs).

    python experiments/results/collect_runs.py SWEEP_DIR DEST_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

KEEP = ("summary.json", "items.jsonl.gz", ".hydra/config.yaml", ".hydra/overrides.yaml")


def collect(source: Path, dest: Path) -> int:
    if not source.is_dir():
        raise SystemExit(f"collect_runs: {source} is not a directory")
    runs = 0
    for summary in sorted(source.rglob("summary.json")):
        run = summary.parent
        target = dest / run.relative_to(source)
        for name in KEEP:
            if (run / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run / name, target / name)
        runs += 1
    return runs


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(f"copied {collect(Path(sys.argv[1]), Path(sys.argv[2]))} runs into {sys.argv[2]}")
