"""Each benchmark script runs end to end at toy size and writes the keys results.json needs (no timing asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.slow


def test_compress_llama_toy(tmp_path):
    import compress_llama

    record = compress_llama.main(["--scale", "toy", "--no-floor", "--max-stats-gb", "0.003", "--out",
                                  str(tmp_path / "c.json")])
    assert record["scale"] == "toy-scale"
    assert {"phase1_calibrate", "phase1_spectra", "plan", "phase2_calibrate", "phase2_factorize", "swap"} == \
        set(record["stages_s"])
    assert record["passes"] > 1 and max(record["pass_stats_gb"]) <= 0.003
    assert record["wall_s"] > 0 and "by_op" in record["linalg"]
    assert 0.7 < record["plan"]["ratio"] <= 0.8
    estimate = record["gpu_estimate"]
    assert "not a measurement" in estimate["label"] and estimate["passes"] >= 2
    assert estimate["wall_s"] == round(sum(estimate["seconds"].values()), 1)


def test_train_throughput_toy(tmp_path):
    import train_throughput

    record = train_throughput.main(["--scale", "toy", "--families", "causal_lm", "--ranks", "structure",
                                    "--out", str(tmp_path / "t.json")])
    assert set(record["train_tokens_per_s"]) == set(train_throughput.METHODS)
    assert set(record["train_peak_gb"]) == set(train_throughput.METHODS)
    assert set(record["causal_lm"]["ratios"]) >= {"jactus_0.8_vs_lora", "jactus_0.8_peak_vs_full_ft"}


def test_infer_throughput_toy(tmp_path):
    import infer_throughput

    record = infer_throughput.main(["--scale", "toy", "--families", "causal_lm", "--ranks", "structure",
                                    "--out", str(tmp_path / "i.json")])
    for key in ("infer_throughput", "infer_latency_ms", "infer_param_bytes"):
        assert set(record[key]) == {"dense", "jactus_0.8", "jactus_0.6"}
    assert record["infer_param_bytes"]["jactus_0.6"] < record["infer_param_bytes"]["dense"]


def test_run_all_report_from_records(tmp_path):
    import run_all

    records = {"compress": {"wall_s": 1.0, "stages_s": {"calibrate": 1.0}, "memory": {"peak_rss_gb": 1.0}},
               "train": {"train_tokens_per_s": {"lora": 1.0}, "train_peak_gb": {"lora": 1.0}},
               "infer": {"infer_throughput": {"dense": 1.0}}, "fsdp_smoke": {"ok": True}}
    summary = run_all.summarise("toy", records)
    for key in ("compress_7b_wall_s", "compress_7b_peak_gpu_gb", "compress_7b_stages", "train_tokens_per_s",
                "train_peak_gb", "infer_throughput", "infer_latency_ms", "device", "date", "scale", "shapes"):
        assert key in summary
    assert summary["scale"] == "toy-scale"
    json.dumps(summary)
    assert "toy-scale" in run_all.report(summary)


def test_qa_scoring_toy(tmp_path):
    import qa_scoring

    record = qa_scoring.main(["--scale", "toy", "--max-length", "64", "--out", str(tmp_path / "q.json")])
    assert record["scale"] == "toy-scale" and record["setup"]["questions"] == 16
    assert set(record["median_s"]) == {"full", "shared_prefix"} and record["speedup"] > 0
    assert record["max_abs_score_diff"] < 1e-5 and record["same_predictions"]


def test_infer_real_toy(tmp_path):
    import infer_real

    record = infer_real.main(["--scale", "toy", "--cache-dir", str(tmp_path / "cache"), "--out",
                              str(tmp_path / "r.json")])
    assert record["scale"] == "toy-scale" and record["threads"] >= 1
    assert {"load_1min_before", "load_1min_after", "torch", "date", "device"} <= set(record)
    variants = {"dense", "jactus_0.9", "jactus_0.8", "jactus_0.6", "taco_0.8_zeros", "taco_0.8_csr", "taco_2:4_zeros"}
    for family, measurements in (("causal_lm", {"prefill_b1", "prefill_b2", "decode_b1"}),
                                 ("vision", {"images_b2"})):
        result = record[family]
        expected = variants | ({"jactus+shared_0.8"} if family == "causal_lm" else set())  # gate/up: the LM's
        assert set(result["variants"]) == expected and set(result["vs_dense"]) == expected | {"taco_0.8_best"}
        assert all(set(ratios) == measurements and min(ratios.values()) > 0 for ratios in result["vs_dense"].values())
        assert set(result["vs_dense"]["dense"].values()) == {1.0}
        info = result["variants"]
        assert info["taco_0.8_csr"]["rel_diff_vs_taco_0.8_zeros"] < 1e-4  # the CSR forward is the same function
        assert info["jactus_0.6"]["memory_bytes"] < info["jactus_0.8"]["memory_bytes"] < info["dense"]["memory_bytes"]
        assert 0.75 < info["taco_0.8_zeros"]["params_ratio"] <= 0.8 and info["taco_2:4_zeros"]["density"] == 0.5
        assert all({"load_gb", "peak_gb"} <= set(entry["memory"]) for entry in info.values())
    compact = tmp_path / "cache" / "llama_tiny_test-synthetic_qa-calib8" / "jactus" / "budget_0.6"
    assert (compact / "model.safetensors").is_file()
    shared = json.loads((compact.parent.parent / "jactus_shared" / "budget_0.8" / "summary.json").read_text())
    plain = json.loads((compact.parent / "budget_0.8" / "summary.json").read_text())
    assert shared["shared_bases"] and "shared_bases" not in plain  # the plain rows keep per-layer bases
