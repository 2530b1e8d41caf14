"""What the three steps share: the repository's paths, checksums, the run log, and the error that stops a step
before it installs, unpacks or starts anything."""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).resolve().with_name("run.py")
COMMAND = "python experiments/gpu/run.py"  # how messages name the entry point
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckError(SystemExit):
    """A missing or corrupt piece, or a wrong input, found before anything ran: the message names it and the fix."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise(dist: str) -> str:
    """A distribution's name as wheel files and metadata compare it (PEP 503, underscores)."""
    return dist.lower().replace("-", "_").replace(".", "_")


class Log:
    """The run's log: printed and appended to <out>/run.log line by line, so a run stopped at any point keeps it."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "run.log"

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
