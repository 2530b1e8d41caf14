"""End-to-end runs of jactus-train on tiny configs (CPU): every model family x task family, the JACTUS path,
multirun, DDP simulated on 2 CPU processes, W&B offline, checkpoint resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jactus.summary import REQUIRED_KEYS, read_items

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "vision": ["model=vit_tiny_test", "data=synthetic_vision"],
    "qa": ["model=llama_tiny_test", "data=synthetic_qa"],
}
FAST = ["trainer=cpu", "trainer.fast_dev_run=true", "logger=none", "callbacks=none", "calib.num_samples=16",
        "calib.head_warmup_steps=2"]


def run_train(compose_cfg, overrides, tmp_path):
    from jactus.train import train

    cfg = compose_cfg(overrides, output_dir=tmp_path / "run")
    summary = train(cfg)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    return summary, on_disk


@pytest.mark.parametrize("family", ["vision", "qa"])
@pytest.mark.parametrize("method", ["full_ft", "linear_probe"])
def test_fast_dev_run_writes_summary(family, method, compose_cfg, tmp_path):
    _, summary = run_train(compose_cfg, TINY[family] + FAST + [f"method={method}"], tmp_path)
    assert set(REQUIRED_KEYS) <= set(summary), set(REQUIRED_KEYS) - set(summary)
    assert summary["status"] == "ok" and summary["method"] == method
    assert summary["budget"] is None and summary["params_ratio"] == 1.0
    assert summary["bytes_ratio"] == 1.0  # a full-size model deploys the dense model's bytes
    assert 0 < summary["params_trainable"] <= summary["params_original"]
    if method == "linear_probe":
        assert summary["params_trainable"] < summary["params_original"] / 2
    assert 0.0 <= summary["metrics"]["test/acc"] <= 100.0


@pytest.mark.parametrize("family", ["vision", "qa"])
def test_jactus_run_meets_budget(family, compose_cfg, tmp_path):
    overrides = TINY[family] + FAST + ["method=jactus", "budget.ratio=0.8", "allocator.rank_multiple=1",
                                       "save_compact=true"]
    _, summary = run_train(compose_cfg, overrides, tmp_path)
    assert summary["budget"] == 0.8 and summary["budget_scope"] == "model"
    assert summary["params_ratio"] <= 0.8
    assert summary["params_trainable"] < summary["params_deployed"]
    assert summary["rank_map"] and summary["rank_stats"]["factorized"] > 0
    residual = summary["rank_residual"]  # the K-FAC proxy each target leaves: positive where factorized, 0 if dense
    assert set(residual) == set(summary["rank_map"])
    assert all((value > 0) if summary["rank_map"][name] is not None else value == 0 for name, value in residual.items())
    assert summary["rank_stats"]["residual_total"] == pytest.approx(sum(residual.values()))
    assert "dense" in summary["metrics_before"] and "method" in summary["metrics_before"]
    assert (tmp_path / "run" / "compact" / "rank_map.json").is_file()
    weights = tmp_path / "run" / "compact" / "model.safetensors"  # bytes_deployed: that file's tensor data
    assert summary["bytes_deployed"] == weights.stat().st_size - 8 - int.from_bytes(weights.read_bytes()[:8], "little")
    assert summary["bytes_ratio"] < 1


@pytest.mark.parametrize("family,val_override", [("vision", "data.module.val_size=16"),
                                                  ("qa", "data.module.val_per_task=8")])
def test_validation_split_metrics(family, val_override, compose_cfg, tmp_path):
    """A validation split adds val/* metrics (what learning-rate searches select on); without one there are none."""
    overrides = TINY[family] + FAST + ["method=linear_probe"]
    _, with_val = run_train(compose_cfg, overrides + [val_override], tmp_path / "with")
    _, without = run_train(compose_cfg, overrides, tmp_path / "without")
    assert 0.0 <= with_val["metrics"]["val/acc"] <= 100.0
    assert "test/acc" in with_val["metrics"]
    assert with_val["metrics"]["val/nll"] > 0 and with_val["metrics"]["test/nll"] > 0
    assert not any(key.startswith("val/") for key in without["metrics"])
    for summary, splits in ((with_val, {"test", "val"}), (without, {"test"})):  # the per-item results behind them
        items = read_items(Path(summary["run_dir"]))
        assert summary["items"] == "items.jsonl.gz" and {item["split"] for item in items} == splits
        for split in splits:
            mine = [item for item in items if item["split"] == split]
            assert len({(item["task"], item["index"]) for item in mine}) == len(mine)
            assert summary["metrics"][f"{split}/acc"] == pytest.approx(100 * sum(i["correct"] for i in mine) / len(mine))
            assert summary["metrics"][f"{split}/nll"] == pytest.approx(sum(i["nll"] for i in mine) / len(mine))


def test_selection_run_never_reads_the_test_split(compose_cfg, tmp_path):
    """test=false (a search that selects on validation): the before-fine-tuning figures come from val too."""
    overrides = TINY["vision"] + FAST + ["method=jactus", "allocator.rank_multiple=1", "data.module.val_size=16",
                                         "test=false"]
    _, summary = run_train(compose_cfg, overrides, tmp_path)
    assert not any(key.startswith("test/") for key in summary["metrics"])
    for stage in ("dense", "method"):
        before = summary["metrics_before"][stage]
        assert set(before) == {"val/acc", "val/nll"} and 0.0 <= before["val/acc"] <= 100.0 and before["val/nll"] > 0


@pytest.mark.parametrize("family", ["vision", "qa"])
def test_zero_shot_row_never_trains_even_under_a_sweep_wide_max_steps(family, compose_cfg, tmp_path):
    """`variant=zero_shot trainer.max_steps=3` (a sweep's step count applied to every row) evaluates the model as it
    was before fine-tuning; the same overrides with the linear probe that zero_shot is made of do train."""
    overrides = TINY[family] + ["trainer=cpu", "logger=none", "callbacks=none", "calib.num_samples=16",
                                "calib.head_warmup_steps=2", "trainer.max_steps=3", "optim.lr=0.1"]
    _, zero_shot = run_train(compose_cfg, overrides + ["variant=zero_shot"], tmp_path / "zero_shot")
    _, probe = run_train(compose_cfg, overrides + ["method=linear_probe"], tmp_path / "probe")
    assert zero_shot["method"] == "zero_shot"
    before = zero_shot["metrics_before"]["dense"]["test/nll"]
    assert zero_shot["metrics"]["test/nll"] == pytest.approx(before, rel=1e-5)
    assert probe["metrics"]["test/nll"] != pytest.approx(probe["metrics_before"]["dense"]["test/nll"], rel=1e-5)


def test_zero_shot_with_nothing_to_evaluate_fails(compose_cfg, tmp_path):
    from jactus.train import train

    cfg = compose_cfg(TINY["vision"] + FAST + ["variant=zero_shot", "test=false"], output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="finetune=false with test=false and no validation split"):
        train(cfg)


def test_evaluate_dense_before_off_keeps_the_method_figure(compose_cfg, tmp_path):
    overrides = TINY["vision"] + FAST + ["method=jactus", "allocator.rank_multiple=1", "evaluate_dense_before=false"]
    _, summary = run_train(compose_cfg, overrides, tmp_path)
    assert "dense" not in summary["metrics_before"]
    assert 0.0 <= summary["metrics_before"]["method"]["test/acc"] <= 100.0


def test_model_data_mismatch_fails_early(compose_cfg, tmp_path):
    from jactus.train import train

    cfg = compose_cfg(["model=vit_tiny_test", "data=synthetic_qa"] + FAST, output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="vision model but data=synthetic_qa"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_bad_budget_fails_before_loading(compose_cfg, tmp_path):
    from jactus.train import train

    cfg = compose_cfg(TINY["vision"] + FAST + ["method=jactus", "budget.ratio=1.5"], output_dir=tmp_path / "run")
    with pytest.raises(Exception, match=r"budget.ratio=1.5"):
        train(cfg)


DUMP = ["+callbacks.dump._target_=dump_callback.DumpPerRank"]


@pytest.fixture
def dump_callback(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "helpers"))


def test_checkpoint_of_factorized_run_resumes(compose_cfg, tmp_path, dump_callback):
    base = TINY["vision"] + ["trainer=cpu", "logger=none", "callbacks=none", "calib.num_samples=16",
                             "method=jactus", "allocator.rank_multiple=1", "evaluate_before=false",
                             "distill.weight=0.5",  # the teacher cache travels in the checkpoint
                             "trainer.max_epochs=10"]  # max_steps ends both runs; the resumed one must train
    first, _ = run_train(compose_cfg, base + ["trainer.max_steps=2"], tmp_path / "a")
    ckpts = sorted((tmp_path / "a" / "run").rglob("*.ckpt"))
    assert ckpts, "the first run wrote no checkpoint"
    checkpoint = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    assert checkpoint["jactus_method"]["structure"]["plan"]["ranks"] == first["rank_map"]
    assert len(checkpoint["jactus_distill_cache"]["entries"]) == first["distill"]["cache_examples"] > 0
    resumed, _ = run_train(compose_cfg, base + ["trainer.max_steps=4", f"ckpt_path='{ckpts[-1]}'", *DUMP,
                                                f"+callbacks.dump.out_dir={tmp_path / 'dump'}"], tmp_path / "b")
    assert resumed["status"] == "ok" and resumed["distill"]["teacher"] == "cache"
    # rebuilt from the checkpoint, not compressed again (no calibration, no new teacher cache)
    assert resumed["compress_wall_s"] is None and "cache_examples" not in resumed["distill"]
    assert resumed["resumed_from"] == str(ckpts[-1])
    assert resumed["rank_map"] == first["rank_map"]
    assert resumed["params_deployed"] == first["params_deployed"]
    restored = torch.load(tmp_path / "dump" / "start_rank0.pt")["cores"]  # when training resumes
    saved = {key[len("model."):]: value for key, value in checkpoint["state_dict"].items() if key.endswith(".C")}
    assert saved and restored.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    assert resumed["params_trainable"] == first["params_trainable"]  # one freeze policy, fresh or resumed
    end = torch.load(tmp_path / "dump" / "end_rank0.pt")["cores"]
    assert any(not torch.equal(end[key], value) for key, value in saved.items())  # and the resumed run trained


@pytest.mark.parametrize("method", ["jactus", "lora"])
def test_bf16_backbone_trains_fp32_trainables(method, compose_cfg, tmp_path, dump_callback):
    """The issue's command: a bf16 tiny Llama under bf16-mixed writes a checkpoint whose trainable tensors (cores,
    norms; LoRA adapters) are fp32 and changed, and whose frozen ones are bf16; the export is bf16."""
    overrides = TINY["qa"] + ["++model.backbone.dtype=bfloat16", f"method={method}", "trainer=cpu",
                              "trainer.precision=bf16-mixed", "trainer.max_steps=3", "logger=none", "callbacks=none",
                              "calib.num_samples=16", "allocator.rank_multiple=1", "save_compact=true", *DUMP, f"+callbacks.dump.out_dir={tmp_path / 'dump'}"]
    summary, _ = run_train(compose_cfg, overrides, tmp_path)
    assert summary["backbone_dtype"] == "bfloat16" and summary["export_dtype"] == "bfloat16"
    assert summary["metrics_before"]["dense"]["test/nll"] > 0  # evaluated outside the trainer, under autocast
    if method == "jactus":
        assert summary["metrics_before"]["method"]["test/nll"] > 0
    ckpts = sorted((tmp_path / "run").rglob("*.ckpt"))
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"]
    trained = {k for k in state if (k.endswith(".C") or "norm" in k) if method == "jactus"} | {
        k for k in state if "lora_" in k}
    assert trained and all(state[k].dtype == torch.float32 for k in trained)
    frozen = [k for k in state if k.endswith((".U", ".V")) or k.endswith("embed_tokens.weight")
              or (k.endswith("proj.weight") and method == "jactus") or "base_layer" in k]
    assert frozen and all(state[k].dtype == torch.bfloat16 for k in frozen)
    if method == "jactus":
        before = torch.load(tmp_path / "dump" / "setup_rank0.pt")["cores"]
        assert before and all(before[k].dtype == torch.float32 for k in before)
        changed = [k for k in before if not torch.equal(before[k], state[f"model.{k}"])]
        assert len(changed) == len(before), f"cores unchanged after 3 steps: {set(before) - set(changed)}"


def test_bad_precision_or_export_dtype_fails(compose_cfg, tmp_path):
    from jactus.train import train

    cfg = compose_cfg(TINY["qa"] + FAST + ["++model.backbone.dtype=bfloat16", "method=jactus"])
    with pytest.raises(ValueError, match=r"trainer.precision='32-true' with a bfloat16 backbone.*bf16-mixed"):
        train(cfg)
    cfg = compose_cfg(TINY["qa"] + FAST + ["export_dtype=int8"], output_dir=tmp_path / "b")
    with pytest.raises(ValueError, match=r"export_dtype='int8'"):
        train(cfg)


def _cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env_extra or {})}
    result = subprocess.run([sys.executable, "-m", "jactus.train", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_multirun_over_two_methods(tmp_path):
    """Per-method learning rates apply, and a swept `optim.lr` wins over them (a learning-rate sweep runs what it
    names)."""
    common = [*TINY["vision"], *FAST, "+optim.lr_by_method.jactus=0.0042"]
    _cli(["-m", "method=full_ft,jactus", *common, f"paths.log_dir={tmp_path / 'table'}"], cwd=ROOT)
    summaries = {s["method"]: s for s in (json.loads(p.read_text()) for p in (tmp_path / "table").rglob("summary.json"))}
    assert sorted(summaries) == ["full_ft", "jactus"]
    assert all(s["status"] == "ok" for s in summaries.values())
    assert summaries["jactus"]["lr"] == 0.0042 and summaries["full_ft"]["lr"] == 1e-3  # conf/optim/adamw.yaml
    _cli(["-m", "method=jactus", "optim.lr=0.0007,0.0009", *common, f"paths.log_dir={tmp_path / 'sweep'}"], cwd=ROOT)
    swept = sorted(json.loads(p.read_text())["lr"] for p in (tmp_path / "sweep").rglob("summary.json"))
    assert swept == [0.0007, 0.0009]


def test_ddp_sim_builds_identical_factorization_on_both_ranks(tmp_path):
    dump = tmp_path / "dump"
    _cli([*TINY["vision"], "trainer=ddp_sim", "trainer.max_steps=1", "logger=none", "callbacks=none",
          "calib.num_samples=16", "method=jactus", "allocator.rank_multiple=1", "evaluate_before=false",
          f"paths.log_dir={tmp_path}", "+callbacks.dump._target_=dump_callback.DumpPerRank",
          f"+callbacks.dump.out_dir={dump}"], cwd=ROOT, env_extra={"PYTHONPATH": str(ROOT / "tests" / "helpers")})
    for when in ("setup", "end"):
        rank0, rank1 = (torch.load(dump / f"{when}_rank{r}.pt") for r in (0, 1))
        assert rank0["ranks"] == rank1["ranks"] and rank0["ranks"]
        assert rank0["cores"].keys() == rank1["cores"].keys() and rank0["cores"]
        for key in rank0["cores"]:
            torch.testing.assert_close(rank0["cores"][key], rank1["cores"][key], rtol=0, atol=0)


def test_wandb_offline_run_dir_is_written(tmp_path):
    _cli([*TINY["vision"], "trainer=cpu", "trainer.max_steps=1", "logger=wandb", "callbacks=none",
          "method=full_ft", "evaluate_before=false", f"paths.log_dir={tmp_path}"], cwd=ROOT,
         env_extra={"WANDB_MODE": "offline"})
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "no W&B offline run directory was written"
    assert any(p.name.endswith(".wandb") for p in runs[0].rglob("*"))


def test_training_runs_in_train_mode_after_the_evaluation_before(compose_cfg, tmp_path, dump_callback):
    """The tiny Llama comes back in eval mode, as `from_pretrained` returns a pretrained model. Compress-then-adapt
    evaluates the compressed model before training (evaluate_before, the default), which used to give every module
    the top module's eval flag back, so its LoRA dropout was off for the whole run while LoRA's own was on. Every
    module now trains in train mode, LoRA dropout included."""
    from jactus.models.causal_lm import create_causal_lm

    assert not create_causal_lm(config={"num_hidden_layers": 1}).model.training  # the mode a real load has
    record = tmp_path / "modes.json"
    overrides = TINY["qa"] + FAST + ["method=compress_then_adapt", "budget.ratio=0.8", "allocator.rank_multiple=1",
                                     "evaluate_before=true", "method.lora_dropout=0.1",
                                     "+callbacks.modes._target_=dump_callback.RecordModes",
                                     f"+callbacks.modes.out_file={record}"]
    summary, _ = run_train(compose_cfg, overrides, tmp_path)
    assert summary["metrics_before"]["method"]  # the evaluation before training ran
    modes = json.loads(record.read_text())
    assert modes["dropout"] and all(modes["dropout"].values()), modes["dropout"]
    assert modes["eval"] == []
