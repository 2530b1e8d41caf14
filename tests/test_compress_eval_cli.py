"""jactus-compress and jactus-eval from the command line on tiny models: a palette of two budgets, the method that
actually ran in the summaries, a refused full-size method, and an evaluation of one palette member that reproduces
the compressor's own before-fine-tuning figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY_QA = ["model=llama_tiny_test", "data=synthetic_qa", "data.module.train_per_task=16",
           "data.module.test_per_task=8", "calib.num_samples=8", "device=cpu"]


def cli(module: str, args: list[str], tmp_path: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, "-m", module, *args, f"paths.log_dir={tmp_path}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert (result.returncode == 0) == ok, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_compress_palette_then_eval_one_member(tmp_path):
    # with every option of the method (here gate/up sharing one input basis) reaching the one calibration
    cli("jactus.compress", [*TINY_QA, "budgets=[0.9,0.7]", "method=jactus_rho0", "allocator.rank_multiple=1",
                            "method.share_bases=[gate_proj,up_proj]"], tmp_path / "compress")
    summaries = {s["budget"]: s for s in (json.loads(p.read_text())
                                          for p in (tmp_path / "compress").rglob("budget_*/summary.json"))}
    assert sorted(summaries) == [0.7, 0.9]
    for budget, summary in summaries.items():
        assert summary["method"] == "jactus_rho0"  # the method actually used, not a hard-coded label
        assert summary["status"] == "ok" and summary["params_ratio"] <= budget
        assert summary["compress_stats"]["passes"] >= 1 and summary["metrics"]["test/nll"] > 0
        # bytes_deployed is the tensor data of the written model.safetensors (file less its length prefix and header)
        weights = next((tmp_path / "compress").rglob(f"budget_{budget}/model.safetensors"))
        header = int.from_bytes(weights.read_bytes()[:8], "little")
        assert summary["bytes_deployed"] == weights.stat().st_size - 8 - header
        assert summary["bytes_ratio"] == pytest.approx(summary["bytes_deployed"] / summary["bytes_original"])
        assert summary["bytes_ratio"] < 1 and summary["bytes_breakdown"]["low_rank"] > 0
        assert [[name.rsplit(".", 1)[-1] for name in group] for group in summary["shared_bases"]] == [
            ["gate_proj", "up_proj"]] * 2
    member = next((tmp_path / "compress").rglob("budget_0.7"))
    cli("jactus.evaluate", [*TINY_QA, f"compact_dir={member}"], tmp_path / "eval")
    (evaluated,) = [json.loads(p.read_text()) for p in (tmp_path / "eval").rglob("summary.json")]
    assert evaluated["status"] == "ok" and evaluated["method"] == "jactus_rho0" and evaluated["budget"] == 0.7
    assert evaluated["params_deployed"] == summaries[0.7]["params_deployed"]
    assert evaluated["bytes_deployed"] == summaries[0.7]["bytes_deployed"]
    assert evaluated["bytes_ratio"] == summaries[0.7]["bytes_ratio"]
    for key, value in summaries[0.7]["metrics"].items():  # the same model on the same test split
        assert evaluated["metrics"][key] == pytest.approx(value, rel=1e-5), key


def test_compress_takes_any_compressing_method_and_refuses_full_size(tmp_path):
    cli("jactus.compress", [*TINY_QA, "budgets=[0.8]", "method=compress_then_adapt", "evaluate=false"],
        tmp_path / "cta")
    (summary,) = [json.loads(p.read_text()) for p in (tmp_path / "cta").rglob("summary.json")]
    assert summary["method"] == "compress_then_adapt" and summary["params_ratio"] <= 0.8
    refused = cli("jactus.compress", [*TINY_QA, "method=lora"], tmp_path / "lora", ok=False)
    assert "method=lora keeps the model at full size" in refused.stderr + refused.stdout
