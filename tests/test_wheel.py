"""The package as users install it: a built wheel (not the editable checkout) carries its Hydra configs, and
`jactus-train` runs from a directory outside the repository."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_wheel_installs_and_trains_from_outside_the_repository(tmp_path):
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist"),
         str(ROOT)])
    (wheel,) = (tmp_path / "dist").glob("jactus_ml-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jactus/conf/train.yaml" in names and "jactus/conf/method/jactus.yaml" in names
    assert "jactus/lm_eval_tasks/jactus_piqa.yaml" in names and "jactus/lm_eval_tasks/_template_yaml" in names
    assert not any(name.startswith(("tests/", "experiments/")) for name in names)
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)])

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import sys, jactus; print('IMPORTED', jactus.__file__); from jactus.train import main; "
            "sys.argv = ['jactus-train', *sys.argv[1:]]; main()")
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = run([sys.executable, "-c", code, "model=vit_tiny_test", "data=synthetic_vision", "method=jactus",
                  "trainer=cpu", "trainer.fast_dev_run=true", "logger=none", "callbacks=none",
                  "calib.num_samples=16", "calib.head_warmup_steps=2", f"paths.log_dir={outside / 'logs'}"],
                 cwd=outside, env=env)
    imported = next(line for line in result.stdout.splitlines() if line.startswith("IMPORTED"))
    assert imported.split(" ", 1)[1].startswith(str(target)), imported  # the wheel's copy, not the checkout
    (summary,) = [json.loads(p.read_text()) for p in (outside / "logs").rglob("summary.json")]
    assert summary["status"] == "ok" and summary["method"] == "jactus" and summary["params_ratio"] <= 0.8
