"""The four stages, most important first, each within its share of the run's time:

a) the offline_llama table at GPU scale (SmolLM2-135M, the eight commonsense tasks, every row, three seeds), several
   jobs at once, learning rates chosen on validation first; then jactus-report over the rows that ran;
b) 7B-shape compression; c) training and inference throughput; d) Lightning FSDP with one device (the bench scripts).

`DRY` runs the same code with CPU stand-ins (a tiny Llama, synthetic questions, the bench scripts at toy scale).
This module imports nothing outside the standard library: it runs before the carried wheels are installed, and every
stage command runs in a child process that sees them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import ENTRY, ROOT, Log
from .jobs import Job, finished, pack, run_one, start, status_of, stop

# row -> (overrides, learning-rate group): every row of the offline_llama table plus jactus@0.8 over the targets.
ROWS = {
    "zero_shot": (["variant=zero_shot"], None),
    "full_ft": (["variant=full_ft"], "full_ft"),
    "lora": (["variant=lora"], "adapter"),
    "dora": (["variant=dora"], "adapter"),
    "cersa": (["variant=cersa"], "adapter"),
    "compress_then_adapt_0.8": (["variant=compress_then_adapt_0.8", "evaluate_before=true"], "adapter"),
    "compress_then_adapt_0.6": (["variant=compress_then_adapt_0.6"], "adapter"),
    "tunecomp_0.8": (["variant=tunecomp_0.8"], "adapter"),
    "tunecomp_0.6": (["variant=tunecomp_0.6"], "adapter"),
    "jactus_0.8": (["variant=jactus_0.8", "evaluate_before=true"], "jactus"),
    "jactus_0.6": (["variant=jactus_0.6"], "jactus"),
    "jactus_0.8_targets": (["variant=jactus_0.8", "budget.scope=targets"], "jactus"),  # "jactus@0.8 (scope=targets)"
}
# Learning rates: one search per group on the group's first row (seed 0, the table's own steps, val/acc of 50 items
# a task, never test); the best rate is used by every row of the group. Grids around the literature's rates
# (LoRA/DoRA on commonsense: 3e-4/2e-4, LLM-Adapters and the DoRA paper; full fine-tuning of small LMs ~1e-5..1e-4).
LR_GRID = {"full_ft": (1e-5, 3e-5, 1e-4), "adapter": (1e-4, 3e-4, 1e-3), "jactus": (1e-4, 3e-4, 1e-3)}
LR_SEARCH_ROW = {"full_ft": "full_ft", "adapter": "lora", "jactus": "jactus_0.8"}
# When a group's search produced nothing, or with --no-lr-search: conf/experiment/offline_llama.yaml's rates.
LR_EXPERIMENT = {"full_ft": 2e-5, "adapter": 2e-4, "jactus": 5e-4}
MIN_STAGE_S = 5  # a stage with less than this left is not started


@dataclass
class Scale:
    """What differs between the GPU run and the dry run (everything else is the same code)."""

    rows: list[str]
    seeds: list[int]
    overrides: list[str]  # jactus-train overrides of every stage-a job
    lr_grid: dict
    bench_scale: str
    bench_extra: dict  # bench script -> extra arguments
    fsdp: list[list[str]]  # fsdp_smoke.py argument lists, most important first
    workers: int  # stage-a jobs at once
    limits: dict  # stage -> its usual seconds at most (stage a: what the later stages leave)
    report_s: int  # seconds kept at the end of stage a for jactus-report
    budget_s: int  # the whole run, when --budget-s is not given


GPU = Scale(
    rows=list(ROWS), seeds=[0, 1, 2],
    overrides=["experiment=offline_llama", "trainer=gpu", "trainer.max_steps=300", "data.batch_size=16",
               "data.module.train_per_task=null", "data.module.val_per_task=50", "data.module.test_per_task=200"],
    lr_grid=LR_GRID, bench_scale="gpu",
    # the bundle carries no Fashion-MNIST: the speed of the deployed ViT does not depend on the calibration images
    bench_extra={"compress_llama.py": ["--no-floor"], "infer_real.py": ["--vision-data", "synthetic_vision"]},
    fsdp=[["--accelerator", "gpu", "--devices", "1", "--strategy", "fsdp2"],
          ["--accelerator", "gpu", "--devices", "1", "--strategy", "fsdp1"]],
    workers=8, limits={"b": 120, "c": 600, "d": 35}, report_s=60, budget_s=3600)
DRY = Scale(
    rows=["zero_shot", "jactus_0.8", "jactus_0.8_targets"], seeds=[0],
    overrides=["experiment=offline_llama", "model=llama_tiny_test", "data=synthetic_qa", "trainer.max_steps=3",
               "data.batch_size=4", "data.module.train_per_task=16", "data.module.val_per_task=4",
               "data.module.test_per_task=8", "calib.num_samples=8"],
    lr_grid={"jactus": (5e-4,)}, bench_scale="toy",
    bench_extra={"compress_llama.py": ["--no-floor"], "train_throughput.py": ["--families", "causal_lm", "--ranks",
                 "structure", "--methods", "jactus_0.8", "lora"],
                 "infer_throughput.py": ["--families", "causal_lm", "--ranks", "structure"]},
    fsdp=[["--accelerator", "cpu", "--devices", "1", "--strategy", "fsdp2"]],
    workers=2, limits={"b": 120, "c": 150, "d": 90}, report_s=90, budget_s=900)
TITLES = {"a": "offline_llama table", "b": "7B-shape compression", "c": "train/infer throughput", "d": "FSDP smoke"}


@dataclass
class Context:
    scale: Scale
    work: Path
    out: Path
    log: Log
    python: str
    pythonpath: list[str]
    stages: list[str]
    deadline: float  # time.monotonic() by which every stage has ended
    lr_from: Path | None = None  # lr_choice.json of an earlier run: no search
    no_lr_search: bool = False
    model_overrides: list[str] = field(default_factory=list)  # from the node's env-check
    share: dict = field(default_factory=lambda: {"train": 0.65, "fsdp_fsdp2": 0.5})  # of a stage's time

    def env(self, threads: int) -> dict:
        path = os.pathsep.join(self.pythonpath + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
                    PYTHONPATH=path)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, stage: str) -> float:
        """Seconds for `stage`: its usual limit (a: all that the later stages' limits leave), at least MIN_STAGE_S
        when there is that much, never past the deadline."""
        later = sum(self.scale.limits[s] for s in self.stages[self.stages.index(stage) + 1:])
        share = self.left() - later if stage == "a" else min(self.scale.limits[stage], self.left() - later)
        return min(self.left(), max(MIN_STAGE_S, share))


# ---- stage a -----------------------------------------------------------------------------------------------------
def train_command(python: str, overrides: list[str], run_dir: Path) -> list[str]:
    return [python, "-m", "jactus.train", *overrides, "callbacks=none", "logger=csv", "hydra.mode=RUN",
            f"hydra.run.dir={run_dir}"]


def read_metric(run_dir: Path, key: str) -> float | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary.get("metrics", {}).get(key) if summary.get("status") == "ok" else None


def recorded_rates(ctx: Context, groups: list[str]) -> dict:
    """The rates not searched in this run: from --lr-from, or the experiment's with --no-lr-search."""
    if ctx.lr_from is not None:
        recorded = json.loads(ctx.lr_from.read_text())
        return {g: {"lr": recorded[g]["lr"], "source": f"recorded: {ctx.lr_from} ({recorded[g]['source']})"}
                for g in groups}
    if ctx.no_lr_search:
        return {g: {"lr": LR_EXPERIMENT[g], "source": "conf/experiment/offline_llama.yaml (not searched)"}
                for g in groups}
    return {}


def stage_a(ctx: Context) -> str:
    scale, folder = ctx.scale, ctx.work / "a"
    runs, logs = folder / "runs", folder / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stage_end = time.monotonic() + ctx.limit("a")
    jobs_end = stage_end - scale.report_s
    base = scale.overrides + ctx.model_overrides
    groups = sorted({ROWS[row][1] for row in scale.rows if ROWS[row][1]})
    lr_choice = recorded_rates(ctx, groups)
    search = []
    for group in (g for g in groups if g not in lr_choice):
        for lr in scale.lr_grid[group]:
            run_dir = runs / "lr_search" / f"{group}_lr{lr:g}"
            command = train_command(ctx.python, base + ROWS[LR_SEARCH_ROW[group]][0] + [
                "seed=0", f"optim.lr={lr}", "test=false"], run_dir)
            search.append(Job(f"search_{group}_lr{lr:g}", command, logs / f"search_{group}_lr{lr:g}.log", 0,
                              {"group": group, "lr": lr, "run_dir": str(run_dir.relative_to(folder))}))
    table = [Job(f"{row}_s{seed}", [], logs / f"{row}_s{seed}.log", 0, {"row": row, "seed": seed})
             for seed in scale.seeds for row in scale.rows]  # seed 0 of every row first: a cut run keeps a table
    pending, running, done = search + table, [], []
    env = ctx.env(threads=max(1, (os.cpu_count() or 2) // scale.workers))

    def choose(group: str) -> None:
        results = [(read_metric(folder / j.meta["run_dir"], "val/acc"), j.meta["lr"]) for j in search
                   if j.meta["group"] == group]
        scored = [(acc, lr) for acc, lr in results if acc is not None]
        if scored:
            acc, lr = max(scored, key=lambda item: (item[0], -item[1]))  # ties: the lower rate
            source = (f"validation search in this run: {LR_SEARCH_ROW[group]} seed 0, val/acc of rates "
                      f"{dict((f'{r:g}', a) for a, r in results)}")
        else:
            lr, source = LR_EXPERIMENT[group], "conf/experiment/offline_llama.yaml (the search produced no val/acc)"
        lr_choice[group] = {"lr": lr, "source": source}
        (folder / "lr_choice.json").write_text(json.dumps(lr_choice, indent=1) + "\n")
        ctx.log(f"  lr {group}: {lr:g} ({source})")

    def ready(job: Job) -> bool:
        group = ROWS[job.meta["row"]][1] if "row" in job.meta else None
        if group and group not in lr_choice:
            if any(j.meta.get("group") == group for j in pending + running):
                return False
            choose(group)
        if not job.command:  # a table job gets its rate once its group's search is over
            overrides = base + ROWS[job.meta["row"]][0] + [f"seed={job.meta['seed']}"]
            if group:
                overrides.append(f"optim.lr={lr_choice[group]['lr']}")
            job.command = train_command(ctx.python, overrides, runs / "table" / job.name)
        return True

    (folder / "lr_choice.json").write_text(json.dumps(lr_choice, indent=1) + "\n")
    while (pending or running) and time.monotonic() < jobs_end:
        for job in [j for j in running if finished(j)]:
            running.remove(job)
            done.append(job)
            ctx.log(f"  a: {job.name} {status_of(job)} in {job.seconds:.0f} s")
            write_jobs(folder, done, running, pending)
            pack(ctx.out, "a", folder)
        while pending and len(running) < scale.workers and jobs_end - time.monotonic() >= MIN_STAGE_S:
            job = next((j for j in pending if ready(j)), None)
            if job is None:
                break
            pending.remove(job)
            job.limit = jobs_end - time.monotonic()
            running.append(start(job, env))
        if not running:  # nothing left that can start before the jobs' deadline
            break
        time.sleep(0.5)
    stop(running)  # the jobs' deadline: stop what is left, keep what finished
    done += running
    write_jobs(folder, done, [], pending)
    report = report_a(ctx, folder, runs / "table", stage_end)
    pack(ctx.out, "a", folder)
    table_done = [j for j in done if "row" in j.meta and j.returncode == 0]
    cut = len([j for j in done if j.returncode in (124, 137)]) + len(pending)
    return (f"{len(table_done)}/{len(table)} table runs ok, {len(search)} lr-search runs, {cut} cut or not started; "
            f"report: {report}")


def write_jobs(folder: Path, done: list[Job], running: list[Job], pending: list[Job]) -> None:
    """jobs.json: every stage-a run, finished, cut, running or not started, with its command."""
    rows = [{"job": j.name, "status": status_of(j), "seconds": round(j.seconds, 1), "command": " ".join(j.command),
             **j.meta} for j in done]
    rows += [{"job": j.name, "status": "running", **j.meta} for j in running]
    rows += [{"job": j.name, "status": "not started", **j.meta} for j in pending]
    (folder / "jobs.json").write_text(json.dumps(rows, indent=1) + "\n")


def report_a(ctx: Context, folder: Path, table_runs: Path, stage_end: float) -> str:
    """jactus-report over the table's runs into a/report/, in a child that sees the carried wheels (collect.py)."""
    if not list(table_runs.rglob("summary.json")):
        return "no finished run"
    left = stage_end - time.monotonic()
    if left < MIN_STAGE_S:
        return "not started (no time left)"
    command = [ctx.python, str(ENTRY), "table", str(table_runs), str(folder / "report"), "--command-file",
               str(folder / "report_command.txt")]
    job = run_one(Job("report", command, folder / "logs" / "report.log", left), ctx.env(threads=4))
    return "ok" if job.returncode == 0 else f"jactus-report {status_of(job)} (a/logs/report.log)"


# ---- stages b-d: the bench scripts -------------------------------------------------------------------------------
def bench_jobs(ctx: Context, stage: str, scripts: list[tuple[str, str, list[str]]]) -> str:
    """Bench scripts (name, script, arguments) one after another within the stage's limit; packed after each."""
    folder = ctx.work / stage
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + ctx.limit(stage)
    results = []
    for index, (name, script, extra) in enumerate(scripts):
        left = deadline - time.monotonic()
        if left < 1:
            results.append(f"{name} not started (no time left)")
            continue
        share = left if index == len(scripts) - 1 else left * ctx.share.get(name, 1.0)
        out = folder / f"{name}.json"
        command = [ctx.python, str(ROOT / "experiments" / "bench" / script), *extra, "--out", str(out)]
        job = run_one(Job(name, command, folder / f"{name}.log", share), ctx.env(threads=os.cpu_count() or 2))
        results.append(f"{name} {status_of(job)} {job.seconds:.0f} s" + (f" ({headline(name, out)})"
                                                                          if out.is_file() else ""))
        pack(ctx.out, stage, folder)
    return "; ".join(results)


def headline(name: str, path: Path) -> str:
    """The one figure of a bench record that the stage's summary line shows."""
    record = json.loads(path.read_text())
    if name.startswith("compress"):
        return f"wall {record.get('wall_s')} s, peak GPU {record.get('memory', {}).get('peak_gpu_gb')} GB"
    if name.startswith("train"):
        ratios = record.get("causal_lm", {}).get("ratios") or {}
        return ", ".join(f"{k} {v.get('ratio')}" for k, v in ratios.items()) or "no ratios"
    if name == "infer_real":  # the deployed formats on the real models (experiments/bench/infer_real.py)
        ratios = {k: v.get("prefill_b8") for k, v in (record.get("causal_lm", {}).get("vs_dense") or {}).items()
                  if k != "dense"}
        return "prefill 8x256 vs dense: " + (", ".join(f"{k} {v}" for k, v in ratios.items()) or "no variants")
    if name.startswith("infer"):
        target = record.get("causal_lm", {}).get("target") or {}
        return f"compact@0.8/dense throughput {target.get('jactus_0.8_throughput_vs_dense')}"
    return (f"ok={record.get('ok')}, trainable changed {record.get('trainable_changed')}, frozen changed "
            f"{record.get('frozen_changed')}")


def stage_b(ctx: Context) -> str:
    scale = ctx.scale
    return bench_jobs(ctx, "b", [("compress", "compress_llama.py", ["--scale", scale.bench_scale,
                                                                    *scale.bench_extra.get("compress_llama.py", [])])])


def stage_c(ctx: Context) -> str:
    scale = ctx.scale
    scripts = [("train", "train_throughput.py"), ("infer", "infer_throughput.py")]
    if "infer_real.py" in scale.bench_extra:  # the deployed formats on the real models (no dry-run stand-in: too slow)
        scripts.append(("infer_real", "infer_real.py"))
    return bench_jobs(ctx, "c", [(name, script, ["--scale", scale.bench_scale, *scale.bench_extra.get(script, [])])
                                 for name, script in scripts])


def stage_d(ctx: Context) -> str:
    return bench_jobs(ctx, "d", [(f"fsdp_{args[-1]}", "fsdp_smoke.py", args) for args in ctx.scale.fsdp])


STAGES = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d}
