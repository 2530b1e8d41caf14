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
