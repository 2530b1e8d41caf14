"""Issue #6, target 1: compress a Llama-2-7B-shaped model (random bf16 weights) on one GPU.

Calibration on 256 sequences x 512 tokens, then `plan_ranks` and `factorize` at budget 0.8, through the library API
(`jactus.calibrate / plan_ranks / factorize`). Reports the wall time, the peak GPU memory and host RSS, seconds per
stage, every dense decomposition the core ran (op, dtype, device, shape: `LinalgProfile`), and a measured floor:
the forward+backward passes alone plus fp32 decompositions of the shapes the job needs, so the gap between what the
core does and what the hardware allows is visible per stage.

    python experiments/bench/compress_llama.py --scale gpu --out experiments/bench/out/compress_gpu.json
    python experiments/bench/compress_llama.py --scale cpu     # Llama structure at hidden 256, 4 layers (cpu-scale)
"""

from __future__ import annotations

import argparse
import time

import torch

import common

SHAPES = {
    "gpu": dict(llama="7b", seqs=256, seq_len=512, batch_size=8, dtype="bfloat16"),
    "cpu": dict(llama="cpu", seqs=16, seq_len=128, batch_size=4, dtype="float32"),
    "toy": dict(llama="toy", seqs=4, seq_len=16, batch_size=2, dtype="float32"),
}


def measure_floor(model, batches, device: torch.device, targets: dict, repeats: int) -> dict:
    """The hardware floor of the job: forward+backward of the calibration batches (no statistics), and fp32
    decompositions of each distinct size the job needs (eigh of every covariance side, Cholesky of Sx)."""
    def forward_backward():
        # Activation gradients with every weight frozen, as calibration needs: the embeddings' output requires grad.
        batch = batches[0]
        embeddings = model.get_input_embeddings()(batch["input_ids"]).requires_grad_(True)
        loss = model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()

    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    step = common.median(common.time_repeats(forward_backward, device, warmup=1, repeats=repeats))
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)

    dims = sorted({d for layer in targets.values() for d in (layer.in_features, layer.out_features)})
    eigh_s, chol_s = {}, {}
    for dim in dims:
        a = torch.randn(dim, dim, device=device, dtype=torch.float32)
        cov = a @ a.T / dim + torch.eye(dim, device=device)
        eigh_s[dim] = common.median(common.time_repeats(lambda: torch.linalg.eigh(cov), device, 1, max(1, repeats)))
        chol_s[dim] = common.median(common.time_repeats(lambda: torch.linalg.cholesky(cov), device, 1,
                                                        max(1, repeats)))
        del a, cov
    # The recommended pipeline per layer: Cholesky of Sx once per shared-input group, one eigh of the smaller Gram
    # matrix of the whitened weight (its singular values and vectors), and top eigenvectors of Sx (per group) and Sg
    # (per layer) for the task directions, bounded here by full fp32 eighs (subspace iteration is cheaper still).
    groups = group_count(targets)
    gram = sum(eigh_s[min(l.in_features, l.out_features)] for l in targets.values())
    task_out = sum(eigh_s[l.out_features] for l in targets.values())
    task_in = sum(eigh_s[d] * c for d, c in groups.items())
    chol = sum(chol_s[d] * c for d, c in groups.items())
    forward_backward_total = step * len(batches)
    return {
        "forward_backward_per_batch_s": round(step, 4),
        "forward_backward_total_s": round(forward_backward_total, 3),
        "eigh_fp32_s": {str(d): round(s, 4) for d, s in eigh_s.items()},
        "cholesky_fp32_s": {str(d): round(s, 4) for d, s in chol_s.items()},
        "linalg_recommended_s": round(gram + task_out + task_in + chol, 3),
        "job_floor_s": round(forward_backward_total + gram + task_out + task_in + chol, 3),
        "note": "floor = forward+backward of every calibration batch + per layer one fp32 eigh of the smaller Gram "
                "matrix and one of Sg, per shared-input group one eigh and one Cholesky of Sx (full eighs: an upper "
                "bound on subspace iteration)",
    }


def group_count(targets: dict) -> dict[int, int]:
    """Number of shared-input groups per input width (q/k/v read one input, gate/up one)."""
    seen: dict[tuple, int] = {}
    for name, layer in targets.items():
        parent, leaf = name.rsplit(".", 1)
        share = "qkv" if leaf in ("q_proj", "k_proj", "v_proj") else "gate_up" if leaf in ("gate_proj", "up_proj") \
            else leaf
        seen[(parent.rsplit(".", 1)[0], share)] = layer.in_features
    counts: dict[int, int] = {}
    for width in seen.values():
        counts[width] = counts.get(width, 0) + 1
    return counts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--scope", default="model", choices=("model", "targets"))
    parser.add_argument("--max-stats-gb", type=float, default=None,
                        help="calibrate's statistics budget (max_stats_bytes); default: 40 on gpu, unbounded on cpu")
    parser.add_argument("--offload-stats", action="store_true", help="calibrate(offload_to_cpu=True)")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor measurement")
    args = parser.parse_args(argv)
    common.setup_threads()

    from jactus.core.allocation import plan_ranks
    from jactus.core.calibration import calibrate
    from jactus.core.factorize import factorize
    from jactus.core.targets import find_targets

    shape = SHAPES[args.scale]
    device = common.pick_device(args.scale)
    dtype = getattr(torch, shape["dtype"])
    repeats = args.repeats or (3 if args.scale == "gpu" else 1)
    max_stats = args.max_stats_gb if args.max_stats_gb is not None else (40.0 if args.scale == "gpu" else None)
    record = common.base_record(args.scale, device, "compress_llama")

    model = common.build_llama(shape["llama"], dtype, device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    config = common.LLAMA[shape["llama"]]
    batches = common.lm_batches(shape["seqs"] // shape["batch_size"], shape["batch_size"], shape["seq_len"],
                                config["vocab_size"], device)
    targets = find_targets(model)
    record["shapes"] = {"model": f"Llama ({shape['llama']}) {config}", "params": sum(p.numel() for p in
                        model.parameters()), "dtype": shape["dtype"], "calibration": f"{shape['seqs']} seqs x "
                        f"{shape['seq_len']} tokens, batch {shape['batch_size']}", "budget": args.budget,
                        "scope": args.scope, "targets": len(targets), "max_stats_gb": max_stats,
                        "offload_stats": args.offload_stats}

    timer = common.StageTimer(device)
    profile = common.LinalgProfile(device)
    with common.PeakMemory(device) as memory:
        start = time.perf_counter()
        with profile:
            with timer("calibrate"):
                stats = calibrate(model, batches, common.lm_loss, targets=None, progress=False,
                                         max_stats_bytes=None if max_stats is None else int(max_stats * 1e9),
                                         offload_to_cpu=args.offload_stats, device=device)
            calib_calls = dict(profile.calls)
            with timer("plan_ranks"):
                plan = plan_ranks(model, stats, budget=args.budget, scope=args.scope)
            with timer("factorize"):
                model = factorize(model, stats, plan, progress=False)
        common.synchronize(device)
        wall = time.perf_counter() - start
    del stats

    ranks = [r for r in plan.ranks.values() if r is not None]
    record.update({
        "wall_s": round(wall, 3),
        "stages_s": {k: round(v, 3) for k, v in timer.seconds.items()},
        "peak_gb": round(memory.peak_gb, 3),
        "memory": memory.as_dict(),
        "plan": {"ratio": round(float(plan.ratio), 4), "params_original": int(plan.params_original),
                 "params_deployed": int(plan.params_deployed), "dense_layers": sum(r is None for r in
                 plan.ranks.values()), "rank_min": min(ranks, default=None), "rank_max": max(ranks, default=None)},
        "linalg": profile.summary(),
        "linalg_in_calibrate_s": round(sum(sum(t) for t in calib_calls.values()), 4),
    })
    if args.scale == "gpu":
        record["targets"] = {"wall_s_max": 120.0, "peak_gpu_gb_max": 60.0,
                             "pass": bool(wall <= 120.0 and memory.peak_gb <= 60.0)}
    if not args.no_floor:
        model = common.build_llama(shape["llama"], dtype, device)  # the dense model again, for the floor
        record["floor"] = measure_floor(model, batches, device, find_targets(model), repeats)
        record["floor"]["gap_x"] = round(wall / max(record["floor"]["job_floor_s"], 1e-9), 2)
    common.write_json(record, args.out)
    return record


if __name__ == "__main__":
    main()
