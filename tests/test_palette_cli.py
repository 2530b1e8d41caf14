"""jactus-train with method=jactus_palette on a tiny ViT: one run writes a compact model per budget and a `palette`
list in summary.json; each member loads as a normal compact model whose evaluation gives the member's metrics; the
loggers keep every member's metrics; jactus-report shows the palette as one line."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from jactus.core import count_params, load_compact
from jactus.lit.vision import ImageClassifier
from jactus.report.load import load_summaries, results_frame

FAST = ["model=vit_tiny_test", "data=synthetic_vision", "trainer=cpu", "trainer.fast_dev_run=true", "logger=none",
        "callbacks=none", "calib.num_samples=16", "calib.head_warmup_steps=2"]


def test_palette_run_writes_a_compact_model_per_budget(compose_cfg, tmp_path):
    from jactus.train import train

    overrides = FAST + ["method=jactus_palette", "method.palette=[0.6,0.8]", "save_compact=true"]
    cfg = compose_cfg(overrides, output_dir=tmp_path / "run")
    train(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["method"] == "jactus_palette" and summary["budget"] == 0.8
    assert [member["budget"] for member in summary["palette"]] == [0.6, 0.8]
    plans = {plan["budget"]: plan["rank_map"] for plan in summary["palette_plans"]}
    test_batches = [next(iter(instantiate(cfg.data.module, _convert_="all").test_dataloader()))]  # fast_dev_run: 1
    for member in summary["palette"]:
        assert member["params_ratio"] <= member["budget"]
        compact = load_compact(run / "compact" / f"budget_{member['budget']}")
        assert count_params(compact) == member["params_deployed"]
        assert compact.jactus_rank_map == plans[member["budget"]]  # the member is its budget's plan
        # the member's metrics are those of the model written for it (not, say, of the member active last)
        evaluated = ImageClassifier(compact).evaluate(test_batches, "cpu", progress=False)
        assert evaluated["test/acc"] == member["metrics"]["test/acc"]
        assert evaluated["test/nll"] == pytest.approx(member["metrics"]["test/nll"], rel=1e-5)
    assert len({member["metrics"]["test/nll"] for member in summary["palette"]}) == 2  # two different models
    # jactus-eval on a member finds the palette run's summary two levels up: method, the member's budget and size
    from jactus.evaluate import _origin_summary

    origin = _origin_summary(run / "compact" / "budget_0.6")
    assert origin["method"] == "jactus_palette" and origin["budget"] == 0.6
    assert origin["params_deployed"] == summary["palette"][0]["params_deployed"]
    assert summary["palette"][-1]["metrics"] == summary["metrics"]  # the largest member is the run's main model
    assert summary["params_deployed"] == summary["palette"][-1]["params_deployed"]
    sampling = summary["palette_sampling"]
    assert abs(sum(sampling["probabilities"]) - 1.0) < 1e-9 and sum(sampling["steps"]) == 1
    assert not (run / "compact" / "model.safetensors").exists()  # the members are the compact models

    summaries, unreadable = load_summaries(run)
    assert not unreadable and [(s["method"], s["budget"]) for s in summaries] == [("jactus_palette", 0.6),
                                                                                   ("jactus_palette", 0.8)]
    from jactus.report.items import run_items  # each member's row reads the items the run tagged with its budget

    member_items = {row["budget"]: run_items(row["_path"]) for row in summaries}
    for budget, records in member_items.items():
        assert records and {record["budget"] for record in records} == {budget}
    frame = results_frame(summaries)
    assert sorted(frame["label"]) == ["jactus_palette@0.6", "jactus_palette@0.8"]
    assert summaries[0]["rank_map"] != summaries[1]["rank_map"]


def test_palette_run_logs_every_members_metrics(compose_cfg, tmp_path):
    """The members are evaluated one after the other at the same step: each logs under its own names (`test_b60/*`,
    `test_b80/*`), so metrics.csv (and W&B) holds every member's figures, and the largest also as the run's `test/*`."""
    from jactus.train import train

    overrides = ["model=vit_tiny_test", "data=synthetic_vision", "trainer=cpu", "trainer.max_steps=1",
                 "trainer.limit_test_batches=1", "trainer.enable_checkpointing=false", "logger=csv", "callbacks=none",
                 "calib.num_samples=16", "evaluate_before=false", "method=jactus_palette", "method.palette=[0.6,0.8]"]
    cfg = compose_cfg(overrides, output_dir=tmp_path / "run")
    with open_dict(cfg):
        del cfg.hydra  # as under the CLI, which passes no `hydra` node: the loggers' hyperparameters resolve the config
    summary = train(cfg)
    with next((tmp_path / "run").rglob("metrics.csv")).open() as file:
        logged = {key: float(value) for row in csv.DictReader(file) for key, value in row.items() if value}
    for member, tag in zip(summary["palette"], ("test_b60", "test_b80"), strict=True):
        assert member["metrics"].keys() == {"test/acc", "test/nll"}
        for key, value in member["metrics"].items():
            assert logged[key.replace("test/", f"{tag}/")] == pytest.approx(value), (tag, key)
    assert logged["test/acc"] == pytest.approx(summary["metrics"]["test/acc"])
    assert logged["test/nll"] == pytest.approx(summary["palette"][-1]["metrics"]["test/nll"])
    assert summary["palette"][0]["metrics"]["test/nll"] != summary["palette"][1]["metrics"]["test/nll"]


def test_report_draws_the_palette_beside_independent_runs(tmp_path):
    from jactus.report.cli import write_report

    base = {"model": "vit_tiny_test", "data": "synthetic_vision", "seed": 0, "status": "ok", "params_original": 100}
    runs = {"palette": {**base, "method": "jactus_palette", "budget": 0.8, "params_ratio": 0.79,
                        "metrics": {"test/acc": 70.0},
                        "palette": [{"budget": 0.6, "params_ratio": 0.59, "metrics": {"test/acc": 60.0}},
                                    {"budget": 0.8, "params_ratio": 0.79, "metrics": {"test/acc": 70.0}}]},
            "jactus_06": {**base, "method": "jactus", "budget": 0.6, "params_ratio": 0.6,
                          "metrics": {"test/acc": 62.0}},
            "jactus_08": {**base, "method": "jactus", "budget": 0.8, "params_ratio": 0.8,
                          "metrics": {"test/acc": 71.0}}}
    for name, summary in runs.items():
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "summary.json").write_text(json.dumps(summary))
    report = write_report(tmp_path / "sweep", tmp_path / "report")
    assert report.files["acc_vs_params"].is_file()
    rows = report.frame.set_index("label")
    assert rows.loc["jactus_palette@0.6", "value"] == 60.0 and rows.loc["jactus_palette@0.8", "value"] == 70.0
    assert rows.loc["jactus_palette@0.6", "params_ratio"] == 0.59


def test_palette_run_resumes_from_its_checkpoint(compose_cfg, tmp_path):
    from jactus.train import train

    base = ["model=vit_tiny_test", "data=synthetic_vision", "trainer=cpu", "logger=none", "callbacks=none",
            "calib.num_samples=16", "method=jactus_palette", "method.palette=[0.6,0.8]", "evaluate_before=false",
            "trainer.max_epochs=10"]
    first = train(compose_cfg(base + ["trainer.max_steps=2"], output_dir=tmp_path / "a"))
    ckpts = sorted((tmp_path / "a").rglob("*.ckpt"))
    assert ckpts, "the first run wrote no checkpoint"
    structure = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["jactus_method"]["structure"]
    assert [plan["budget"] for plan in structure["palette"]] == [0.6, 0.8]
    assert sum(structure["sampler"]["steps"]) == 2
    resumed = train(compose_cfg(base + ["trainer.max_steps=4", f"ckpt_path='{ckpts[-1]}'"],
                                output_dir=tmp_path / "b"))
    # The sampler's counts restart: CompressionCallback.setup sees no trainer.ckpt_path yet (Lightning sets it after
    # the setup hooks), so it re-applies the method instead of calling `rebuild`; `rebuild` itself is tested in
    # tests/methods/test_palette.py.
    assert resumed["status"] == "ok" and sum(resumed["palette_sampling"]["steps"]) >= 2
    assert [m["params_deployed"] for m in resumed["palette"]] == [m["params_deployed"] for m in first["palette"]]
    assert resumed["params_trainable"] == first["params_trainable"]
