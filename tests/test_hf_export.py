"""jactus-export: a compact causal LM becomes a Hugging Face directory that a fresh process, where jactus cannot be
imported, loads with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and runs as the compact
model does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import jactus
from jactus.hf_export import SUPPORTED_CLASSES, main

pytest.importorskip("transformers")
torch.set_num_threads(1)

# Runs with `python -I` in tmp_path: `import jactus` (or any jactus.*) raises, so only the exported code can load.
LOADER = r"""
import importlib.abc, json, sys

class NoJactus(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "jactus":
            raise ImportError(f"{name} is hidden: the export must load without jactus")
        return None

sys.meta_path.insert(0, NoJactus())
sys.modules["jactus"] = None
try:
    import jactus
    raise SystemExit("jactus is importable")
except ImportError:
    pass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

root = sys.argv[1]
inputs = torch.load(f"{root}/inputs.pt")
outputs, report = {}, {}
for name in inputs["models"]:
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        outputs[name] = model(input_ids=inputs["input_ids"]).logits
        outputs[name + ".generated"] = model.generate(inputs["input_ids"][:1], max_new_tokens=4, do_sample=False)
    report[name] = {"class": type(model).__name__,
                    "lowrank": sorted(n for n, m in model.named_modules() if type(m).__name__ == "LowRankLinear"),
                    "tied": model.lm_head.weight is model.model.embed_tokens.weight}
tokenizer = AutoTokenizer.from_pretrained(f"{root}/llama", trust_remote_code=True)
report["tokenized"] = tokenizer("hi")["input_ids"]
report["jactus_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "jactus" and sys.modules[m] is not None)
torch.save(outputs, f"{root}/outputs.pt")
print(json.dumps(report))
"""


def _lm_batches(count: int = 2, rows: int = 2, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, 256, (rows, length), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


def _qwen2_with_lowrank_layers():
    """A tiny Qwen2 (biased q/k/v projections) with two random low-rank layers and one target kept dense."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    jactus.apply_rank_map(model, {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.down_proj": 8,
                                  "model.layers.0.self_attn.k_proj": None}, jactus.LowRankLinear)
    with torch.no_grad():  # apply_rank_map leaves the new layers zero
        for module in model.modules():
            if isinstance(module, jactus.LowRankLinear):
                for param in module.parameters():
                    param.normal_(0, 0.1)
    return model


def test_export_loads_without_jactus_and_matches_the_compact_model(tmp_path):
    from jactus.models import create_causal_lm

    loaded = create_causal_lm(config={"tie_word_embeddings": True})
    compressed, plan = jactus.compress_model(loaded.model, _lm_batches(), lambda m, b: m(**b).loss, 0.7,
                                             rank_multiple=4, progress=False)
    jactus.save_compact(compressed, tmp_path / "compact")
    loaded.tokenizer.save_pretrained(tmp_path / "compact")
    main([str(tmp_path / "compact"), str(tmp_path / "llama")])  # the CLI, reading the compact directory
    jactus.export_hf(compressed, tmp_path / "factorized")  # the library call on the factorized (unfolded) model
    qwen2 = _qwen2_with_lowrank_layers()
    jactus.export_hf(qwen2, tmp_path / "qwen2")
    # shared input bases (q/k/v, gate/up): one `down` per group in the compact file, exported per layer
    shared, shared_plan = jactus.compress_model(create_causal_lm(config={"tie_word_embeddings": True}).model,
                                                _lm_batches(), lambda m, b: m(**b).loss, 0.7, rank_multiple=4,
                                                progress=False, share_bases=True)
    assert shared_plan.shared and any(shared_plan.ranks[group[0]] for group in shared_plan.shared)
    jactus.save_compact(shared, tmp_path / "compact_shared")
    main([str(tmp_path / "compact_shared"), str(tmp_path / "shared")])

    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    low_rank = {name: rank for name, rank in plan.ranks.items() if rank is not None}
    assert config["jactus_rank_map"] == low_rank and None in plan.ranks.values()
    assert config["model_type"] == "jactus_llama" and config["jactus_base_class"] == "LlamaForCausalLM"
    assert (tmp_path / "llama" / "tokenizer.json").is_file() and not (tmp_path / "qwen2" / "tokenizer.json").exists()

    input_ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    models = ["llama", "factorized", "qwen2", "shared"]
    torch.save({"input_ids": input_ids, "models": models}, tmp_path / "inputs.pt")
    compact = jactus.load_compact(tmp_path / "compact")
    with torch.no_grad():
        expected = {"llama": compact(input_ids=input_ids).logits, "qwen2": qwen2(input_ids=input_ids).logits,
                    "shared": jactus.load_compact(tmp_path / "compact_shared")(input_ids=input_ids).logits,
                    "llama.generated": compact.generate(input_ids[:1], max_new_tokens=4, do_sample=False)}

    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    outputs = torch.load(tmp_path / "outputs.pt")

    assert report["jactus_modules"] == []
    assert report["llama"] == {"class": "JactusForCausalLM", "lowrank": sorted(low_rank), "tied": True}
    assert report["qwen2"]["lowrank"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert report["tokenized"] == loaded.tokenizer("hi")["input_ids"]
    for name in ["llama", "factorized"]:
        torch.testing.assert_close(outputs[name], expected["llama"], rtol=1e-5, atol=1e-5)
        assert torch.equal(outputs[name + ".generated"], expected["llama.generated"])
    torch.testing.assert_close(outputs["qwen2"], expected["qwen2"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["shared"], expected["shared"], rtol=1e-5, atol=1e-5)

    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="trust_remote_code"):  # never the dense base with the low-rank weights unread
        AutoModelForCausalLM.from_pretrained(tmp_path / "llama", trust_remote_code=False)


def test_timm_models_stay_in_the_compact_format(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    kwargs = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=5)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    jactus.save_compact(vit, tmp_path / "vit", arch={"library": "timm", "name": "vit_tiny_patch16_224",
                                                     "kwargs": kwargs})
    with pytest.raises(ValueError, match="compact directory itself, read back with jactus.load_compact"):
        jactus.export_hf(tmp_path / "vit", tmp_path / "out")
    with pytest.raises(ValueError, match="timm models"):
        jactus.export_hf(vit, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "vit"), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "load_compact" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unsupported_class_and_non_empty_out_dir_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=f"GPT2LMHeadModel.*{SUPPORTED_CLASSES[0]}"):
        jactus.export_hf(gpt2, tmp_path / "gpt2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        jactus.export_hf(_qwen2_with_lowrank_layers(), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep"


def _load_exported(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs).eval()


def test_generation_config_travels_from_the_compact_directory(tmp_path):
    from transformers import GenerationConfig

    model = _qwen2_with_lowrank_layers()
    settings = dict(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=7, eos_token_id=[2, 7])
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0, **settings)
    jactus.save_compact(model, tmp_path / "compact")
    assert jactus.load_compact(tmp_path / "compact").generation_config.eos_token_id == [2, 7]
    main([str(tmp_path / "compact"), str(tmp_path / "hf_generation")])

    written = json.loads((tmp_path / "hf_generation" / "generation_config.json").read_text())
    assert {key: written.get(key) for key in settings} == settings
    loaded = _load_exported(tmp_path / "hf_generation").generation_config
    assert {key: getattr(loaded, key) for key in settings} == settings


def test_bf16_export_keeps_its_dtype_and_logits(tmp_path):
    from safetensors import safe_open

    from jactus.core.precision import autocast_for
    from jactus.models import create_causal_lm

    loaded = create_causal_lm(config={"tie_word_embeddings": True}, dtype="bfloat16")
    compressed, plan = jactus.compress_model(loaded.model, _lm_batches(), lambda m, b: m(**b).loss, 0.7,
                                             rank_multiple=4, progress=False)
    with torch.no_grad():  # trained norms (fp32 trainables), not the ones that bf16 holds exactly
        for name, param in compressed.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(3))
    jactus.save_compact(compressed, tmp_path / "compact")
    main([str(tmp_path / "compact"), str(tmp_path / "hf_bf16")])

    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf_bf16" / "model.safetensors"), framework="pt") as handle:
        dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    low_rank = [name for name in dtypes if name.endswith((".down.weight", ".up.weight"))]
    assert len(low_rank) == 2 * sum(rank is not None for rank in plan.ranks.values())
    assert {dtypes[name] for name in [*low_rank, "model.embed_tokens.weight"]} == {"BF16"}

    exported = _load_exported(tmp_path / "hf_bf16")  # dtype from config.json
    assert exported.dtype == torch.bfloat16 and exported.lm_head.weight is exported.model.embed_tokens.weight
    compact = jactus.load_compact(tmp_path / "compact")
    input_ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), autocast_for(compact, "cpu"):  # its norms and biases are fp32: run as bf16-mixed runs it
        expected = compact(input_ids=input_ids).logits.float()
    with torch.no_grad():
        logits = exported(input_ids=input_ids).logits
    assert logits.dtype == torch.bfloat16
    # the exported model computes in bf16 throughout (its norms too), the compact one under autocast: they differ by
    # bf16 rounding, a unit in the last place (2^-7 at logits near 1) here
    torch.testing.assert_close(logits.float(), expected, rtol=2e-2, atol=2e-2)


def test_sparse_corrections_export_and_match_the_compact_model(tmp_path):
    from jactus.methods import MethodContext
    from jactus.methods.jactus import Jactus
    from jactus.models import create_causal_lm

    loaded = create_causal_lm(config={})
    method = Jactus(budget=0.7, rank_multiple=4, sparse_share=0.1)
    model = method.apply(MethodContext(model=loaded.model, loss_fn=lambda m, b: m(**b).loss,
                                       calibration_batches=_lm_batches(), family="causal_lm"))
    with torch.no_grad():  # trained corrections (they start at zero, which would test nothing)
        for module in model.modules():
            if isinstance(module, jactus.FactorizedLinear):
                module.sparse.values.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    jactus.save_compact(method.export(model), tmp_path / "compact")
    main([str(tmp_path / "compact"), str(tmp_path / "hf_sparse")])

    config = json.loads((tmp_path / "hf_sparse" / "config.json").read_text())
    assert config["jactus_sparse_nnz"] == method.sparse_nnz and sum(method.sparse_nnz.values()) > 0
    exported = _load_exported(tmp_path / "hf_sparse", dtype=torch.float32)
    corrected = {name.removesuffix(".sparse") for name, module in exported.named_modules()
                 if type(module).__name__ == "SparseCorrection"}
    assert corrected == set(method.sparse_nnz)
    compact = jactus.load_compact(tmp_path / "compact")
    for name in corrected:  # the positions as the compact format stores them: int32
        index = exported.get_submodule(name).sparse.index
        assert index.dtype == torch.int32 and torch.equal(index.long(), compact.get_submodule(name).sparse.index)
    input_ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = compact(input_ids=input_ids).logits
        torch.testing.assert_close(exported(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)
        for name in corrected:
            exported.get_submodule(name).sparse = None
        assert (exported(input_ids=input_ids).logits - expected).abs().max() > 1e-3  # the corrections count


def test_quantized_weights_are_refused(tmp_path):
    model = _qwen2_with_lowrank_layers()
    embedding = model.get_input_embeddings()
    embedding.weight = torch.nn.Parameter(embedding.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="model.embed_tokens.weight, stored as torch.int8: a quantized weight"):
        jactus.export_hf(model, tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
