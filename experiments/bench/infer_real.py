"""Issue 28: speed of the deployed models on real shapes, every variant side by side in one run.

SmolLM2-135M and DINOv2-S (real weights, the embedded defaults): prefill tokens/s (1 and 8 sequences of 256
tokens), decode tokens/s with the KV cache (batch 1, from a 256-token prompt), images/s (224 x 224), and memory, for

- `dense`: the model as shipped; a merged LoRA has exactly these shapes and weights' layout, so it is this row;
- `jactus_0.9`, `jactus_0.8`, `jactus_0.6`: the compact models as a user ships them (`jactus-compress` with a small
  calibration set, ranks from its plan, `save_compact`; here `load_compact`), with per-layer bases;
- `jactus+shared_0.8` (the LM): the same with each block's gate_proj and up_proj sharing one input basis (one `down`
  between them, each input projected once: `jactus-compress`'s default for the LM);
- `taco_0.8_zeros`, `taco_0.8_csr`: TACO unstructured pruning at budget 0.8, run as the dense model with the pruned
  weights at zero, and with each pruned weight as a sparse CSR tensor (`torch.sparse.mm`); `taco_0.8_best` says which
  a user should pick per measurement;
- `taco_2:4_zeros` (+ `taco_2:4_semi` on CUDA: `torch.sparse.to_sparse_semi_structured`, when it converts): TACO
  with the 2:4 pattern. The CPU has no 2:4 kernel, so there it only runs as dense-with-zeros.

Timing: one untimed pass of every measurement, `--warmup` more, then `--repeats` rounds; in every round each variant
runs every measurement, the variants in a rotated order, so a change of load on a shared machine hits all of them
alike. Ratios to dense are medians of the per-round ratios. Memory: each variant is loaded and run once more in a
process of its own (`PeakMemory`: host RSS on the CPU, allocated GPU memory on CUDA), where nothing else blurs it.
A call whose last timing took more than `--slow-s` is not timed again (CSR at high density on the CPU), so its
figure rests on fewer rounds (`timed_rounds`). Compressions run once into `--cache-dir`, reused by later runs with
the same model, calibration data and size.

    python experiments/bench/infer_real.py --scale cpu --out experiments/bench/out/infer_real_cpu.json
    python experiments/bench/infer_real.py --scale gpu --out experiments/bench/out/infer_real_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import common
import torch
from torch import nn

# gpu and cpu: the real models at their real shapes; toy: tiny random models with no assets (tests/bench only).
SETUPS = {
    "gpu": dict(causal_lm=("smollm2_135m", "piqa"), vision=("dinov2_small", "fashion_mnist"), img_size=224,
                dtype="bfloat16", prompt_len=256, prefill_batches=(1, 8, 32), decode_tokens=128, image_batch=256,
                calib=64, warmup=2, repeats=10, slow_s=30.0),
    "cpu": dict(causal_lm=("smollm2_135m", "piqa"), vision=("dinov2_small", "fashion_mnist"), img_size=224,
                dtype="float32", prompt_len=256, prefill_batches=(1, 8), decode_tokens=32, image_batch=8,
                calib=32, warmup=0, repeats=3, slow_s=20.0),
    "toy": dict(causal_lm=("llama_tiny_test", "synthetic_qa"), vision=("vit_tiny_test", "synthetic_vision"),
                img_size=32, dtype="float32", prompt_len=16, prefill_batches=(1, 2), decode_tokens=4, image_batch=2,
                calib=8, warmup=0, repeats=2, slow_s=60.0),
}
JACTUS_BUDGETS = (0.9, 0.8, 0.6)
SHARED_BUDGET = 0.8
TACO_BUDGET = 0.8  # for 2:4 an upper bound: the pattern fixes the density at one half of the pruned weights
FAMILIES = ("causal_lm", "vision")
NOTES = {
    "dense": "the dense model; a merged LoRA (LoRA folded into W) is the same network, so it is measured once here",
    "taco_0.8_csr": "pruned weights as torch sparse CSR (int32 indices), forward torch.sparse.mm(W, x^T)^T",
    "taco_2:4_zeros": "2:4 pattern as dense-with-zeros: the CPU has no 2:4 kernel (CUDA: taco_2:4_semi)",
    "taco_2:4_semi": "torch.sparse.to_sparse_semi_structured weights (CUDA only)",
}
MEMORY_MARK = "infer_real memory: "  # the line a memory child prints its figures on


@dataclass
class Settings:
    """One run's settings, shared by every family (and passed on to the memory children as `child_args`)."""

    setup: dict
    device: torch.device
    dtype: torch.dtype
    cache: Path
    warmup: int
    repeats: int
    slow_s: float
    child_args: list[str]


# ---- compression (once per cache directory) ------------------------------------------------------------------------
def overrides(family: str, setup: dict, device: torch.device) -> list[str]:
    model, data = setup[family]
    extra = [f"data.img_size={setup['img_size']}"] if family == "vision" else []
    return [f"model={model}", f"data={data}", f"calib.num_samples={setup['calib']}", "evaluate=false",
            f"device={device.type}", "logger=none", "seed=0", *extra]


def compression_runs(family: str, setup: dict, device: torch.device) -> dict[str, list[str]]:
    """Each jactus-compress run (its command-line overrides) by the directory it writes."""
    base = overrides(family, setup, device)
    budgets = ",".join(str(b) for b in JACTUS_BUDGETS)
    runs = {"jactus": [*base, "method=jactus", "jactus_share_bases=false", f"budgets=[{budgets}]"],
            "taco": [*base, "method=taco", "method.pattern=unstructured", f"budgets=[{TACO_BUDGET}]"],
            "taco_2:4": [*base, "method=taco", "method.pattern=2:4", f"budgets=[{TACO_BUDGET}]"]}
    if family == "causal_lm":  # gate/up sharing one input basis (the LM's default in jactus-compress)
        runs["jactus_shared"] = [*base, "method=jactus", "jactus_share_bases=[gate_proj,up_proj]",
                                 f"budgets=[{SHARED_BUDGET}]"]
    return runs


def compact_dirs(family: str, setup: dict, device: torch.device, cache: Path) -> tuple[dict[str, Path], dict]:
    """variant -> compact directory, compressing what the cache lacks; and the commands that made them."""
    model, data = setup[family]
    root = cache / f"{model}-{data}-calib{setup['calib']}"  # another model, data or calibration size: other files
    dirs = {"dense": root / "dense", **{f"jactus_{b}": root / "jactus" / f"budget_{b}" for b in JACTUS_BUDGETS},
            "taco_0.8": root / "taco" / f"budget_{TACO_BUDGET}",
            "taco_2:4": root / "taco_2:4" / f"budget_{TACO_BUDGET}"}
    if family == "causal_lm":
        dirs[f"jactus+shared_{SHARED_BUDGET}"] = root / "jactus_shared" / f"budget_{SHARED_BUDGET}"
    commands = {}
    if not (dirs["dense"] / "model.safetensors").is_file():
        save_dense(family, setup, device, dirs["dense"])
    for run, args in compression_runs(family, setup, device).items():
        commands[run] = "jactus-compress " + " ".join(f"'{a}'" if "[" in a else a for a in args)
        outputs = [d for name, d in dirs.items() if d.parent == root / run]
        if all((d / "summary.json").is_file() for d in outputs):
            continue
        print("+", commands[run], flush=True)
        done = subprocess.run([sys.executable, "-m", "jactus.compress", *args, f"hydra.run.dir={root / run}"])
        if done.returncode != 0:
            raise RuntimeError(f"{commands[run]} failed (exit {done.returncode}; its output is above)")
    return dirs, commands


def save_dense(family: str, setup: dict, device: torch.device, path: Path) -> None:
    """The dense backbone as the same config builds it, in the compact format, so every variant loads alike."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from jactus.core.compact import save_compact
    from jactus.utils.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="compress", overrides=overrides(family, setup, device))
    loaded = instantiate(cfg.model.backbone, _convert_="all")
    save_compact(loaded.model, path)
    (path / "summary.json").write_text(json.dumps({"params_deployed": sum(p.numel() for p in
                                                                          loaded.model.parameters())}))


# ---- deployed forms -------------------------------------------------------------------------------------------------
class CsrLinear(nn.Module):
    """`y = x W^T + b` with `W` a sparse CSR tensor (int32 indices, the stored form TACO's summary counts)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        csr = linear.weight.detach().to_sparse_csr()
        self.register_buffer("weight", torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(),
                                                               csr.values(), size=csr.shape,
                                                               check_invariants=True))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def pruned_names(compact_dir: Path) -> list[str]:
    return list(json.loads((compact_dir / "summary.json").read_text())["density_map"])


def to_csr(model: nn.Module, names: list[str]) -> nn.Module:
    for name in names:
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent) if parent else model
        setattr(module, leaf, CsrLinear(getattr(module, leaf)))
    return model


def to_semi_structured(model: nn.Module, names: list[str]) -> nn.Module:
    from torch.sparse import to_sparse_semi_structured

    for name in names:
        layer = model.get_submodule(name)
        layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
    return model


def tensor_bytes(tensor: torch.Tensor) -> int:
    if tensor.layout == torch.sparse_csr:
        return sum(t.numel() * t.element_size() for t in (tensor.values(), tensor.crow_indices(),
                                                           tensor.col_indices()))
    if type(tensor).__name__.startswith("SparseSemiStructuredTensor"):  # its packed values and metadata
        parts = [getattr(tensor, name, None) for name in ("packed", "meta", "packed_t", "meta_t")]
        return sum(t.numel() * t.element_size() for t in parts if torch.is_tensor(t))
    return tensor.numel() * tensor.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer as held in memory (a sparse tensor: its values and indices)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


# ---- measurements ---------------------------------------------------------------------------------------------------
def timed(fn, device: torch.device) -> float:
    common.synchronize(device)
    begin = time.perf_counter()
    fn()
    common.synchronize(device)
    return time.perf_counter() - begin


def lm_measurements(setup: dict, vocab: int, device: torch.device) -> dict:
    """name -> (model -> seconds, units per call, unit)."""
    from jactus.lit.qa import cache_keyword, output_cache  # "cache" or "past_key_values", by transformers version

    generator = torch.Generator().manual_seed(0)
    length = setup["prompt_len"]
    prompts = {b: torch.randint(0, vocab, (b, length), generator=generator).to(device)
               for b in setup["prefill_batches"]}

    def prefill(model, ids):  # the prompt pass of generation: the KV cache is built, only the last logits made
        return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    def decode(model) -> float:
        keyword = cache_keyword(model)[0]
        with torch.inference_mode():
            out = model(input_ids=prompts[1], use_cache=True, logits_to_keep=1)
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)

            def steps():
                nonlocal cache, token
                for _ in range(setup["decode_tokens"]):  # greedy, a fixed count: no stop token ends it early
                    out = model(input_ids=token, use_cache=True, **{keyword: cache})
                    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)

            return timed(steps, device)

    measurements = {}
    for batch, ids in prompts.items():
        def run(model, ids=ids):
            with torch.inference_mode():
                return timed(lambda: prefill(model, ids), device)

        measurements[f"prefill_b{batch}"] = (run, batch * length, "tokens")
    measurements["decode_b1"] = (decode, setup["decode_tokens"], "tokens")
    return measurements


def vision_measurements(setup: dict, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(setup["image_batch"], 3, setup["img_size"], setup["img_size"], generator=generator)
    images = images.to(device=device, dtype=dtype)

    def run(model):
        with torch.inference_mode():
            return timed(lambda: model(images), device)

    return {f"images_b{setup['image_batch']}": (run, setup["image_batch"], "images")}


def resident_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else common.rss_bytes()


def check_output(reference: nn.Module, model: nn.Module, family: str, vocab: int, device: torch.device,
                 dtype: torch.dtype) -> float:
    """Largest |difference| of a converted model's output from its dense-with-zeros source, relative to its scale."""
    generator = torch.Generator().manual_seed(1)
    if family == "causal_lm":
        sample = torch.randint(0, vocab, (1, 16), generator=generator).to(device)
        run = lambda m: m(input_ids=sample, use_cache=False).logits.float()  # noqa: E731
    else:
        sample = torch.randn(1, 3, *reference.patch_embed.img_size, generator=generator).to(device=device, dtype=dtype)
        run = lambda m: m(sample).float()  # noqa: E731
    with torch.inference_mode():
        expected, got = run(reference), run(model)
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def variant_builders(dirs: dict[str, Path], device: torch.device, dtype: torch.dtype) -> dict:
    """variant -> how a user gets it running from the compact directories."""
    from jactus.core.compact import load_compact

    def load(name: str) -> nn.Module:
        return load_compact(dirs[name], device=device).to(dtype).eval()

    builders = {name: (lambda n=name: load(n)) for name in ("dense", *(f"jactus_{b}" for b in JACTUS_BUDGETS))}
    if f"jactus+shared_{SHARED_BUDGET}" in dirs:
        builders[f"jactus+shared_{SHARED_BUDGET}"] = lambda: load(f"jactus+shared_{SHARED_BUDGET}")
    builders["taco_0.8_zeros"] = lambda: load("taco_0.8")
    builders["taco_0.8_csr"] = lambda: to_csr(load("taco_0.8"), pruned_names(dirs["taco_0.8"]))
    builders["taco_2:4_zeros"] = lambda: load("taco_2:4")
    if device.type == "cuda":
        builders["taco_2:4_semi"] = lambda: to_semi_structured(load("taco_2:4"), pruned_names(dirs["taco_2:4"]))
    return builders


def source_dir(dirs: dict[str, Path], variant: str) -> Path:
    return dirs[variant if variant in dirs else variant.rsplit("_", 1)[0]]


def memory_of(build, measurements: dict, device: torch.device) -> dict:
    """Memory of loading one variant and running every measurement once, in a process that holds nothing else.

    Before that, the variant is loaded and run once on the first measurement: the imports and pools that a first
    load and forward bring in (hundreds of MB next to a toy model) belong to the process, not to the variant."""
    run, _, _ = next(iter(measurements.values()))
    run(build())
    with common.PeakMemory(device) as peak:
        before = resident_bytes(device)
        model = build()
        loaded = resident_bytes(device)
        for run, _, _ in measurements.values():
            run(model)
    peak_bytes = peak.peak_gpu_gb * 1e9 - before if device.type == "cuda" else peak.peak_rss_delta_gb * 1e9
    return {"measure": "GPU allocated" if device.type == "cuda" else "host RSS", "process": "own",
            "load_gb": round((loaded - before) / 1e9, 4), "peak_gb": round(peak_bytes / 1e9, 4)}


def memory_in_child(settings: Settings, family: str, variant: str) -> dict:
    """`memory_of` in a fresh process: in this one, the other variants and freed buffers blur the figures."""
    command = [sys.executable, __file__, *settings.child_args, "--families", family, "--memory-of", variant]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MEMORY_MARK)]
    if done.returncode != 0 or not lines:
        return {"failed": done.stderr.strip().splitlines()[-3:]}
    return json.loads(lines[-1][len(MEMORY_MARK):])


def load_variants(family: str, dirs: dict[str, Path], settings: Settings, measurements: dict,
                  vocab: int | None) -> tuple[dict, dict, set]:
    """Load each variant in turn, run every measurement once (untimed), then measure its memory in a child process.

    Returns the models, per variant its sizes and memory (or why it was skipped), and the (variant, measurement)
    pairs slower than `settings.slow_s` in that untimed pass."""
    from jactus.core.compact import stored_bytes

    device, dtype = settings.device, settings.dtype
    sources = {"taco_0.8_csr": "taco_0.8_zeros", "taco_2:4_semi": "taco_2:4_zeros"}
    models, info, slow = {}, {}, set()
    for name, build in variant_builders(dirs, device, dtype).items():
        source = source_dir(dirs, name)
        summary = json.loads((source / "summary.json").read_text())
        try:
            model = build()
        except Exception as error:  # a conversion this torch or device does not support: said, not fatal
            info[name] = {"skipped": f"{type(error).__name__}: {error}"[:500]}
            continue
        entry = {"params_deployed": summary.get("params_deployed"), "params_ratio": summary.get("params_ratio", 1.0),
                 "memory_bytes": model_bytes(model), "file_bytes": (source / "model.safetensors").stat().st_size}
        if name not in sources:
            entry["stored_bytes"] = stored_bytes(model)["total"]
        if "density" in summary:
            entry["density"] = round(summary["density"], 4)
        try:
            if name in sources:
                entry["rel_diff_vs_" + sources[name]] = check_output(models[sources[name]], model, family, vocab,
                                                                     device, dtype)
            first = {measurement: run(model) for measurement, (run, _, _) in measurements.items()}
        except Exception as error:
            info[name] = {**entry, "skipped": f"{type(error).__name__}: {error}"[:500]}
            del model
            continue
        entry["untimed_s"] = {m: round(s, 4) for m, s in first.items()}
        entry["memory"] = memory_in_child(settings, family, name)
        slow |= {(name, m) for m, s in first.items() if s > settings.slow_s}
        models[name], info[name] = model, entry
        print(f"  {family}/{name}: untimed pass {entry['untimed_s']}, memory {entry['memory']}", flush=True)
    return models, info, slow


def interleaved(models: dict, measurements: dict, warmup: int, repeats: int, slow: set,
                slow_s: float) -> tuple[dict, list]:
    """Seconds per (variant, measurement) over `repeats` rounds, the variants in a rotated order each round; a call
    whose last timing took more than `slow_s` is not timed again (nor warmed up, if slow in the untimed pass)."""
    names = list(models)
    for _ in range(warmup):
        for name in names:
            for measurement, (run, _, _) in measurements.items():
                if (name, measurement) not in slow:
                    run(models[name])
    seconds = {name: {m: [] for m in measurements} for name in names}
    loads = []
    for index in range(repeats):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            for measurement, (run, _, _) in measurements.items():
                done = seconds[name][measurement]
                if done and done[-1] > slow_s:  # its last timing was slow: once is enough (a transient is retimed)
                    continue
                seconds[name][measurement].append(run(models[name]))
        loads.append(round(os.getloadavg()[0], 2))
        print(f"  round {index + 1}/{repeats} done (load {loads[-1]})", flush=True)
    return seconds, loads


def summarise(seconds: dict, measurements: dict, repeats: int) -> dict:
    results = {}
    dense = seconds["dense"]
    for name, by_measurement in seconds.items():
        entry = {}
        for measurement, times in by_measurement.items():
            _, units, unit = measurements[measurement]
            paired = [d / t for d, t in zip(dense[measurement], times, strict=False)]
            entry[measurement] = {"seconds": [round(t, 5) for t in times], "median_s": round(common.median(times), 5),
                                  f"{unit}_per_s": round(units / common.median(times), 2),
                                  "vs_dense": round(common.median(paired), 3)}
            if len(times) < repeats:
                entry[measurement]["timed_rounds"] = len(times)
        results[name] = entry
    if "taco_0.8_csr" in results:  # what a user running unstructured TACO would pick, per measurement
        best = {m: min(("taco_0.8_zeros", "taco_0.8_csr"), key=lambda v, m=m: results[v][m]["median_s"])
                for m in measurements}
        results["taco_0.8_best"] = {m: {"form": v, "vs_dense": results[v][m]["vs_dense"]} for m, v in best.items()}
    return results


def family_measurements(family: str, settings: Settings, dirs: dict[str, Path]) -> tuple[dict, int | None]:
    if family == "causal_lm":
        vocab = json.loads((dirs["dense"] / "arch.json").read_text())["config"]["vocab_size"]
        return lm_measurements(settings.setup, vocab, settings.device), vocab
    return vision_measurements(settings.setup, settings.device, settings.dtype), None


def bench_family(family: str, settings: Settings) -> dict:
    setup = settings.setup
    begin = time.perf_counter()
    dirs, commands = compact_dirs(family, setup, settings.device, settings.cache)
    compress_s = time.perf_counter() - begin
    measurements, vocab = family_measurements(family, settings, dirs)
    models, info, slow = load_variants(family, dirs, settings, measurements, vocab)
    seconds, loads = interleaved(models, measurements, settings.warmup, settings.repeats, slow, settings.slow_s)
    results = summarise(seconds, measurements, settings.repeats)
    ratios = {name: {m: v["vs_dense"] for m, v in entry.items()} for name, entry in results.items()}
    del models
    common.release_memory(settings.device)
    return {"model": setup[family][0], "calibration": f"{setup[family][1]}, {setup['calib']} items",
            "compress_commands": commands, "compress_and_cache_s": round(compress_s, 1),
            "measurements": {m: f"{units} {unit} per call" for m, (_, units, unit) in measurements.items()},
            "variants": info, "results": results, "vs_dense": ratios, "load_1min_per_round": loads}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--cache-dir", default=None,
                        help="compact models are written here once and reused (default: a folder in the temp "
                             "dir); delete it after upgrading jactus")
    parser.add_argument("--lm-data", default=None, help="calibration data of the LM's compressions (default: piqa)")
    parser.add_argument("--vision-data", default=None,
                        help="calibration data of the vision compressions (default: fashion_mnist; synthetic_vision "
                             "needs no files, and the speed does not depend on it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: at most the cores); on a loaded machine 1 is steadier")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the compact models into the cache and stop (no timing)")
    parser.add_argument("--slow-s", type=float, default=None,
                        help="a call whose last timing took longer is not timed again")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the child of `memory_in_child`
    args = parser.parse_args(argv)
    common.setup_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    setup = dict(SETUPS[args.scale])
    for family, data in (("causal_lm", args.lm_data), ("vision", args.vision_data)):
        if data:
            setup[family] = (setup[family][0], data)
    device = common.pick_device(args.scale)
    cache = Path(args.cache_dir or Path(tempfile.gettempdir()) / f"jactus_infer_real_{args.scale}")
    child_args = ["--scale", args.scale, "--cache-dir", str(cache), "--threads", str(torch.get_num_threads())]
    for flag, value in (("--lm-data", args.lm_data), ("--vision-data", args.vision_data)):
        child_args += [flag, value] if value else []
    settings = Settings(setup=setup, device=device, dtype=getattr(torch, setup["dtype"]), cache=cache,
                        warmup=args.warmup if args.warmup is not None else setup["warmup"],
                        repeats=args.repeats or setup["repeats"],
                        slow_s=args.slow_s if args.slow_s is not None else setup["slow_s"], child_args=child_args)
    if args.memory_of:
        family = args.families[0]
        dirs, _ = compact_dirs(family, setup, device, cache)
        measurements, _ = family_measurements(family, settings, dirs)
        build = variant_builders(dirs, device, settings.dtype)[args.memory_of]
        print(MEMORY_MARK + json.dumps(memory_of(build, measurements, device)), flush=True)
        return {}
    record = common.base_record(args.scale, device, "infer_real")
    record.update({"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "load_1min_before": round(os.getloadavg()[0], 2), "dtype": setup["dtype"],
                   "shapes": {"prompt_len": setup["prompt_len"], "prefill_batches": list(setup["prefill_batches"]),
                              "decode": f"{setup['decode_tokens']} greedy tokens at batch 1 after a "
                                        f"{setup['prompt_len']}-token prompt, KV cache",
                              "images": f"batch {setup['image_batch']} at {setup['img_size']}x{setup['img_size']}"},
                   "warmup": settings.warmup, "repeats": settings.repeats, "slow_s": settings.slow_s, "notes": NOTES,
                   "timing": "one untimed pass, warm-up, then rounds with every variant in rotated order; vs_dense = "
                             "median over rounds of dense seconds / variant seconds (> 1: faster)",
                   "memory": "per variant in a process of its own: load_gb = what loading added, peak_gb = the peak "
                             "above the process before loading, over loading and one pass of every measurement"})
    if args.prepare_only:
        for family in args.families:
            compact_dirs(family, setup, device, cache)
        print(f"compact models under {cache}")
        return {"cache_dir": str(cache)}
    wall = time.perf_counter()
    for family in args.families:
        record[family] = bench_family(family, settings)
    record["load_1min_after"] = round(os.getloadavg()[0], 2)
    record["wall_s"] = round(time.perf_counter() - wall, 1)
    common.write_json(record, args.out)
    return record


if __name__ == "__main__":
    main()
