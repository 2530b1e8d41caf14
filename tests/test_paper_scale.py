"""The paper-scale run, correct by construction: every GPU experiment holds bounded fp32 statistics, a tiny bf16
stand-in of paper_llama_cs runs in several passes to the one-pass result, and the memory options reach every
compressing method."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from jactus.core import resolve_max_stats_bytes
from jactus.utils.run import CONF_DIR

CONF = Path(CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
COMPRESSING = ("jactus.methods.jactus.Jactus", "jactus.methods.cersa.CERSA",
               "jactus.methods.compress_then_adapt.CompressThenAdapt", "jactus.methods.tunecomp.TuneComp")


def _rows(cfg) -> list[str]:
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    return str(params.get("variant", "")).split(",") if params.get("variant") else []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_gpu_experiments_hold_bounded_fp32_statistics(experiment, compose_cfg):
    """A GPU experiment must never hold unbounded fp64 statistics (127 GB for a 7B model): every row's method
    gets float32 sums and a bound from the `calib` group."""
    cfg = compose_cfg([f"experiment={experiment}"])
    if cfg.trainer.accelerator not in ("gpu", "cuda", "auto"):
        return
    for row in _rows(cfg) or [None]:
        row_cfg = compose_cfg([f"experiment={experiment}"] + ([f"variant={row}"] if row else []))
        method = OmegaConf.to_container(row_cfg.method, resolve=True)
        if method["_target_"] not in COMPRESSING:
            continue
        calib = method["calib"]
        assert calib["stats_dtype"] == "float32", (experiment, row, calib)
        assert calib["max_stats_bytes"] is not None, (experiment, row, calib)
        resolve_max_stats_bytes(calib["max_stats_bytes"])  # a valid bound


def test_paper_llama_cs_shows_fp32_statistics_with_a_bound(compose_cfg):
    cfg = compose_cfg(["experiment=paper_llama_cs"])
    assert cfg.calib.stats_dtype == "float32" and cfg.calib.max_stats_bytes == "auto"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.backbone.dtype == "bfloat16"


@pytest.mark.parametrize("method", ["jactus", "compress_then_adapt", "tunecomp", "cersa", "taco"])
def test_memory_options_reach_every_compressing_method(method, compose_cfg):
    from hydra.utils import instantiate

    cfg = compose_cfg([f"method={method}", "calib.max_stats_bytes=2GiB", "calib.stats_dtype=float32",
                       "calib.park_layers_on_cpu=true", "calib.compute_dtype=float32", "calib.eig_method=subspace",
                       "calib.stats_cache=stats_dir", "calib.stats_cache_max_bytes=20GB"])
    built = instantiate(cfg.method, _convert_="all")
    kwargs = built.calib.driver_kwargs()
    assert kwargs == {"max_stats_bytes": "2GiB", "stats_dtype": torch.float32, "offload_to_cpu": False,
                      "park_layers_on_cpu": True, "compute_dtype": torch.float32, "eig_method": "subspace",
                      "stats_cache": "stats_dir", "stats_cache_max_bytes": "20GB"}
    with pytest.raises(Exception, match=r"calib.stats_dtype='float16'"):  # hydra wraps the ValueError
        instantiate(compose_cfg([f"method={method}", "calib.stats_dtype=float16"]).method, _convert_="all")
    with pytest.raises(Exception, match=r"calib.max_stats_bytes='lots'"):
        instantiate(compose_cfg([f"method={method}", "calib.max_stats_bytes=lots"]).method, _convert_="all")


def test_max_stats_bytes_sizes_and_auto():
    assert resolve_max_stats_bytes(None) is None
    assert resolve_max_stats_bytes(1000) == 1000 and resolve_max_stats_bytes(2.2e10) == 22_000_000_000
    assert resolve_max_stats_bytes("22GB") == 22 * 10**9 and resolve_max_stats_bytes("20GiB") == 20 * 2**30
    assert resolve_max_stats_bytes("1.5 MiB") == int(1.5 * 2**20)
    auto = resolve_max_stats_bytes("auto", "cpu")
    assert 0 < auto < 24 * 2**30  # half of what the host has available
    for bad in (0, -5, "lots", "12 parsecs", True):
        with pytest.raises(ValueError, match="max_stats_bytes="):
            resolve_max_stats_bytes(bad)


def test_tiny_bf16_paper_llama_cs_in_three_or_more_passes_equals_one_pass(compose_cfg, tmp_path):
    """paper_llama_cs on a bf16 tiny Llama (its GPU settings: bf16-mixed, fp32 statistics, parking), end to end on
    the CPU with a bound that forces at least three passes: the compact model equals the one-pass run's."""
    from jactus.train import train

    # fp32 statistics of the tiny Llama (hidden 64, intermediate 128, 2 KV heads of 16): q/k/v 40960 bytes, o 32768,
    # gate/up 147456, down 81920 per decoder layer; 150_000 packs them into 5 passes.
    bound = 150_000
    common = ["experiment=paper_llama_cs", "variant=jactus_0.8", "model=llama_tiny_test",
              "++model.backbone.dtype=bfloat16", "data=synthetic_qa", "data.batch_size=4",
              "data.module.train_per_task=16", "data.module.test_per_task=4", "data.module.max_length=48",
              "trainer=cpu", "trainer.max_steps=2", "logger=none", "callbacks=none", "calib.num_samples=8",
              "evaluate_before=false", "save_compact=true", "export_dtype=float32", "seed=0"]
    runs = {}
    for name, memory in (("bounded", f"calib.max_stats_bytes={bound}"), ("one_pass", "calib.max_stats_bytes=null")):
        cfg = compose_cfg(common + [memory], output_dir=tmp_path / name)
        assert cfg.trainer.precision == "bf16-mixed" and cfg.calib.stats_dtype == "float32"
        train(cfg)
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    bounded, one_pass = runs["bounded"]["compress_stats"], runs["one_pass"]["compress_stats"]
    assert bounded["passes"] >= 3 and one_pass["passes"] == 1
    assert 0 < bounded["peak_stats_bytes"] <= bound < one_pass["peak_stats_bytes"]
    assert runs["bounded"]["rank_map"] == runs["one_pass"]["rank_map"]
    assert runs["bounded"]["backbone_dtype"] == "bfloat16"
    got, want = (load_file(tmp_path / name / "compact" / "model.safetensors") for name in ("bounded", "one_pass"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_tunecomp_is_refused_under_a_sharding_strategy():
    from lightning.pytorch.strategies import FSDPStrategy

    from jactus.callbacks import CompressionCallback
    from jactus.methods.jactus import Jactus
    from jactus.methods.tunecomp import TuneComp

    fsdp = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ValueError, match=r"method 'tunecomp' cannot train under FSDPStrategy.*trainer=ddp"):
        CompressionCallback(TuneComp())._check_strategy(fsdp)
    CompressionCallback(Jactus())._check_strategy(fsdp)  # shardable


def test_method_loss_terms_join_the_loss_and_cores_never_decay():
    """training_step adds the method's terms to the task loss (so loss scaling and accumulation see them);
    configure_optimizers keeps every core out of weight decay."""
    from torch import nn

    from jactus.core import FactorizedLinear
    from jactus.lit.vision import ImageClassifier
    from jactus.methods.base import Method

    class Penalised(Method):
        def loss_terms(self, model, batch):
            return {"penalty": model[0].C.sum() * 0 + 2.5}

    layer = FactorizedLinear(torch.eye(4)[:, :2], torch.ones(2, 2), torch.eye(4)[:, :2], torch.zeros(4))
    model = nn.Sequential(layer, nn.Linear(4, 3))
    module = ImageClassifier(model, head_names=["1"], lr=1e-3, weight_decay=0.1)
    module.log = lambda *args, **kwargs: None
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    plain = module.training_step(batch, 0)
    module.method = Penalised()
    assert float(module.training_step(batch, 0)) == pytest.approx(float(plain) + 2.5)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = module.configure_optimizers()["optimizer"].param_groups
    decayed = {id(p) for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    assert id(layer.C) not in decayed and id(model[1].weight) in decayed
