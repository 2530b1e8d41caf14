"""`collect`: the output folders of one or several runs into the repository's results, and the table's report.

Stage a -> experiments/results/gpu_llama/:
- runs/{table,lr_search}/<name>/: summary.json, items.jsonl.gz, .hydra/{config,overrides}.yaml of every run that wrote a
  summary; a run of a later output replaces one of the same name, unless the earlier one finished and it did not;
- lr_choice.json: the rates of the latest output that chose some;
- collected/<n>_<date>/: each output's status.json, jobs.json, lr_choice.json and report command (an output whose
  run_id is already there is skipped, so collecting the same folder twice changes nothing);
- table/: jactus-report over every collected table run, its gaps limited to the rows present.
Stages b-d -> experiments/bench/out/<record>_<scale>.json, and results.json / RESULTS.md with those figures at the top
level and the CPU-scale summary kept under `cpu_scale`.

`table` is also what stage a runs on the node (in a child that sees the carried wheels): both use jactus-report's
own row labels (jactus.report.load.row_label) to limit the gaps to the rows that ran.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tarfile
from pathlib import Path

from .common import COMMAND, ROOT, CheckError

# The report's gaps: JACTUS at each budget against the rows of the same size or the full-size adapters.
GAPS = ("jactus@0.8:lora,dora,compress_then_adapt@0.8,tunecomp@0.8,zero_shot,jactus@0.8 (scope=targets)",
        "jactus@0.6:compress_then_adapt@0.6,tunecomp@0.6")
BENCH_RECORDS = {"b": {"compress": "compress"}, "c": {"train": "train", "infer": "infer"},
                 "d": {"fsdp_fsdp2": "fsdp_smoke", "fsdp_fsdp1": "fsdp1"}}  # stage -> {file in <stage>.tar.gz: key}


def gap_specs(table_runs: Path) -> list[str] | None:
    """GAPS limited to the rows that have a run under `table_runs` (jactus-report fails on a label with no row);
    None when there is no run at all."""
    from jactus.report.load import load_summaries, row_label

    summaries = load_summaries(table_runs)[0] if table_runs.is_dir() else []
    labels = {row_label(summary) for summary in summaries}
    if not labels:
        return None
    specs = []
    for spec in GAPS:
        reference, others = spec.split(":")
        present = [other for other in others.split(",") if other in labels]
        if reference in labels and present:
            specs.append(f"{reference}:{','.join(present)}")
    return specs


def write_table(table_runs: Path, out: Path, command_file: Path | None = None) -> list[str] | None:
    """jactus-report over `table_runs` into `out` (and the equivalent jactus-report command into `command_file`)."""
    from jactus.report.cli import write_report

    specs = gap_specs(table_runs)
    if specs is None:
        return None
    write_report([table_runs], out, gaps=specs)
    if command_file is not None:
        gaps = [arg for spec in specs for arg in ("--gaps", spec)]
        command_file.write_text(shlex.join(["jactus-report", str(table_runs), "--out", str(out), *gaps]) + "\n")
    return specs


def read_outputs(folders: list[Path]) -> list[tuple[Path, dict]]:
    """(folder, status) of each run's output folder, oldest run first."""
    outputs = []
    for folder in folders:
        if not (folder / "status.json").is_file():
            raise CheckError(f"collect: no status.json in {folder}: give the --out folder of a `{COMMAND} run`")
        outputs.append((folder, json.loads((folder / "status.json").read_text())))
    if len({status["dry_run"] for _, status in outputs}) > 1:
        raise CheckError("collect: dry-run and GPU outputs do not mix; collect them into different places")
    return sorted(outputs, key=lambda output: output[1].get("started", output[1]["date"]))


def collect(folders: list[Path], dest: Path, bench: Path) -> None:
    outputs = read_outputs(folders)
    collected = dest / "collected"
    known = {json.loads(path.read_text()).get("run_id") for path in collected.glob("*/status.json")}
    records, record_date, table_changed = {}, None, False
    for folder, status in outputs:
        if status.get("run_id") in known:
            print(f"collect: {folder} (run {status['run_id']}) is already in {collected}; skipped")
            continue
        if (folder / "a.tar.gz").is_file():
            collect_table_runs(folder, status, dest, collected)
            table_changed = True
        for stage, names in BENCH_RECORDS.items():
            found = read_bench_records(folder / f"{stage}.tar.gz", names)
            records.update(found)
            record_date = status["date"] if found else record_date
    if table_changed:
        specs = write_table(dest / "runs" / "table", dest / "table")
        runs = len(list((dest / "runs" / "table").glob("*"))) if (dest / "runs" / "table").is_dir() else 0
        print(f"collect: stage a -> {dest} (table over {runs} runs, gaps {specs})")
    if records:
        scale = "toy" if outputs[0][1]["dry_run"] else "gpu"
        for key, record in records.items():
            target = bench / "out" / f"{key}_{scale}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(record, indent=2) + "\n")
        merge_bench(bench, scale, records, record_date)


def collect_table_runs(folder: Path, status: dict, dest: Path, collected: Path) -> None:
    """One output's a.tar.gz: its runs into dest/runs, its records into collected/<n>_<date>/."""
    unpacked = dest.parent / f".{dest.name}.unpack"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(folder / "a.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    record = collected / f"{len(list(collected.glob('*')))}_{status['date']}"
    record.mkdir(parents=True)
    for kind in ("table", "lr_search"):
        for run in sorted((unpacked / "runs" / kind).glob("*")) if (unpacked / "runs" / kind).is_dir() else []:
            copy_run(run, dest / "runs" / kind / run.name)
    for name in ("lr_choice.json", "jobs.json", "report_command.txt"):
        if (unpacked / name).is_file():
            shutil.copy2(unpacked / name, record / name)
    shutil.copy2(folder / "status.json", record / "status.json")
    rates = unpacked / "lr_choice.json"
    if rates.is_file() and json.loads(rates.read_text()):
        shutil.copy2(rates, dest / "lr_choice.json")
    shutil.rmtree(unpacked)


def finished(run: Path) -> bool:
    summary = run / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "ok"


def copy_run(run: Path, target: Path) -> None:
    """A run's summary, per-item results (the gaps' bootstrap) and config; no logs, CSV metrics or weights."""
    if not (run / "summary.json").is_file() or (finished(target) and not finished(run)):
        return
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("csv", "*.log", "compact", "hydra.yaml"))


def read_bench_records(archive: Path, names: dict) -> dict:
    """{key: record} of the bench records in one stage's archive."""
    if not archive.is_file():
        return {}
    records = {}
    with tarfile.open(archive) as tar:
        for member, key in names.items():
            try:
                data = tar.extractfile(f"{member}.json")
            except KeyError:
                continue
            records[key] = json.loads(data.read())
    return records


def merge_bench(bench: Path, scale: str, records: dict, date: str) -> None:
    """results.json and RESULTS.md from the collected bench records (run_all's summary and report), the CPU-scale
    summary and report kept below them."""
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    import run_all

    for key in ("compress", "train", "infer"):
        records.setdefault(key, {"failed": True, "error": ["not in the collected outputs"]})
    records.setdefault("fsdp_smoke", {})
    summary = run_all.summarise(scale, records)
    summary["date"] = date
    summary["fsdp"] = {"fsdp2_gpu": records.get("fsdp_smoke"), "fsdp1_gpu": records.get("fsdp1")}
    summary["gpu_commands"] = [f"{COMMAND} run  (experiments/gpu/README.md)"]
    results = bench / "results.json"
    previous = json.loads(results.read_text()) if results.is_file() else {}
    cpu = previous.get("cpu_scale") or (previous if previous.get("scale") == "cpu-scale" else None)
    if cpu:
        summary["cpu_scale"] = cpu
    results.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    rendered = run_all.report({**summary, "fsdp": {"fsdp2_cpu_gloo": records.get("fsdp_smoke"), "fsdp1_cpu": ""}})
    head, _, tail = rendered.partition("## 4. FSDP")
    lines = [head + "## 4. FSDP (Lightning, devices=1)", ""]
    for key, record in summary["fsdp"].items():
        record = record or {}
        lines.append(f"- {key}: {'ok' if record.get('ok') else 'FAILED or not run'}; {record.get('strategy')}; steps "
                     f"{record.get('steps')}; trainable changed {record.get('trainable_changed')}, frozen changed "
                     f"{record.get('frozen_changed')}")
    lines += ["", "## GPU commands" + tail.partition("## GPU commands")[2]]
    old = bench / "RESULTS.md"
    if cpu and old.is_file():
        previous_text = old.read_text()
        previous_text = previous_text.partition("\n## CPU-scale figures")[2] or previous_text
        lines += ["", "## CPU-scale figures (kept; labelled cpu-scale, not GPU results)", "",
                  previous_text.replace("\n# ", "\n### ").replace("\n## ", "\n### ")]
    old.write_text("\n".join(lines))
    print(f"collect: bench records {sorted(records)} -> {results} and {old}")
