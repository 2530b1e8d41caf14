"""Budgets in bytes (`budget.unit=bytes`): every compressing method deploys at most the budget's share of the dense
model's stored bytes, counted as `save_compact` writes them, on both tiny families; TACO spends nearly all of it and
keeps fewer weights than at the same ratio of parameters (its bitmask is paid for)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from jactus.core import find_targets, save_compact, stored_bytes
from jactus.core.byte_budget import ByteBudget, check_unit
from jactus.core.compact import bitmask_bytes
from jactus.methods import MethodContext
from jactus.methods.cersa import CERSA
from jactus.methods.compress_then_adapt import CompressThenAdapt
from jactus.methods.jactus import Jactus
from jactus.methods.taco import Taco
from jactus.methods.tunecomp import TuneComp

from .test_baselines import BACKBONES

torch.set_num_threads(1)

METHODS = {
    "jactus": lambda **kw: Jactus(rank_multiple=1, **kw),
    "jactus_sparse": lambda **kw: Jactus(rank_multiple=1, sparse_share=0.1, **kw),
    "compress_then_adapt": lambda **kw: CompressThenAdapt(rank_multiple=1, **kw),
    "cersa": lambda **kw: CERSA(rank_multiple=1, **kw),
    "tunecomp": lambda **kw: TuneComp(rank_multiple=1, **kw),
    "taco": lambda **kw: Taco(**kw),
    "taco_global": lambda **kw: Taco(allocation="global", **kw),
}


def scope_bytes(model, scope: str) -> int:
    """The dense model's bytes over the budget's scope: the whole stored model, or the target linears."""
    if scope == "model":
        return stored_bytes(model)["total"]
    return sum(t.numel() * t.element_size() for layer in find_targets(model).values() for t in layer.parameters())


def deployed(backbone: str, method_name: str, **options):
    model, batches, loss_fn, heads, family = BACKBONES[backbone]()
    dense = copy.deepcopy(model)
    method = METHODS[method_name](**options)
    ctx = MethodContext(model=model, loss_fn=loss_fn, calibration_batches=batches, head_names=heads, family=family)
    return method, method.export(method.apply(ctx)), dense


@pytest.mark.parametrize("backbone", ["vit", "llama"])
@pytest.mark.parametrize("method_name", list(METHODS))
def test_a_budget_in_bytes_is_met_in_stored_bytes(backbone, method_name, tmp_path):
    method, model, dense = deployed(backbone, method_name, budget=0.6, unit="bytes")
    limit = math.floor(0.6 * scope_bytes(dense, "model"))
    counts = stored_bytes(model)
    assert counts["total"] <= limit, (counts, limit)
    save_compact(model, tmp_path, arch={"library": "timm", "name": "vit_tiny_patch16_224"})  # holds what was counted
    weights = tmp_path / "model.safetensors"
    assert counts["total"] == weights.stat().st_size - 8 - int.from_bytes(weights.read_bytes()[:8], "little")
    if method_name.startswith("taco"):  # a kept weight costs 4 bytes: the plan uses the budget to within one
        assert limit - counts["total"] < 4
        assert counts["sparse_index"] == sum(bitmask_bytes(*shape) for shape in method.shapes.values())


@pytest.mark.parametrize("backbone", ["vit", "llama"])
def test_taco_in_bytes_keeps_fewer_weights_than_in_parameters_and_targets_scope_counts_the_linears(backbone):
    in_params, _, _ = deployed(backbone, "taco", budget=0.7, scope="targets")
    in_bytes, model, dense = deployed(backbone, "taco", budget=0.7, scope="targets", unit="bytes")
    masks = sum(bitmask_bytes(*shape) for shape in in_bytes.shapes.values())
    assert sum(in_bytes.nnz.values()) < sum(in_params.nnz.values())
    # 4 bytes a kept weight plus the bitmasks (and the biases) within 0.7 of the target linears' bytes
    budget = ByteBudget.of(dense, 0.7, "targets", find_targets(dense))
    assert budget.original == scope_bytes(dense, "targets")
    assert budget.fixed + masks + 4 * sum(in_bytes.nnz.values()) <= budget.limit
    assert budget.limit - (budget.fixed + masks + 4 * sum(in_bytes.nnz.values())) < 4


def test_bad_unit_and_unreachable_byte_budget_fail_early():
    with pytest.raises(ValueError, match=r"budget.unit='kb': expected one of \['params', 'bytes'\]"):
        check_unit("kb")
    with pytest.raises(ValueError, match=r"budget.unit='kb'"):
        Taco(unit="kb")
    with pytest.raises(ValueError, match=r"budget.ratio=0.05 .* allows \d+ of \d+ bytes"):
        deployed("llama", "taco", budget=0.05, unit="bytes")  # the embeddings alone are more than 5%
