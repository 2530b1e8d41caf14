"""Sweeps beyond the grid: the Optuna learning-rate search (selected on validation) and the SLURM launcher compose,
and a two-trial Optuna search runs for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_lr_search_composes_over_an_experiment_row(compose_cfg):
    cfg = compose_cfg(["hparams_search=lr_optuna", "experiment=offline_vit", "data=fashion_mnist",
                       "variant=jactus_0.8"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.params["optim.lr"] == "tag(log, interval(1e-05, 0.01))"
    assert cfg.test is False and cfg.optimized_metric == "val/nll"  # never selects on test
    assert cfg.data.module.val_size > 0


def test_slurm_launcher_composes(compose_cfg):
    cfg = compose_cfg(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4 and launcher.nodes == 1


@pytest.mark.slow
def test_two_trial_optuna_search_runs(tmp_path):
    args = [sys.executable, "-m", "jactus.train", "-m", "hparams_search=lr_optuna", "hparams_search.n_trials=2",
            "model=vit_tiny_test", "data=synthetic_vision", "data.module.val_size=16", "method=lora",
            "trainer=cpu", "trainer.max_steps=1", "logger=none", "callbacks=none", "calib.head_warmup_steps=2",
            f"paths.log_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summaries = [json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "ok" for s in summaries)
    assert len({s["lr"] for s in summaries}) == 2 and all(1e-5 <= s["lr"] <= 1e-2 for s in summaries)
    assert all(not any(k.startswith("test/") for k in s["metrics"]) for s in summaries)
    (results,) = tmp_path.rglob("optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert best["best_value"] == pytest.approx(min(s["metrics"]["val/nll"] for s in summaries))
