"""Commands run under a deadline: each under coreutils `timeout` with its output in its own log, and a stage's folder
packed into <out>/<stage>.tar.gz whenever one of its commands ends, so a run stopped at any point keeps what
finished."""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import ROOT

KILL_AFTER_S = 5  # `timeout` sends TERM at a command's limit and KILL this much later
LOG_TAIL_LINES = 400  # a packed log keeps its last lines


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
    with open(job.log, "w") as handle:
        handle.write("+ " + " ".join(job.command) + "\n")
        handle.flush()
        job.started = time.monotonic()
        job.process = subprocess.Popen(
            ["timeout", f"--kill-after={KILL_AFTER_S}", str(max(1, int(job.limit))), *job.command],
            stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
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


def stop(jobs: list[Job]) -> None:
    """TERM every job, KILL what is still there after KILL_AFTER_S; each is then marked as cut (124)."""
    for job in jobs:
        job.process.terminate()
    for job in jobs:
        try:
            job.process.wait(KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
        finished(job)
        job.returncode = 124


def status_of(job: Job) -> str:
    return "ok" if job.returncode == 0 else ("timeout" if job.returncode in (124, 137) else f"rc={job.returncode}")


def pack(out: Path, stage: str, folder: Path) -> None:
    """<out>/<stage>.tar.gz from `folder` (no weights; logs cut to their last lines), replaced atomically."""
    temporary = out / f".{stage}.tar.gz"
    with tarfile.open(temporary, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix in (".ckpt", ".safetensors", ".pt"):
                continue
            arcname = str(path.relative_to(folder))
            if path.suffix == ".log":
                lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                data = ("\n".join(lines) + "\n").encode()
                info = tarfile.TarInfo(arcname)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(path, arcname=arcname)
    temporary.replace(out / f"{stage}.tar.gz")
