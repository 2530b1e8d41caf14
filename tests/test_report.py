"""jactus-report on a fabricated sweep with known numbers."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from jactus import report


def _write(root, name, *, method, data, seed, acc=None, budget=None, ratio=1.0, status="ok", model="vit",
           metrics=None, rank_map=None):
    summary = {
        "method": method, "model": model, "data": data, "budget": budget, "seed": seed,
        "params_original": 1000, "params_deployed": None if status != "ok" else int(1000 * ratio),
        "params_trainable": 10, "params_ratio": None if status != "ok" else ratio,
        "metrics": metrics if metrics is not None else ({} if acc is None else {"test/acc": acc}),
        "wall_s": 1.0, "git_sha": "abc", "status": status,
    }
    if rank_map is not None:
        summary["rank_map"] = rank_map
    path = root / name / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path):
    """lora and jactus@0.8 x seeds 0, 1 x cifar10, dtd; jactus/dtd seed 0 failed, seed 1 missing; lora/eurosat seed 0."""
    root = tmp_path / "sweep"
    for seed, (cifar, dtd) in enumerate([(90.0, 70.0), (92.0, 74.0)]):
        _write(root, f"lora/cifar10/s{seed}", method="lora", data="cifar10", seed=seed, acc=cifar)
        _write(root, f"lora/dtd/s{seed}", method="lora", data="dtd", seed=seed, acc=dtd)
    for seed, (acc, ratio) in enumerate([(93.0, 0.79), (95.0, 0.81)]):
        _write(root, f"jactus/cifar10/s{seed}", method="jactus", data="cifar10", seed=seed, acc=acc, budget=0.8,
               ratio=ratio, rank_map={"blocks.0.fc1": 16 + 8 * seed, "blocks.0.fc2": None, "blocks.1.fc1": 8})
    _write(root, "jactus/dtd/s0", method="jactus", data="dtd", seed=0, budget=0.8, status="failed")
    _write(root, "lora/eurosat/s0", method="lora", data="eurosat", seed=0, acc=98.0)
    return root


def test_table_cells(sweep):
    summaries, unreadable = report.load_summaries([sweep])
    assert len(summaries) == 8 and not unreadable
    (table,) = report.build_tables(report.results_frame(summaries))
    assert table.rows == ["lora", "jactus@0.8"]  # full-size methods first
    assert table.columns == ["cifar10", "dtd", "eurosat"]  # the paper's order
    expected = {
        "lora": {"Params (%)": "100.0", "cifar10": "91.00 ± 1.41", "dtd": "72.00 ± 2.83", "eurosat": "98.00",
                 "Avg.": "86.00"},  # only seed 0 has every column: (90 + 70 + 98) / 3
        "jactus@0.8": {"Params (%)": "80.0", "cifar10": "94.00 ± 1.41", "dtd": "failed", "eurosat": "—",
                       "Avg.": "—"},
    }
    assert table.to_frame().to_dict(orient="index") == expected
    assert table.best("cifar10") == {"jactus@0.8"} and table.best("dtd") == {"lora"}


def test_partly_failed_cell_and_ties():
    assert report.Cell([80.0], failed=1).text() == "80.00 (1 failed)"
    assert report.Cell().text() == "—" and report.Cell(failed=2).text() == "failed"
    assert report.Cell([1.0, 2.0, 3.0]).text(1) == "2.0 ± 1.0"


def test_report_files(sweep, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "| Method | Params (%) | cifar10 | dtd | eurosat | Avg. |" in markdown
    assert "| lora | 100.0 | 91.00 ± 1.41 | **72.00 ± 2.83** | **98.00** | **86.00** |" in markdown
    assert "| jactus@0.8 | 80.0 | **94.00 ± 1.41** | failed | — | — |" in markdown
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 8 and set(results["status"]) == {"ok", "failed"}
    failed = results[results["status"] == "failed"]
    assert failed["column"].tolist() == ["dtd"] and math.isnan(failed["value"].iloc[0])
    for name in ("acc_vs_params.png", "rank_heatmap.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 1000


def test_per_task_columns_and_no_rank_maps(tmp_path):
    root = tmp_path / "cs"
    tasks = {"test/acc": 65.0, "test/acc_piqa": 70.0, "test/acc_boolq": 60.0}
    _write(root, "a", method="jactus", data="commonsense8", seed=0, budget=0.8, ratio=0.8, model="llama",
           metrics=tasks)
    _write(root, "b", method="lora", data="commonsense8", seed=0, model="llama", status="failed")
    rep = report.write_report(root, tmp_path / "out")
    (table,) = rep.tables
    assert table.columns == ["boolq", "piqa"]
    assert [table.text("jactus@0.8", c) for c in ("boolq", "piqa", "Avg.")] == ["60.00", "70.00", "65.00"]
    assert [table.text("lora", c) for c in ("boolq", "piqa", "Params (%)")] == ["failed", "failed", "—"]
    assert "rank_map" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "rank_heatmap.png").exists()


def test_unreadable_summaries_are_listed_not_fatal(sweep):
    (sweep / "broken").mkdir()
    (sweep / "broken" / "summary.json").write_text("{not json")
    (sweep / "partial").mkdir()
    (sweep / "partial" / "summary.json").write_text('{"method": "lora"}')
    summaries, unreadable = report.load_summaries(sweep)
    assert len(summaries) == 8 and len(unreadable) == 2 and "no model, data" in unreadable[1]


def test_no_summaries_is_an_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no summary.json" in capsys.readouterr().err


def test_wandb_offline_logs_table_and_plots(sweep, tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "cfg",
                       "WANDB_CACHE_DIR": tmp_path / "cache", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(key, str(value))
    summaries, _ = report.load_summaries(sweep)
    assert not report.wants_wandb(summaries)
    (sweep / "lora" / "dtd" / "s0" / "wandb").mkdir()  # a run that logged to W&B turns the upload on
    assert report.wants_wandb(report.load_summaries(sweep)[0])
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    media = {path.parent.parent.name + "/" + path.name.split("_0_")[0] for path in (out / "wandb").rglob("media/*/report/*")}
    assert media == {"images/acc_vs_params", "images/rank_heatmap", "table/table", "table/results"}


def test_gaps(sweep, tmp_path):
    # dora, seed 0 only: avg (89.5 + 71.25 + 97) / 3 = 85.9167; lora's avg (seed 0, the only complete one) is 86
    for data, acc in [("cifar10", 89.5), ("dtd", 71.25), ("eurosat", 97.0)]:
        _write(sweep, f"dora/{data}/s0", method="dora", data=data, seed=0, acc=acc)
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out), "--gaps", "lora:dora,jactus@0.8", "--gaps",
                        "jactus@0.8:lora"]) == 0
    markdown = (out / "report.md").read_text()
    section = markdown[markdown.index("### Gaps"):markdown.index("## Plots")]
    assert "| Ref | Other | cifar10 | dtd | eurosat | Avg. |" in section
    # lora - dora pairs seed 0 only: cifar10 90 - 89.5, dtd 70 - 71.25 (not lora's 2-seed means 91 and 72)
    assert "| lora | dora | +0.50 | -1.25 | +1.00 | +0.08 |" in section
    # jactus: dtd failed, eurosat and avg missing; cifar10 pairs seeds 0 and 1: 90 - 93 and 92 - 95, spread 0
    assert "| lora | jactus@0.8 | -3.00 ± 0.00 | — | — | — |" in section
    assert "| jactus@0.8 | lora | +3.00 ± 0.00 | — | — | — |" in section
    gaps = pd.read_csv(out / "gaps.csv")
    assert len(gaps) == 3 * 4 and list(gaps.columns) == ["table", "ref", "other", "column", "ref_mean",
                                                          "other_mean", "gap", "paired_seeds", "paired_std",
                                                          "ci_level", "ci_low", "ci_high", "ci_gap", "ci_seeds",
                                                          "ci_items"]
    assert gaps["ci_low"].isna().all() and (gaps["ci_seeds"] == 0).all()  # no per-item results in this sweep
    cifar = gaps[(gaps["other"] == "jactus@0.8") & (gaps["column"] == "cifar10")].iloc[0]
    assert cifar["paired_seeds"] == 2 and cifar["paired_std"] == pytest.approx(0.0)
    average = gaps[(gaps["other"] == "dora") & (gaps["column"] == "Avg.")].iloc[0]
    assert average["gap"] == pytest.approx(86.0 - (89.5 + 71.25 + 97.0) / 3)
    assert gaps[(gaps["other"] == "jactus@0.8") & (gaps["column"] == "dtd")]["gap"].isna().all()


def test_gaps_without_the_flag_write_nothing(sweep, tmp_path):
    assert report.write_report(sweep, tmp_path / "out").gaps == []
    assert not (tmp_path / "out" / "gaps.csv").exists()
    assert "Gaps" not in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("spec, message", [
    ("jactus@0.6:lora", r"unknown row label\(s\) 'jactus@0.6' in the table 'vit'; its rows: lora, jactus@0.8"),
    ("lora:dora,jactus", r"'dora', 'jactus' in the table 'vit'; its rows: lora, jactus@0.8"),
    ("lora", r"expected REF:OTHER\[,OTHER...\]"),
    ("lora:", r"expected REF:OTHER"),
])
def test_gaps_with_unknown_labels_fail(spec, message, sweep, tmp_path, capsys):
    with pytest.raises(report.GapsError, match=message):
        report.write_report(sweep, tmp_path / "out", gaps=[spec])
    assert not (tmp_path / "out").exists()  # nothing written before the labels are checked
    assert report.main([str(sweep), "--out", str(tmp_path / "out"), "--gaps", spec]) == 1
    assert "jactus-report: --gaps" in capsys.readouterr().err


def test_split_by_learning_rate(tmp_path):
    """--split-by gives one row per (method, value); values come from summary.json or the run's Hydra config."""
    root = tmp_path / "lr_search"
    _write(root, "a", method="lora", data="cifar10", seed=0, metrics={"val/acc": 80.0})
    _write(root, "b", method="lora", data="cifar10", seed=0, metrics={"val/acc": 84.0})
    _write(root, "c", method="jactus", data="cifar10", seed=0, budget=0.8, ratio=0.8, metrics={"val/acc": 83.0})
    for name, lr in (("a", 0.001), ("b", 0.0003)):  # as jactus-train records it
        path = root / name / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "lr": lr}))
    (root / "c" / ".hydra").mkdir()
    (root / "c" / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.0001\n")  # an older run: only in its config
    rep = report.write_report(root, tmp_path / "out", metric="val/acc", split_by=["lr"])
    (table,) = rep.tables
    assert table.rows == ["lora (lr=0.0003)", "lora (lr=0.001)", "jactus@0.8 (lr=?)"]  # by value within a method
    assert table.cell("lora (lr=0.0003)", "cifar10").values == [84.0]
    rep = report.write_report(root, tmp_path / "out2", metric="val/acc", split_by=["optim.lr"])
    assert "jactus@0.8 (optim.lr=0.0001)" in rep.tables[0].rows
    assert (tmp_path / "out2" / "acc_vs_params.png").is_file()


def test_paired_gap_spread(tmp_path):
    """The ± of a gap is the spread of per-seed differences, not of the rows themselves."""
    root = tmp_path / "paired"
    for seed, (ref, other) in enumerate([(80.0, 79.0), (90.0, 88.0), (70.0, 70.0)]):  # diffs 1, 2, 0
        _write(root, f"j/s{seed}", method="jactus", data="cifar10", seed=seed, acc=ref, budget=0.8, ratio=0.8)
        _write(root, f"l/s{seed}", method="lora", data="cifar10", seed=seed, acc=other)
    rep = report.write_report(root, tmp_path / "out", gaps=["jactus@0.8:lora"])
    (gaps,) = rep.gaps
    assert gaps.gap("jactus@0.8", "lora", "cifar10") == pytest.approx(1.0)
    assert gaps.paired_std("jactus@0.8", "lora", "cifar10") == pytest.approx(1.0)  # stdev(1, 2, 0)
    assert gaps.text("jactus@0.8", "lora", "Avg.") == "+1.00 ± 1.00"


def test_gap_pairs_only_the_seeds_both_rows_ran(tmp_path):
    """JACTUS ran seeds 0-2, LoRA seeds 0-1: the gap is the mean of the two paired differences (the statistic the
    interval is about), not JACTUS's 3-seed mean minus LoRA's 2-seed mean; rows sharing no seed say unpaired."""
    root = tmp_path / "uneven"
    for seed, acc in enumerate([80.0, 90.0, 40.0]):
        _write(root, f"j/s{seed}", method="jactus", data="cifar10", seed=seed, acc=acc, budget=0.8, ratio=0.8)
    for seed, acc in enumerate([79.0, 87.0]):  # differences 1 and 3
        _write(root, f"l/s{seed}", method="lora", data="cifar10", seed=seed, acc=acc)
    _write(root, "d/s7", method="dora", data="cifar10", seed=7, acc=60.0)
    rep = report.write_report(root, tmp_path / "out", gaps=["jactus@0.8:lora,dora"])
    (gaps,) = rep.gaps
    assert gaps.gap("jactus@0.8", "lora", "cifar10") == pytest.approx(2.0)  # unpaired it would be 70 - 83 = -13
    assert gaps.text("jactus@0.8", "lora", "cifar10") == "+2.00 ± 1.41"
    assert gaps.gap("jactus@0.8", "dora", "cifar10") == pytest.approx(70.0 - 60.0)
    assert gaps.text("jactus@0.8", "dora", "cifar10") == "+10.00 (unpaired)"
    record = next(r for r in gaps.to_records() if r["other"] == "lora" and r["column"] == "cifar10")
    assert record["gap"] == pytest.approx(2.0) and record["paired_seeds"] == 2


def test_runs_without_a_seed_do_not_pair(tmp_path):
    root = tmp_path / "unseeded"
    _write(root, "j", method="jactus", data="cifar10", seed=None, acc=80.0, budget=0.8, ratio=0.8)
    _write(root, "l", method="lora", data="cifar10", seed=None, acc=70.0)
    rep = report.write_report(root, tmp_path / "out", gaps=["jactus@0.8:lora"])
    assert rep.gaps[0].text("jactus@0.8", "lora", "cifar10") == "+10.00 (unpaired)"


def test_rerun_of_a_seed_counts_once(tmp_path):
    """Seed 0 run twice (80, 84) and seed 1 once (90): the cell is over seeds {0: 82, 1: 90}, not three samples."""
    root = tmp_path / "reruns"
    _write(root, "a/s0", method="lora", data="cifar10", seed=0, acc=80.0)
    _write(root, "b/s0", method="lora", data="cifar10", seed=0, acc=84.0)
    _write(root, "a/s1", method="lora", data="cifar10", seed=1, acc=90.0)
    _write(root, "c/s0", method="lora", data="dtd", seed=0, acc=70.0)  # another dataset's cell: not a rerun
    (table,) = report.build_tables(report.results_frame(report.load_summaries([root])[0]))
    cell = table.cell("lora", "cifar10")
    assert cell.mean == pytest.approx(86.0) and cell.std == pytest.approx(math.sqrt(32.0))
    assert table.text("lora", "cifar10") == "86.00 ± 5.66"
    rep = report.write_report(root, tmp_path / "out")  # and the report says which seed ran twice
    notes = rep.files["report"].read_text().split("## Seeds run more than once")[1]
    assert f"lora on cifar10, seed 0: 2 runs ({root / 'a' / 's0'}, {root / 'b' / 's0'})" in notes
    assert "seed 1" not in notes and "dtd" not in notes


def test_a_budget_over_the_targets_is_its_own_row(tmp_path, capsys):
    """scope=targets at 0.8 is another model than scope=model at 0.8, not a re-run of its seed: its own row, read from
    the summary's budget_scope or, for runs written before it, from .hydra/config.yaml."""
    root = tmp_path / "scopes"
    _write(root, "model/s0", method="jactus", data="cifar10", seed=0, acc=80.0, budget=0.8, ratio=0.8)
    _write(root, "targets/s0", method="jactus", data="cifar10", seed=0, acc=84.0, budget=0.8, ratio=0.84)
    summary = json.loads((root / "targets/s0/summary.json").read_text())
    (root / "targets/s0/summary.json").write_text(json.dumps({**summary, "budget_scope": "targets"}))
    _write(root, "old/s1", method="jactus", data="cifar10", seed=1, acc=86.0, budget=0.8, ratio=0.84)
    (root / "old/s1/.hydra").mkdir()
    (root / "old/s1/.hydra/config.yaml").write_text("budget:\n  scope: targets\n  ratio: 0.8\n")
    assert report.main([str(root), "--out", str(tmp_path / "out"), "--gaps", "jactus@0.8 (scope=targets):jactus@0.8"]) == 0
    (table,) = report.build_tables(report.results_frame(report.load_summaries([root])[0]))
    assert table.rows == ["jactus@0.8", "jactus@0.8 (scope=targets)"]
    assert sorted(table.cell("jactus@0.8 (scope=targets)", "cifar10").values) == [84.0, 86.0]
    assert table.cell("jactus@0.8", "cifar10").values == [80.0]
    assert "| jactus@0.8 (scope=targets) | jactus@0.8 | +4.00 |" in (tmp_path / "out" / "report.md").read_text()
    assert "seeds run more than once" not in capsys.readouterr().out


def test_a_budget_in_bytes_is_its_own_row_and_the_bytes_column_shows_where_runs_record_it(tmp_path):
    """budget.unit=bytes at 0.8 is another model than 0.8 of the parameters: its own row, "(bytes)"; the table gains
    a bytes column (mean bytes_ratio) once any run records its stored bytes, and older runs show as missing there."""
    root = tmp_path / "units"
    _write(root, "params/s0", method="taco", data="cifar10", seed=0, acc=80.0, budget=0.8, ratio=0.8)
    _write(root, "bytes/s0", method="taco", data="cifar10", seed=0, acc=78.0, budget=0.8, ratio=0.72)
    _write(root, "bytes/s1", method="taco", data="cifar10", seed=1, acc=79.0, budget=0.8, ratio=0.72)
    for name, ratio in (("bytes/s0", 0.79), ("bytes/s1", 0.8)):
        summary = json.loads((root / name / "summary.json").read_text())
        summary.update(budget_unit="bytes", bytes_ratio=ratio, bytes_deployed=int(4000 * ratio))
        (root / name / "summary.json").write_text(json.dumps(summary))
    (table,) = report.build_tables(report.results_frame(report.load_summaries([root])[0]))
    assert table.rows == ["taco@0.8", "taco@0.8 (bytes)"]
    frame = table.to_frame().to_dict(orient="index")
    assert frame["taco@0.8 (bytes)"]["Bytes (%)"] == "79.5" and frame["taco@0.8 (bytes)"]["Params (%)"] == "72.0"
    assert frame["taco@0.8"]["Bytes (%)"] == "—"
    assert "Bytes (%)" not in report.build_tables(report.results_frame(report.load_summaries([root / "params"])[0]))[
        0].all_columns
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0  # the figure against bytes is drawn too
    assert (tmp_path / "out" / "acc_vs_bytes.png").stat().st_size > 0
    assert "acc_vs_bytes.png" in (tmp_path / "out" / "report.md").read_text()
    assert report.main([str(root / "params"), "--out", str(tmp_path / "params_only")]) == 0
    assert not (tmp_path / "params_only" / "acc_vs_bytes.png").exists()  # no run recorded its bytes


def test_rank_heatmap_rows_follow_the_table(tmp_path, monkeypatch):
    """Heatmap rows come in table order (budget 0.8 before 0.6, seeds numerically), not in file order."""
    root = tmp_path / "maps"
    for name, budget, seed in [("a", 0.6, 10), ("b", 0.8, 2), ("c", 0.6, 2), ("d", 0.8, 0)]:
        _write(root, name, method="jactus", data="cifar10", seed=seed, acc=80.0, budget=budget, ratio=budget,
               rank_map={"blocks.0.fc1": 8})
    import matplotlib.axes

    labels, original = [], matplotlib.axes.Axes.set_yticks

    def recording(self, ticks, names=None, **kwargs):
        labels.extend(names or [])
        return original(self, ticks, names, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_yticks", recording)
    report.plot_rank_heatmap(report.load_summaries([root])[0], tmp_path / "heat.png")
    assert labels == ["jactus@0.8 · cifar10 · s0", "jactus@0.8 · cifar10 · s2", "jactus@0.6 · cifar10 · s2",
                      "jactus@0.6 · cifar10 · s10"]


def test_a_loss_metric_bolds_the_lowest_mean(tmp_path):
    """--metric test/nll: the best row of a column is the one with the lowest loss, not the highest."""
    root = tmp_path / "sweep"
    for method, nll in (("lora", 0.9), ("jactus", 0.7)):
        _write(root, method, method=method, data="cifar10", seed=0, metrics={"test/acc": 90.0, "test/nll": nll})
    (table,) = report.build_tables(report.results_frame(report.load_summaries([root])[0], "test/nll"))
    assert table.lower_is_better and table.best("cifar10") == {"jactus"}
    (by_acc,) = report.build_tables(report.results_frame(report.load_summaries([root])[0], "test/acc"))
    assert not by_acc.lower_is_better and by_acc.best("cifar10") == {"lora", "jactus"}
    assert report.lower_is_better("val/loss_piqa") and not report.lower_is_better("test/acc_piqa")


def test_console_results_table_shows_accuracies_then_the_overall_nll(capsys):
    from jactus.utils.tables import print_results_table

    metrics = {"test/nll_piqa": 1.5, "test/nll": 1.25, "test/acc_piqa": 60.0, "test/acc": 55.0, "test/loss": 9.0}
    print_results_table("t", [("after", metrics)])
    header = next(line for line in capsys.readouterr().out.splitlines() if "stage" in line)
    columns = header.replace("┃", " ").split()
    assert columns == ["stage", "acc", "acc_piqa", "nll"]


# ---- per-item results and paired bootstrap intervals ----------------------------------------------------------


def test_items_file_round_trip(tmp_path):
    from jactus.summary import ITEMS_FILE, read_items, write_items

    records = [{"split": "test", "task": "piqa", "index": 0, "correct": True, "nll": 0.5},
               {"split": "val", "task": "boolq", "index": 3, "correct": False, "nll": 1.25}]
    path = write_items(tmp_path / "run", records)
    assert path.name == ITEMS_FILE and read_items(path) == records and read_items(tmp_path / "run") == records
    with pytest.raises(ValueError, match="expected"):
        write_items(tmp_path, [{"split": "test", "task": "piqa"}])


def _differences(correct_ref, correct_other, task="piqa"):
    import numpy as np

    return {task: 100.0 * (np.asarray(correct_ref, float) - np.asarray(correct_other, float))}


def test_bootstrap_interval_contains_the_gap_and_shrinks_with_more_items():
    import numpy as np

    from jactus.report.bootstrap import paired_bootstrap

    rng = np.random.default_rng(1)
    widths = []
    for items in (50, 800):
        ref = rng.random(items) < 0.6
        other = np.where(rng.random(items) < 0.8, ref, ~ref)  # agree on most items
        interval = paired_bootstrap({0: _differences(ref, other)})
        assert interval.low <= interval.observed <= interval.high and interval.items == items
        assert interval.observed == pytest.approx(100.0 * (ref.mean() - other.mean()))
        widths.append(interval.high - interval.low)
    assert widths[1] < widths[0] / 2
    same = rng.random(100) < 0.5
    agree = paired_bootstrap({0: _differences(same, same), 1: _differences(same[:50], same[:50])})
    assert (agree.low, agree.high, agree.seeds) == (0.0, 0.0, 2)
    assert paired_bootstrap({0: _differences(same, same)}) == paired_bootstrap({0: _differences(same, same)})
    assert paired_bootstrap({}) is None


def _write_items(root, name, records):
    from jactus.summary import write_items

    write_items(root / name, [{"split": "test", "task": task, "index": index, "correct": bool(correct), "nll": 1.0}
                              for task, index, correct in records])


def test_gaps_carry_paired_bootstrap_intervals_and_item_counts(tmp_path):
    """Two seeds x two tasks x 40 items; jactus is right on every item lora gets right plus 4 (piqa) / 0 (boolq)."""
    root = tmp_path / "items"
    for seed in (0, 1):
        runs = {"j": [], "l": []}
        for task, extra in (("piqa", 4), ("boolq", 0)):
            for index in range(40):
                lora = index % 2 == 0
                runs["l"].append((task, index, lora))
                runs["j"].append((task, index, lora or index < 2 * extra and index % 2 == 1))
        for name, method in (("j", "jactus"), ("l", "lora")):
            accs = {task: 100.0 * sum(c for t, _, c in runs[name] if t == task) / 40 for task in ("piqa", "boolq")}
            metrics = {"test/acc": sum(accs.values()) / 2, **{f"test/acc_{t}": a for t, a in accs.items()}}
            _write(root, f"{name}/s{seed}", method=method, data="commonsense8", seed=seed, budget=0.8 if
                   method == "jactus" else None, ratio=0.8, model="llama", metrics=metrics)
            _write_items(root, f"{name}/s{seed}", runs[name])
    _write(root, "l_old/s2", method="lora", data="commonsense8", seed=2, model="llama",
           metrics={"test/acc": 50.0, "test/acc_piqa": 50.0, "test/acc_boolq": 50.0})  # an old run: no items
    _write(root, "j_old/s2", method="jactus", data="commonsense8", seed=2, budget=0.8, ratio=0.8, model="llama",
           metrics={"test/acc": 55.0, "test/acc_piqa": 60.0, "test/acc_boolq": 50.0})
    rep = report.write_report(root, tmp_path / "out", gaps=["jactus@0.8:lora"])
    (gaps,) = rep.gaps
    piqa, boolq, average = (gaps.intervals[("jactus@0.8", "lora", c)] for c in ("piqa", "boolq", "Avg."))
    assert piqa.observed == pytest.approx(10.0) and piqa.low <= 10.0 <= piqa.high and piqa.low > 0
    assert (piqa.seeds, piqa.items) == (2, 40) and (average.seeds, average.items) == (2, 80)
    assert (boolq.low, boolq.high, boolq.observed) == (0.0, 0.0, 0.0)  # the methods agree on every item
    assert average.observed == pytest.approx(5.0) and average.low <= 5.0 <= average.high
    assert average.high - average.low < piqa.high - piqa.low  # twice the items
    assert gaps.without_items == ["jactus@0.8 (seed 2)", "lora (seed 2)"]
    assert gaps.text("jactus@0.8", "lora", "boolq").endswith("[+0.00, +0.00] (n=40 x 2)")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "95% paired bootstrap interval (1000 resamples" in markdown
    assert "No per-item results (items.jsonl.gz) for: jactus@0.8 (seed 2), lora (seed 2)" in markdown
    assert "| lora | ? | ? | ? |" in markdown  # item counts: seed 2 has no items file
    records = pd.read_csv(tmp_path / "out" / "gaps.csv")
    row = records[records["column"] == "piqa"].iloc[0]
    assert row["ci_seeds"] == 2 and row["ci_items"] == 40 and row["ci_low"] == pytest.approx(piqa.low)
    (root / "l_old").rename(tmp_path / "l_old")  # without the old runs every cell's count is known
    (root / "j_old").rename(tmp_path / "j_old")
    report.write_report(root, tmp_path / "out2", gaps=["jactus@0.8:lora"])
    markdown = (tmp_path / "out2" / "report.md").read_text()
    assert "| jactus@0.8 | 40 x 2 | 40 x 2 | 80 x 2 |" in markdown and "No per-item results" not in markdown


def test_gaps_without_item_files_say_so(sweep, tmp_path):
    rep = report.write_report(sweep, tmp_path / "out", gaps=["jactus@0.8:lora"])
    assert all(interval is None for interval in rep.gaps[0].intervals.values())
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Items per cell: unknown (no run of this table wrote per-item results, items.jsonl.gz)" in markdown
    assert "No per-item results (items.jsonl.gz) for: jactus@0.8 (seed 0), lora (seed 0)" in markdown
    assert "[" not in markdown[markdown.index("### Gaps"):].split("\n\n")[2]  # no interval in the gap table


def test_gap_labels_of_rows_split_by_several_keys_keep_their_commas():
    ref, others = report.parse_gaps("jactus@0.8 (method.rho=0, calib.num_samples=512):"
                                    "jactus@0.8 (method.rho=0.25, calib.num_samples=128),lora")
    assert ref == "jactus@0.8 (method.rho=0, calib.num_samples=512)"
    assert others == ["jactus@0.8 (method.rho=0.25, calib.num_samples=128)", "lora"]
    assert report.parse_gaps("a:b, c") == ("a", ["b", "c"])


def test_latency_axis_reads_the_inference_bench_and_maps_each_row_to_what_it_deploys(tmp_path, capsys):
    from jactus.report.latency import load_latency, row_latency

    root = tmp_path / "lat"
    _write(root, "lora/s0", method="lora", data="piqa", seed=0, acc=70.0, model="llm")
    _write(root, "jactus/s0", method="jactus", data="piqa", seed=0, acc=66.0, budget=0.8, ratio=0.8, model="llm")
    _write(root, "jactus6/s0", method="jactus", data="piqa", seed=0, acc=60.0, budget=0.6, ratio=0.6, model="llm")
    _write(root, "taco/s0", method="taco", data="piqa", seed=0, acc=68.0, budget=0.8, ratio=0.8, model="llm")
    _write(root, "cersa/s0", method="cersa", data="piqa", seed=0, acc=61.0, budget=0.7, ratio=0.7, model="llm")
    bench = {"causal_lm": {"vs_dense": {"dense": {"prefill_b8": 1.0, "decode_b1": 1.0},
                                        "jactus_0.8": {"prefill_b8": 1.25, "decode_b1": 1.1},
                                        "jactus_0.6": {"prefill_b8": 1.6, "decode_b1": 1.3},
                                        "taco_0.8_best": {"prefill_b8": 0.8, "decode_b1": 1.0}}},
             "vision": {"vs_dense": {"dense": {"images_b8": 1.0}}}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    measure, speed = load_latency(path)
    assert measure == "prefill_b8"
    assert row_latency("lora", speed) == 100.0 and row_latency("jactus@0.8", speed) == 80.0
    assert row_latency("taco@0.8", speed) == 125.0  # a TACO row: its fastest format
    assert row_latency("taco@0.8 (bytes)", speed) is None  # another footing: not what the bench measured
    assert row_latency("jactus+shared@0.6", speed) == 62.5  # a low-rank row: the factors at its budget
    assert row_latency("cersa@0.7", speed) is None  # no format measured at 0.7
    assert report.main([str(root), "--out", str(tmp_path / "out"), "--latency", str(path)]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "acc_vs_latency.png").stat().st_size > 0 and "acc_vs_latency.png" in text
    assert "No measured format for: cersa@0.7" in text
    assert report.main([str(root), "--out", str(tmp_path / "bad"), "--latency", str(path),
                        "--latency-measure", "decode_b8"]) == 1
    assert "decode_b8" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_item_counts_are_missing_where_the_cell_is(tmp_path):
    """A row run on one dataset only: its other dataset's cell and its average are missing, so are their counts."""
    from jactus.report.items import count_text

    root = tmp_path / "partial"
    _write(root, "l/a", method="lora", data="mnist", seed=0, acc=90.0)
    _write(root, "l/b", method="lora", data="fashion", seed=0, acc=80.0)
    _write(root, "t/b", method="taco", data="fashion", seed=0, acc=70.0, budget=0.8, ratio=0.8)
    for name, data in (("l/a", "mnist"), ("l/b", "fashion"), ("t/b", "fashion")):
        _write_items(root, name, [(data, index, index % 2) for index in range(10)])
    (table,) = report.build_tables(report.results_frame(report.load_summaries([root])[0]))
    assert count_text(table, "taco@0.8", "fashion") == "10 x 1"
    assert count_text(table, "taco@0.8", "mnist") == count_text(table, "taco@0.8", "Avg.") == "—"
    assert count_text(table, "lora", "Avg.") == "20 x 1"


def _curve_run(root, name, *, method, seed, correct, budget=None, unit=None):
    """A run on two tasks x 40 items whose item `i` of each task is right where `correct(i)` holds."""
    records = [(task, index, correct(index)) for task in ("piqa", "boolq") for index in range(40)]
    accs = {task: 100.0 * sum(c for t, _, c in records if t == task) / 40 for task in ("piqa", "boolq")}
    nlls = {task: 2.0 - accs[task] / 50 for task in accs}  # an item's nll: 0 where right, 2 where wrong
    metrics = {"test/acc": sum(accs.values()) / 2, **{f"test/acc_{t}": a for t, a in accs.items()},
               "test/nll": sum(nlls.values()) / 2, **{f"test/nll_{t}": v for t, v in nlls.items()}}
    _write(root, name, method=method, data="commonsense8", seed=seed, budget=budget, ratio=budget or 1.0,
           model="llama", metrics=metrics)
    if unit is not None:
        path = root / name / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "budget_unit": unit}))
    from jactus.summary import write_items

    write_items(root / name, [{"split": "test", "task": task, "index": index, "correct": correct,
                               "nll": 0.0 if correct else 2.0} for task, index, correct in records])


def test_budget_curves_say_where_each_method_meets_the_reference_and_which_is_best(tmp_path):
    """lora is right on the even items; jactus equals it at 0.6 and 0.9 but loses 8 of its items a task at 0.8 (so it
    meets lora from 0.9 only: a budget that touches zero below a measured loss is no crossing); taco (bytes) at 0.8
    gets 4 more items a task than lora."""
    root = tmp_path / "curves"
    even = lambda i: i % 2 == 0  # noqa: E731
    for seed in (0, 1):
        _curve_run(root, f"lora/s{seed}", method="lora", seed=seed, correct=even)
        for budget in (0.6, 0.9):
            _curve_run(root, f"j{budget}/s{seed}", method="jactus", seed=seed, budget=budget, correct=even)
        _curve_run(root, f"j0.8/s{seed}", method="jactus", seed=seed, budget=0.8,
                   correct=lambda i: even(i) and i >= 16)
        _curve_run(root, f"t0.8/s{seed}", method="taco", seed=seed, budget=0.8, unit="bytes",
                   correct=lambda i: even(i) or i < 8)
    out = tmp_path / "out"
    rep = report.write_report(root, out, curves=["lora"], resamples=200)
    (curve,) = rep.curves
    assert curve.rows == {"jactus": {0.9: "jactus@0.9", 0.8: "jactus@0.8", 0.6: "jactus@0.6"},
                          "taco (bytes)": {0.8: "taco@0.8 (bytes)"}}
    assert curve.crossing("jactus") == (0.9, True) and curve.crossing("taco (bytes)") == (0.8, True)
    assert curve.meets("jactus@0.6") == (True, True) and curve.meets("jactus@0.8") == (False, True)
    assert curve.best[0.8] == ("taco (bytes)", "jactus") and curve.best[0.6] == ("jactus", None)
    gap = curve.gaps.intervals[("taco@0.8 (bytes)", "jactus@0.8", "Avg.")]
    assert gap.observed == pytest.approx(30.0) and gap.low > 0  # +10 points over lora, jactus 20 under
    markdown = (out / "report.md").read_text()
    assert "### Budget curves against lora (Avg.)" in markdown
    assert "| jactus | 50.00 (+0.00 [+0.00, +0.00]) | 30.00 (-20.00 [" in markdown
    assert "Meets lora (the interval of the gap reaches zero, at that budget and every larger one run): jactus from " \
           "0.9; taco (bytes) from 0.8." in markdown
    assert "- 0.8: taco (bytes): +30.00 ± 0.00 [" in markdown and "- 0.6: jactus (alone)" in markdown
    records = pd.read_csv(out / "curves.csv")
    assert len(records) == 4 and records["meets_from"].tolist() == [0.9, 0.9, 0.9, 0.8]
    assert records.set_index("row").loc["jactus@0.8", "gap"] == pytest.approx(-20.0)
    # a loss: the lowest is the best, a gap in the line's favour is negative
    nll = report.write_report(root, tmp_path / "nll", metric="test/nll", curves=["lora"], resamples=200).curves[0]
    assert nll.crossing("jactus") == (0.9, True) and nll.crossing("taco (bytes)") == (0.8, True)
    assert nll.meets("jactus@0.8") == (False, True) and nll.best[0.8] == ("taco (bytes)", "jactus")
    assert nll.gaps.gap("taco@0.8 (bytes)", "lora", "Avg.") == pytest.approx(-0.2)
    # its figures are named after the metric, not accuracy
    assert (tmp_path / "nll" / "nll_vs_params.png").stat().st_size > 0
    assert not (tmp_path / "nll" / "acc_vs_params.png").exists()
    assert "![nll vs retained parameters](nll_vs_params.png)" in (tmp_path / "nll" / "report.md").read_text()


def test_budget_curves_rank_lines_on_the_seeds_they_share(tmp_path):
    """At 0.8 jactus beats taco on seed 0, the one seed both ran; taco's extra seed 1 is far better, so its own mean
    is the higher one. The best line is the one ahead on the shared seed, and the text says which seeds ranked."""
    root = tmp_path / "curves"
    even = lambda i: i % 2 == 0  # noqa: E731
    _curve_run(root, "lora/s0", method="lora", seed=0, correct=even)
    _curve_run(root, "j/s0", method="jactus", seed=0, budget=0.8, correct=even)
    _curve_run(root, "t/s0", method="taco", seed=0, budget=0.8, correct=lambda i: even(i) and i >= 8)
    _curve_run(root, "t/s1", method="taco", seed=1, budget=0.8, correct=lambda i: True)
    out = tmp_path / "out"
    (curve,) = report.write_report(root, out, curves=["lora"], resamples=200).curves
    assert curve.mean("taco@0.8") > curve.mean("jactus@0.8")  # 65 against 50 on own seeds
    assert curve.best[0.8] == ("jactus", "taco") and curve.ranked_on[0.8] == [0]
    assert "- 0.8: jactus: +10.00 [" in (out / "report.md").read_text()
    assert "ranked on seed(s) 0, shared by all" in (out / "report.md").read_text()
    # no shared seed: each line's own mean ranks, and the text says so
    (root / "j" / "s0").rename(root / "j" / "s2")
    summary = root / "j" / "s2" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "seed": 2}))
    (curve,) = report.write_report(root, tmp_path / "apart", curves=["lora"], resamples=200).curves
    assert curve.best[0.8] == ("taco", "jactus") and curve.ranked_on[0.8] is None
    assert "they share none" in (tmp_path / "apart" / "report.md").read_text()


@pytest.mark.parametrize("reference, message", [("dora", "is a row of no table"),
                                                ("jactus@0.8", "the reference is a row without a budget")])
def test_budget_curves_need_a_dense_reference_row(reference, message, tmp_path, capsys):
    root = tmp_path / "c"
    for name, method, budget in (("l", "lora", None), ("j", "jactus", 0.8)):
        _curve_run(root, name, method=method, seed=0, budget=budget, correct=lambda i: i % 2 == 0)
    assert report.main([str(root), "--out", str(tmp_path / "out"), "--curves", reference]) == 1
    err = capsys.readouterr().err
    assert message in err and "lora" in err


def test_average_panels_draw_one_panel_per_table_with_dense_rows_as_reference_lines(sweep, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = {"panels": 0, "references": []}
    original_subplots, original_axhline = report.plots._figure, Axes.axhline

    def figure(width, height):
        fig = original_subplots(width, height)
        subplots = fig.subplots

        def counting(nrows=1, ncols=1, **kwargs):
            drawn["panels"] = max(drawn["panels"], nrows * ncols)
            return subplots(nrows, ncols, **kwargs)

        fig.subplots = counting
        return fig

    def axhline(self, y=0, *args, **kwargs):
        drawn["references"].append((kwargs.get("label"), y))
        return original_axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(report.plots, "_figure", figure)
    monkeypatch.setattr(Axes, "axhline", axhline)
    assert report.main([str(sweep), "--out", str(tmp_path / "out"), "--panels", "average"]) == 0
    assert drawn["panels"] == 1 and drawn["references"] == [("lora", 86.0)]  # lora's average; jactus is a curve
    with pytest.raises(SystemExit):
        report.main([str(sweep), "--panels", "tasks"])


def test_before_tables_the_compressed_start_without_intervals(tmp_path, capsys):
    """--before reads metrics_before.method; runs that have none (LoRA here) drop out, and the per-item files (the
    fine-tuned model's) give no interval or count."""
    root = tmp_path / "before"
    for seed in (0, 1):
        _curve_run(root, f"lora/s{seed}", method="lora", seed=seed, correct=lambda i: i % 2 == 0)
        _curve_run(root, f"j/s{seed}", method="jactus", seed=seed, budget=0.8, correct=lambda i: i % 2 == 0)
        path = root / f"j/s{seed}" / "summary.json"
        start = {"test/acc": 30.0 + seed, "test/acc_piqa": 20.0 + seed, "test/acc_boolq": 40.0 + seed}
        path.write_text(json.dumps({**json.loads(path.read_text()), "metrics_before": {"method": start}}))
    rep = report.write_report(root, tmp_path / "out", before=True, gaps=["jactus@0.8:jactus@0.8"])
    (table,) = rep.tables
    assert table.rows == ["jactus@0.8"] and table.cell("jactus@0.8", "Avg.").mean == pytest.approx(30.5)
    assert rep.gaps[0].intervals == {} and rep.gaps[0].without_items == []
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.startswith("# Sweep report: test/acc before fine-tuning")
    assert "these values carry no interval" in markdown
    assert report.main([str(root), "--out", str(tmp_path / "c"), "--before", "--curves", "lora"]) == 1
    assert "'lora' is a row of no table" in capsys.readouterr().err
    after = report.write_report(root, tmp_path / "after")
    assert after.tables[0].rows == ["lora", "jactus@0.8"]  # without --before the fine-tuned metrics, as always
    (root / "j").rename(tmp_path / "j")
    assert report.main([str(root), "--out", str(tmp_path / "none"), "--before"]) == 1
    assert "evaluate_before=true" in capsys.readouterr().err
