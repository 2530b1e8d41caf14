import json
import os
import subprocess
import sys

import pytest
import torch

from jactus.core import FactorizedLinear, calibrate, factorize, load_compact, plan_ranks, save_compact

LOADER = r"""
import json, sys, torch
from jactus.core import LowRankLinear, load_compact
root = sys.argv[1]
inputs = torch.load(f"{root}/inputs.pt")
vit, llama = load_compact(f"{root}/vit"), load_compact(f"{root}/llama")
with torch.no_grad():
    outputs = {"vit": vit(inputs["images"]),
               "llama": llama(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits}
torch.save(outputs, f"{root}/outputs.pt")
print(json.dumps({"tied": llama.lm_head.weight is llama.model.embed_tokens.weight,
                  "lowrank": sum(isinstance(m, LowRankLinear) for m in vit.modules()),
                  "training": vit.training or llama.training}))
"""


def test_save_load_in_fresh_process(tiny_vit, tiny_llama, vision_batches, lm_data, losses, tmp_path):
    make, split = lm_data
    text = split(make(), [2, 2])
    vit_stats = calibrate(tiny_vit, vision_batches, losses["vision"], progress=False)
    vit_plan = plan_ranks(tiny_vit, vit_stats, 0.9)
    llama_stats = calibrate(tiny_llama, text, losses["lm"], progress=False)
    llama_plan = plan_ranks(tiny_llama, llama_stats, 0.95, rank_multiple=4)
    assert None in vit_plan.ranks.values() and None in llama_plan.ranks.values()
    factorize(tiny_vit, vit_stats, vit_plan, head_names=["head"], progress=False)
    factorize(tiny_llama, llama_stats, llama_plan, progress=False)
    with torch.no_grad():  # train the cores a little so that folding U C is really exercised
        for module in [*tiny_vit.modules(), *tiny_llama.modules()]:
            if isinstance(module, FactorizedLinear):
                module.C.add_(0.01 * torch.randn_like(module.C))
    save_compact(tiny_vit, tmp_path / "vit")
    save_compact(tiny_llama, tmp_path / "llama")
    rank_map = json.loads((tmp_path / "llama" / "rank_map.json").read_text())
    assert rank_map == llama_plan.ranks  # factorized layers with ranks, dense targets as null
    batch = text[0]
    inputs = {"images": vision_batches[0][0], "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected_vit = tiny_vit(inputs["images"])
        expected_llama = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"tied": True, "lowrank": sum(r is not None for r in vit_plan.ranks.values()), "training": False}
    outputs = torch.load(tmp_path / "outputs.pt")
    torch.testing.assert_close(outputs["vit"], expected_vit, rtol=1e-5, atol=1e-5)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs["llama"][mask], expected_llama[mask], rtol=1e-5, atol=1e-5)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_compact(tmp_path)


def _safetensors_data_bytes(path) -> int:
    """A safetensors file's tensor data: the file less its 8-byte length prefix and the JSON header."""
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    return path.stat().st_size - 8 - header


def test_stored_bytes_are_the_bytes_save_compact_writes(tiny_llama, lm_data, losses, tmp_path):
    """`stored_bytes` (summary.json's bytes_deployed) counts what model.safetensors holds, tensor for tensor: tied
    embeddings once, folded factors, a sparse correction's values and int32 positions, bf16 factors at 2 bytes."""
    from jactus.core import LowRankLinear, stored_bytes
    from jactus.core.sparse import SparseDelta

    make, split = lm_data
    text = split(make(), [2, 2])
    stats = calibrate(tiny_llama, text, losses["lm"], progress=False)
    plan = plan_ranks(tiny_llama, stats, 0.8, rank_multiple=4)
    factorize(tiny_llama, stats, plan, progress=False)
    name, layer = next((n, m) for n, m in tiny_llama.named_modules() if isinstance(m, FactorizedLinear))
    layer.sparse = SparseDelta(layer.out_features, layer.in_features, torch.arange(0, 50, 3))
    counts = stored_bytes(tiny_llama)
    save_compact(tiny_llama, tmp_path / "fp32")
    assert counts["total"] == _safetensors_data_bytes(tmp_path / "fp32" / "model.safetensors")
    assert counts["sparse_index"] == 17 * 4 and counts["sparse_values"] == 17 * 4  # int32 positions
    low_rank = sum((m.in_features + m.out_features) * m.rank + (m.out_features if m.bias is not None else 0)
                   for m in tiny_llama.modules() if isinstance(m, FactorizedLinear))
    assert counts["low_rank"] == 4 * low_rank
    embed = tiny_llama.model.embed_tokens.weight
    assert counts["dense"] >= 4 * embed.numel()  # tied with lm_head: stored once
    assert counts["total"] == sum(counts[kind] for kind in ("dense", "low_rank", "sparse_values", "sparse_index",
                                                            "buffers"))

    compact = load_compact(tmp_path / "fp32").to(torch.bfloat16)
    assert any(isinstance(m, LowRankLinear) for m in compact.modules())
    half = stored_bytes(compact)
    save_compact(compact, tmp_path / "bf16")
    assert half["total"] == _safetensors_data_bytes(tmp_path / "bf16" / "model.safetensors")
    assert half["low_rank"] == counts["low_rank"] // 2 and half["sparse_index"] == counts["sparse_index"]
    assert name in json.loads((tmp_path / "bf16" / "rank_map.json").read_text())


def test_bitmask_weights_and_int32_positions_round_trip_exactly(tiny_llama, tmp_path):
    """A pruned linear marked for the bitmask format stores its non-zeros and one bit an entry; a sparse correction's
    positions go as int32; load_compact gives back the very same model, and the file holds what stored_bytes says."""
    from jactus.core import LowRankLinear, stored_bytes
    from jactus.core.compact import bitmask_bytes, pack_bitmask, unpack_bitmask
    from jactus.core.factorize import apply_rank_map
    from jactus.core.sparse import SparseDelta

    mask = torch.rand(7, 13) > 0.4
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == bitmask_bytes(7, 13) == 12
    assert torch.equal(unpack_bitmask(packed, (7, 13)), mask)

    pruned = tiny_llama.model.layers[0].mlp.gate_proj
    with torch.no_grad():
        pruned.weight.mul_(torch.rand_like(pruned.weight) > 0.75)
    pruned.jactus_weight_format = "bitmask"
    nnz = int(torch.count_nonzero(pruned.weight))
    apply_rank_map(tiny_llama, {"model.layers.1.mlp.up_proj": 4}, LowRankLinear)
    low_rank = tiny_llama.model.layers[1].mlp.up_proj
    with torch.no_grad():
        for param in low_rank.parameters():
            param.normal_()
    low_rank.sparse = SparseDelta(low_rank.out_features, low_rank.in_features, torch.tensor([3, 40, 500]),
                                  torch.tensor([0.5, -1.0, 2.0]))
    dense_bytes = stored_bytes(tiny_llama)
    assert dense_bytes["sparse_values"] == 4 * (nnz + 3)
    assert dense_bytes["sparse_index"] == bitmask_bytes(*pruned.weight.shape) + 3 * 4
    save_compact(tiny_llama, tmp_path / "c")
    assert dense_bytes["total"] == _safetensors_data_bytes(tmp_path / "c" / "model.safetensors")

    loaded = load_compact(tmp_path / "c")
    assert torch.equal(loaded.model.layers[0].mlp.gate_proj.weight, pruned.weight)
    assert loaded.model.layers[1].mlp.up_proj.sparse.index.dtype == torch.long
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.sparse.index, torch.tensor([3, 40, 500]))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    assert stored_bytes(loaded) == dense_bytes  # a resave keeps the format
