"""Evaluate a dense, compact or exported causal LM on jactus's commonsense tasks with lm-eval (docs/LM_EVAL.md).

    python -m jactus.lm_eval_tasks run MODEL --tasks piqa,arc_e [--limit N] [--output results.json]
    python -m jactus.lm_eval_tasks path        # the folder to pass as lm_eval's --include_path

MODEL: a compact directory (jactus-compress / jactus-train `compact/`), an HF directory or hub id (a dense model, or
a `jactus-export` directory with --trust-remote-code), or `embedded:smollm2_135m`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.qa import COMMONSENSE_TASKS
from . import SPLITS, TASKS_DIR, evaluate, load_model, task_name

METRICS = ("acc", "acc_norm", "acc_per_token")


def _tasks(value: str) -> list[str]:
    tasks = list(COMMONSENSE_TASKS) if value == "all" else [task.strip() for task in value.split(",") if task.strip()]
    try:
        for task in tasks:
            task_name(task)  # fails early on an unknown name, listing the valid ones
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return tasks


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jactus.lm_eval_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("path", help="print the folder of the task files (lm_eval --include_path)")
    run = commands.add_parser("run", help="evaluate a model")
    run.add_argument("model", help="compact dir, HF dir or hub id, or embedded:<name>")
    run.add_argument("--tasks", type=_tasks, default=list(COMMONSENSE_TASKS),
                     help=f"comma-separated, or 'all' (default): {','.join(COMMONSENSE_TASKS)}")
    run.add_argument("--tokenizer", help="where the tokenizer comes from, when not from MODEL")
    run.add_argument("--trust-remote-code", action="store_true", help="for jactus-export directories")
    run.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    run.add_argument("--device", default="cpu")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-length", type=int, help="lm-eval's context window (default: the model's)")
    run.add_argument("--limit", type=int, help="only the first N items of each task")
    run.add_argument("--split", choices=SPLITS, default="test",
                     help="test: the items jactus-eval scores (QADataModule test split); all: every item")
    run.add_argument("--seed", type=int, default=0, help="the data seed of the test split")
    run.add_argument("--test-per-task", type=int, default=100, help="the size of the test split")
    run.add_argument("--output", type=Path, help="write lm-eval's per-task results here (JSON)")
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    args = _parser().parse_args(argv)
    if args.command == "path":
        print(TASKS_DIR)
        return None
    model, tokenizer = load_model(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    results = evaluate(model, tokenizer, args.tasks, limit=args.limit, batch_size=args.batch_size,
                       max_length=args.max_length, split=args.split, seed=args.seed,
                       test_per_task=args.test_per_task)["results"]
    print(f"{'task':<20}{'items':>7}" + "".join(f"{metric:>15}" for metric in METRICS))
    for task in args.tasks:
        row = results[task_name(task)]
        cells = "".join(f"{100 * row[f'{metric},none']:>15.2f}" if f"{metric},none" in row else f"{'-':>15}"
                        for metric in METRICS)
        print(f"{task:<20}{row.get('sample_len', ''):>7}{cells}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
