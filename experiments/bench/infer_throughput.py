"""Issue #6, target 3: inference of the deployed compact model (0.8, 0.6) vs the dense model.

The compact model is the deployed form: `save_compact` (cores folded, `LowRankLinear` down/up pairs) then
`load_compact`, exactly what a user ships. Reports latency at batch 1 (one forward of a `seq_len` prompt, ms),
throughput at a large batch (tokens/s; images/s for the ViT), and parameter bytes. bf16 weights on the GPU, fp32 on
the CPU; `torch.inference_mode`.

    python experiments/bench/infer_throughput.py --scale gpu --out experiments/bench/out/infer_gpu.json
"""

from __future__ import annotations

import argparse
import tempfile

import common
import torch
from train_throughput import uniform_rank_map

VARIANTS = ("dense", "jactus_0.8", "jactus_0.6")
SHAPES = {
    "gpu": dict(llama="1b", seq_len=512, big_batch=32, vit="gpu", vit_big_batch=256, img=224, dtype="bfloat16",
                repeats=20, warmup=5),
    "cpu": dict(llama="cpu", seq_len=128, big_batch=16, vit="cpu", vit_big_batch=64, img=64, dtype="float32",
                repeats=5, warmup=2),
    "toy": dict(llama="toy", seq_len=16, big_batch=2, vit="toy", vit_big_batch=2, img=32, dtype="float32",
                repeats=1, warmup=1),
}


def compact_variant(model, budget: float, ranks: str, calibration, loss_fn, head_names, device, dtype, workdir):
    """The deployed model at `budget`: JACTUS layers (library factorization or shapes only), saved and loaded back."""
    from jactus.core.compact import load_compact, save_compact
    from jactus.core.factorize import apply_rank_map, factorize
    from jactus.core.layers import FactorizedLinear

    if ranks == "calibrated":
        from jactus.core.allocation import plan_ranks
        from jactus.core.calibration import calibrate

        stats = calibrate(model, calibration, loss_fn, progress=False, device=device)
        model = factorize(model, stats, plan_ranks(model, stats, budget=budget), head_names=head_names,
                          progress=False)
    else:
        apply_rank_map(model, uniform_rank_map(model, budget), FactorizedLinear)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, FactorizedLinear):
                    for param in (module.U, module.V):
                        param.normal_(0, param.shape[0] ** -0.5)
                    module.C.copy_(torch.eye(module.rank))
    path = save_compact(model, f"{workdir}/compact_{budget}")
    return load_compact(path, device=device).to(dtype)


def bench_family(family: str, shape: dict, device: torch.device, ranks: str, warmup: int, repeats: int) -> dict:
    dtype = getattr(torch, shape["dtype"])
    if family == "causal_lm":
        config = common.LLAMA[shape["llama"]]
        build = lambda: common.build_llama(shape["llama"], torch.float32, device)  # noqa: E731
        small = common.lm_batches(1, 1, shape["seq_len"], config["vocab_size"], device)[0]
        big = common.lm_batches(1, shape["big_batch"], shape["seq_len"], config["vocab_size"], device)[0]
        calibration = common.lm_batches(2, 2, shape["seq_len"], config["vocab_size"], device)
        forward = lambda model, batch: model(input_ids=batch["input_ids"],  # noqa: E731
                                             attention_mask=batch["attention_mask"]).logits
        loss_fn, head_names, per_big, unit = common.lm_loss, [], shape["big_batch"] * shape["seq_len"], "tokens"
    else:
        build = lambda: common.build_vit(shape["vit"], device)  # noqa: E731
        small = common.image_batches(1, 1, shape["img"], 100, device, dtype)[0]
        big = common.image_batches(1, shape["vit_big_batch"], shape["img"], 100, device, dtype)[0]
        calibration = common.image_batches(2, 4, shape["img"], 100, device)
        forward = lambda model, batch: model(batch[0])  # noqa: E731
        loss_fn, head_names, per_big, unit = common.image_loss, ["head"], shape["vit_big_batch"], "images"

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for variant in VARIANTS:
            common.release_memory(device)
            model = build()
            if variant != "dense":
                model = compact_variant(model, float(variant.split("_")[1]), ranks, calibration, loss_fn, head_names,
                                        device, dtype, workdir)
            model = model.to(dtype).eval()
            with torch.inference_mode():
                latency = common.median(common.time_repeats(lambda m=model: forward(m, small), device, warmup,
                                                            repeats))
                seconds = common.median(common.time_repeats(lambda m=model: forward(m, big), device, warmup, repeats))
            results[variant] = {"latency_ms": round(1e3 * latency, 3), f"{unit}_per_s": round(per_big / seconds, 2),
                                "param_bytes": common.param_bytes(model)}
            del model
    dense = results["dense"]
    for variant in VARIANTS[1:]:
        results[variant]["throughput_vs_dense"] = round(results[variant][f"{unit}_per_s"] / dense[f"{unit}_per_s"], 3)
        results[variant]["bytes_vs_dense"] = round(results[variant]["param_bytes"] / dense["param_bytes"], 3)
    ratio = results["jactus_0.8"]["throughput_vs_dense"]
    return {"unit": unit, "methods": results,
            "target": {"jactus_0.8_throughput_vs_dense": ratio, "target": ">= 1.1", "pass": ratio >= 1.1}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--families", nargs="+", default=["causal_lm", "vision"], choices=("causal_lm", "vision"))
    parser.add_argument("--ranks", choices=("calibrated", "structure"), default=None,
                        help="calibrated: the library's factorization; structure: uniform ranks, random factors")
    args = parser.parse_args(argv)
    common.setup_threads()
    shape = SHAPES[args.scale]
    device = common.pick_device(args.scale)
    ranks = args.ranks or ("structure" if args.scale == "gpu" else "calibrated")
    warmup = args.warmup if args.warmup is not None else shape["warmup"]
    repeats = args.repeats or shape["repeats"]
    record = common.base_record(args.scale, device, "infer_throughput")
    record["shapes"] = {
        "causal_lm": f"Llama ({shape['llama']}) {common.LLAMA[shape['llama']]}; latency: batch 1 x {shape['seq_len']} "
                     f"tokens (one forward); throughput: batch {shape['big_batch']} x {shape['seq_len']}",
        "vision": f"timm {common.VIT[shape['vit']]}; latency: batch 1; throughput: batch {shape['vit_big_batch']}",
        "dtype": shape["dtype"], "jactus_ranks": ranks, "deployed_form": "save_compact -> load_compact (LowRankLinear)",
        "warmup": warmup, "repeats": repeats,
    }
    for family in args.families:
        record[family] = bench_family(family, shape, device, ranks, warmup, repeats)
    if "causal_lm" in record:
        lm = record["causal_lm"]["methods"]
        record["infer_throughput"] = {k: v["tokens_per_s"] for k, v in lm.items()}
        record["infer_latency_ms"] = {k: v["latency_ms"] for k, v in lm.items()}
        record["infer_param_bytes"] = {k: v["param_bytes"] for k, v in lm.items()}
    if "vision" in record:
        vit = record["vision"]["methods"]
        record["infer_images_per_s"] = {k: v["images_per_s"] for k, v in vit.items()}
        record["infer_latency_ms_vit"] = {k: v["latency_ms"] for k, v in vit.items()}
    common.write_json(record, args.out)
    return record


if __name__ == "__main__":
    main()
