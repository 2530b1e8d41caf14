"""Every experiment file in conf/experiment/ runs end to end through `jactus-train` on tiny stand-ins.

Each experiment keeps its own settings and its sweep over table rows (`variant`); only the model (the tiny model of
the same family), the data (synthetic, also replacing a `data` sweep), the seeds (one), the trainer (CPU,
fast_dev_run), the logger (none) and the calibration and data sizes shrink. A multirun experiment runs as a real
Hydra multirun (`-m`), one subprocess per experiment; every job must write an "ok" summary.json, every variant row
must appear with its method and budget, and jactus-report must give one row per variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jactus import report
from jactus.utils.run import CONF_DIR

pytestmark = pytest.mark.slow

CONF = Path(CONF_DIR)
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DATA = {"vision": "synthetic_vision", "causal_lm": "synthetic_qa"}
TINY = {
    "vision": ["model=vit_tiny_test", "data=synthetic_vision", "data.img_size=32", "data.batch_size=8",
               "data.module.train_size=64", "data.module.test_size=32", "data.module.val_size=16"],
    "causal_lm": ["model=llama_tiny_test", "data=synthetic_qa", "data.batch_size=4", "data.module.train_per_task=32",
                  "data.module.test_per_task=16", "data.module.val_per_task=4", "data.module.max_length=64"],
}
# `seed=0` and `data=...` on the command line replace the experiment's `seed` and `data` sweeps (Hydra's basic
# sweeper keeps the last value given for a key).
FAST = ["seed=0", "trainer=cpu", "trainer.fast_dev_run=true", "logger=none", "calib.num_samples=16",
        "calib.head_warmup_steps=2"]
# One BLAS/OpenMP thread: on a busy 2-core machine two spinning threads make a small fp64 eigh ~100x slower.
ENV = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}


def _override(defaults, group: str) -> str:
    """The option that a `# @package _global_` file picks for `group` (`- override /group: option`)."""
    picked = [entry[f"override /{group}"] for entry in defaults if f"override /{group}" in entry]
    assert len(picked) == 1, f"expected one 'override /{group}' in {defaults}"
    return picked[0]


def variant_row(name: str) -> tuple[str, float | None]:
    """(method label, budget.ratio or None) that conf/variant/<name>.yaml sets: the table row it stands for.

    The label is the variant's `method_label` where it sets one (zero_shot runs linear_probe with no steps)."""
    variant = OmegaConf.load(CONF / "variant" / f"{name}.yaml")
    label = variant.get("method_label") or _override(variant.defaults, "method")
    return label, OmegaConf.select(variant, "budget.ratio")


def first_table(markdown: str) -> list[str]:
    """The rows of the first markdown table (the results table; the item counts and gaps follow it)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [line for line in lines[start:end] if line.startswith("| ")]


def jactus_train(args: list[str], log: Path) -> None:
    """Run the installed `jactus-train` console script; its output goes to `log` and into the failure message."""
    script = Path(sys.executable).with_name("jactus-train")
    assert script.is_file(), f"{script} is missing: install the project (make setup)"
    with log.open("w") as out:
        result = subprocess.run([str(script), *args], cwd=ROOT, env={**os.environ, **ENV}, stdout=out,
                                stderr=subprocess.STDOUT, timeout=600)
    assert result.returncode == 0, f"jactus-train {' '.join(args)} failed:\n{log.read_text()[-6000:]}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_on_tiny_stand_ins(experiment, tmp_path):
    spec = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    family = OmegaConf.load(CONF / "model" / f"{_override(spec.defaults, 'model')}.yaml").family
    multirun = OmegaConf.select(spec, "hydra.mode") == "MULTIRUN"
    args = [f"experiment={experiment}", *TINY[family], *FAST, f"paths.log_dir={tmp_path / 'logs'}"]
    jactus_train((["-m"] if multirun else []) + args, tmp_path / "jactus-train.log")

    if not multirun:
        (summary_path,) = (tmp_path / "logs" / "train" / "runs").glob("*/summary.json")
        summary = json.loads(summary_path.read_text())
        method, budget = _override(spec.defaults, "method"), OmegaConf.select(spec, "budget.ratio")
        if budget is None:
            budget = OmegaConf.load(CONF / "budget" / "model.yaml").ratio
        assert summary["status"] == "ok", summary.get("error")
        assert (summary["experiment"], summary["method"], summary["data"]) == (experiment, method, DATA[family])
        assert summary["budget"] == budget and summary["params_ratio"] <= budget
        if spec.get("save_compact"):
            assert (summary_path.parent / "compact" / "rank_map.json").is_file()
        return

    (sweep_dir,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    variants = str(spec.hydra.sweeper.params.variant).split(",")
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == len(variants), f"{len(jobs)} jobs for {len(variants)} variants: {variants}"
    labels = {}
    for job in jobs:
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        (variant,) = [o.split("=", 1)[1] for o in overrides if o.startswith("variant=")]
        assert (job / "summary.json").is_file(), f"job {job.name} ({variant}) wrote no summary.json"
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "ok", f"{variant}: {summary.get('error')}"
        assert summary["experiment"] == experiment and summary["data"] == DATA[family]
        assert summary["seed"] == 0
        method, budget = variant_row(variant)
        assert summary["method"] == method, variant
        if budget is not None:
            assert summary["budget"] == budget, variant
        if summary["budget"] is not None:  # a compressing row meets its budget
            assert summary["params_ratio"] <= summary["budget"], (variant, summary["params_ratio"])
        else:  # a full-size row deploys the whole model (adapters merged)
            assert summary["params_ratio"] == 1.0, (variant, summary["params_ratio"])
        labels[variant] = report.row_label(summary)
    assert sorted(labels) == sorted(variants)
    assert len(set(labels.values())) == len(variants), f"two variants share a table row: {labels}"

    out = tmp_path / "report"
    assert report.main([str(sweep_dir), "--out", str(out)]) == 0
    lines = first_table((out / "report.md").read_text())
    header, rows = lines[0].split(" | "), [line.strip("| ").split(" | ") for line in lines[1:]]
    assert header[0] == "| Method" and len(lines) == 1 + len(variants), lines
    assert sorted(row[0] for row in rows) == sorted(labels.values())
    for row in rows:  # every cell of every row holds a number
        assert not {report.MISSING, report.FAILED} & {cell.strip("*") for cell in row[1:]}, row
