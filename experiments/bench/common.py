"""What every benchmark shares: shapes per scale, model builders, timing, peak memory, a linear-algebra profiler, JSON.

Scales: `gpu` is the issue's shapes (Llama-2-7B for compression, a 1.1B Llama and ViT-B/16 for throughput); `cpu`
keeps the same structure at a size two shared CPU cores finish in about a minute; `toy` is for the smoke test
(tests/bench) only. Every output carries its scale label, so a cpu-scale number is never read as a GPU one.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
DATE = datetime.date.today().isoformat()  # the day the figures are measured
SCALES = ("toy", "cpu", "gpu")

# Llama shapes. gpu: Llama-2-7B (compression) and TinyLlama-1.1B (throughput, >= 1B parameters).
# cpu/toy: same structure (SwiGLU MLP, RMSNorm, RoPE, untied head), small. Vocabulary is shrunk with the width so the
# embeddings keep roughly the share of parameters they have at 7B (the budget counts the whole model).
LLAMA = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=2048),
    "toy": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256),
}
# timm ViT shapes: gpu is ViT-B/16 at 224; cpu a tiny ViT with the same block structure.
VIT = {
    "gpu": dict(name="vit_base_patch16_224", kwargs=dict(img_size=224)),
    "cpu": dict(name="vit_base_patch16_224", kwargs=dict(img_size=64, patch_size=16, embed_dim=192, depth=4,
                                                          num_heads=3)),
    "toy": dict(name="vit_base_patch16_224", kwargs=dict(img_size=32, patch_size=16, embed_dim=96, depth=2,
                                                          num_heads=2)),
}


# ---- environment -------------------------------------------------------------------------------------------------
def pick_device(scale: str) -> torch.device:
    if scale == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("--scale gpu needs a CUDA device; use --scale cpu here")
        return torch.device("cuda")
    return torch.device("cpu")


def device_string(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {torch.get_num_threads()} threads (shared machine), torch {torch.__version__}"


def setup_threads() -> None:
    """Two cores are shared with other jobs: never ask torch for more threads than there are cores."""
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, torch.get_num_threads())))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- timing ------------------------------------------------------------------------------------------------------
def time_repeats(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn()`: `warmup` untimed calls, then `repeats` timed ones (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---- memory ------------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def release_memory(device: torch.device) -> None:
    """Free what can be freed so the next measurement starts clean (glibc keeps freed pages unless trimmed)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory over a `with` block.

    GPU: `torch.cuda.max_memory_allocated` (reset at entry) -> `peak_gpu_gb`. Always: host RSS sampled every 5 ms by a
    thread -> `peak_rss_gb` (absolute) and `peak_rss_delta_gb` (above the RSS at entry, i.e. what the block added).
    On the CPU the RSS delta is the figure to compare between methods.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s = device, interval_s
        self.peak_gpu_gb: float | None = None
        self.peak_rss_gb = self.peak_rss_delta_gb = 0.0

    def __enter__(self):
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start_rss = rss_bytes()
        self._peak_rss = self._start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self._peak_rss = max(self._peak_rss, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak_rss = max(self._peak_rss, rss_bytes())
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_gpu_gb = torch.cuda.max_memory_allocated(self.device) / 1e9
        self.peak_rss_gb = self._peak_rss / 1e9
        self.peak_rss_delta_gb = (self._peak_rss - self._start_rss) / 1e9
        return False

    def as_dict(self) -> dict:
        out = {"peak_rss_gb": round(self.peak_rss_gb, 4), "peak_rss_delta_gb": round(self.peak_rss_delta_gb, 4)}
        if self.peak_gpu_gb is not None:
            out["peak_gpu_gb"] = round(self.peak_gpu_gb, 3)
        return out

    @property
    def peak_gb(self) -> float:
        """The figure a benchmark reports: GPU allocated on the GPU, RSS added by the block on the CPU."""
        return self.peak_gpu_gb if self.peak_gpu_gb is not None else self.peak_rss_delta_gb


# ---- linear-algebra profiler ---------------------------------------------------------------------------------------
LINALG_OPS = {
    torch.linalg: ("eigh", "eigvalsh", "svd", "svdvals", "cholesky", "cholesky_ex", "qr", "solve", "solve_triangular",
                   "inv", "lstsq", "eig", "matrix_rank", "pinv"),
    torch: ("cholesky_solve", "svd_lowrank", "pca_lowrank", "lobpcg", "svd", "qr", "cholesky_inverse"),
}


class LinalgProfile:
    """Counts and times every dense decomposition called inside the `with` block, by op, dtype, device and shape.

    It wraps the module attributes (`torch.linalg.eigh`, ...), so code that calls them through the module is seen
    whatever its internals; each call is device-synchronised on both sides, which serialises the GPU a little but
    attributes time exactly. The summary says which decompositions dominate and whether they run in fp64.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.calls: dict[tuple, list[float]] = defaultdict(list)
        self._saved: list[tuple] = []

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            tensor = next((a for a in args if torch.is_tensor(a)), None)
            synchronize(self.device)
            begin = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            if tensor is not None:
                key = (name, str(tensor.dtype).replace("torch.", ""), tensor.device.type, tuple(tensor.shape))
                self.calls[key].append(time.perf_counter() - begin)
            return out

        return timed

    def __enter__(self):
        for module, names in LINALG_OPS.items():
            for name in names:
                fn = getattr(module, name, None)
                if fn is not None:
                    self._saved.append((module, name, fn))
                    prefix = "linalg." if module is torch.linalg else ""
                    setattr(module, name, self._wrap(prefix + name, fn))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()
        return False

    def summary(self, top: int = 12) -> dict:
        by_op: dict[str, dict] = {}
        for (op, dtype, dev, _), times in self.calls.items():
            entry = by_op.setdefault(f"{op}[{dtype},{dev}]", {"calls": 0, "seconds": 0.0})
            entry["calls"] += len(times)
            entry["seconds"] += sum(times)
        by_shape = sorted(((sum(t), len(t), key) for key, t in self.calls.items()), reverse=True)[:top]
        return {
            "total_s": round(sum(sum(t) for t in self.calls.values()), 4),
            "by_op": {k: {"calls": v["calls"], "seconds": round(v["seconds"], 4)}
                      for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]["seconds"])},
            "top_shapes": [{"op": key[0], "dtype": key[1], "device": key[2], "shape": list(key[3]), "calls": n,
                            "seconds": round(s, 4)} for s, n, key in by_shape],
        }


# ---- models ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llama(shape: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A randomly initialised HF Llama of `LLAMA[shape]`, built directly on `device` in `dtype` (no fp32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    model.jactus_arch = {"library": "transformers", "config": config.to_dict()}
    return model


def build_vit(scale: str, device: torch.device, num_classes: int = 100, dtype: torch.dtype = torch.float32):
    """A randomly initialised timm ViT (ViT-B/16 at gpu scale) with a new `num_classes` head."""
    import timm

    spec = VIT[scale]
    torch.manual_seed(0)
    kwargs = {"num_classes": num_classes, **spec["kwargs"]}
    model = timm.create_model(spec["name"], pretrained=False, **kwargs).to(device=device, dtype=dtype)
    model.jactus_arch = {"library": "timm", "name": spec["name"], "kwargs": kwargs}
    return model


def lm_batches(count: int, batch_size: int, seq_len: int, vocab: int, device: torch.device, seed: int = 0) -> list:
    """`count` random-token LM batches (the cost does not depend on the token values); every token is a target."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": ids.to(device)})
    return batches


def image_batches(count: int, batch_size: int, img_size: int, num_classes: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> list:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device=device, dtype=dtype),
             torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)) for _ in range(count)]


def lm_loss(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def image_loss(model, batch) -> torch.Tensor:
    images, labels = batch
    return torch.nn.functional.cross_entropy(model(images).float(), labels)


def param_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


# ---- output ------------------------------------------------------------------------------------------------------
def base_record(scale: str, device: torch.device, benchmark: str) -> dict:
    return {"benchmark": benchmark, "scale": "gpu" if scale == "gpu" else f"{scale}-scale", "device":
            device_string(device), "date": DATE, "python": sys.version.split()[0]}


def write_json(record: dict, path: str | Path | None) -> None:
    text = json.dumps(record, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def add_common_args(parser) -> None:
    parser.add_argument("--scale", choices=SCALES, default="cpu",
                        help="gpu: the issue's shapes; cpu: same structure, small; toy: smoke test only")
    parser.add_argument("--out", default=None, help="write the JSON record here (it is printed either way)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls")
