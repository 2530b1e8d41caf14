"""A model read from a GGUF checkpoint (the embedded SmolLM2's route) is dequantised on load; its export must load
through lm-eval's `hf` backend (`HFLM`) as plain weights, with no quantization entry left in `config.json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import jactus
from jactus.hf_export import main
from jactus.models import byte_level_tokenizer, create_causal_lm

pytest.importorskip("gguf")
pytest.importorskip("lm_eval")
torch.set_num_threads(1)

HELPERS = Path(__file__).parent / "helpers"
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
REQUESTS = [("Question: is the sky blue?\n### Response:\n", "yes"),
            ("Question: is the sky blue?\n### Response:\n", "no"),
            ("The capital of France is", " Paris.")]


def _lm_batches(tokenizer, texts=("a short calibration text", "another line of text to calibrate on")):
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}]


def _loglikelihoods(lm) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=index)
                for index, pair in enumerate(REQUESTS)]
    return [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def _compress_and_export(loaded, tmp_path: Path, name: str, **compress_kwargs) -> tuple[Path, Path]:
    """Compress `loaded` (LoadedModel), save it as a compact directory with its tokenizer, run jactus-export on it."""
    model, _ = jactus.compress_model(loaded.model, _lm_batches(loaded.tokenizer), lambda m, b: m(**b).loss,
                                     progress=False, **compress_kwargs)
    compact_dir, out_dir = tmp_path / "compact", tmp_path / name
    jactus.save_compact(model, compact_dir)
    loaded.tokenizer.save_pretrained(compact_dir)
    main([str(compact_dir), str(out_dir)])
    return compact_dir, out_dir


def _assert_plain_export(out_dir: Path, gguf_file: str) -> None:
    config = json.loads((out_dir / "config.json").read_text())
    assert "quantization_config" not in config, config.get("quantization_config")
    assert config["jactus_source_quantization"]["quant_method"] == "gguf"  # where the weights came from
    assert config["jactus_source_quantization"]["gguf_file"] == gguf_file


def test_gguf_sourced_model_exports_plain_weights_that_lm_eval_loads(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    monkeypatch.syspath_prepend(str(HELPERS))
    from tiny_gguf import write_llama_gguf

    source = create_causal_lm(config=TINY_LLAMA)
    (tmp_path / "gguf").mkdir()
    write_llama_gguf(source.model, tmp_path / "gguf" / "tiny.gguf")
    loaded = create_causal_lm(name_or_path=str(tmp_path / "gguf"), gguf_file="tiny.gguf",
                              tokenizer=byte_level_tokenizer())
    assert loaded.model.config.quantization_config.quant_method == "gguf"
    compact_dir, out_dir = _compress_and_export(loaded, tmp_path, "hf_from_gguf", budget=0.7, rank_multiple=4)

    exported = HFLM(pretrained=str(out_dir), trust_remote_code=True, device="cpu", batch_size=4)
    assert type(exported.model).__name__ == "JactusForCausalLM"
    _assert_plain_export(out_dir, "tiny.gguf")
    compact = HFLM(pretrained=jactus.load_compact(compact_dir), tokenizer=loaded.tokenizer, device="cpu",
                   batch_size=4)
    torch.testing.assert_close(torch.tensor(_loglikelihoods(exported)), torch.tensor(_loglikelihoods(compact)),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.assets
@pytest.mark.slow
def test_embedded_smollm2_export_loads_in_lm_eval(tmp_path):
    """The user's path: the embedded SmolLM2 (a Q4_1 GGUF), compressed (two layers, one tiny batch), exported and
    scored by lm-eval's `hf` backend."""
    from lm_eval.models.huggingface import HFLM

    loaded = create_causal_lm(embedded="smollm2_135m")
    gguf_file = loaded.model.config.quantization_config.gguf_file
    targets = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    _, out_dir = _compress_and_export(loaded, tmp_path, "hf_smollm2", budget=0.993, targets=targets,
                                      rank_multiple=32)
    exported = HFLM(pretrained=str(out_dir), trust_remote_code=True, device="cpu", batch_size=4)
    _assert_plain_export(out_dir, gguf_file)
    scores = _loglikelihoods(exported)
    assert all(score < 0 for score in scores)
    assert scores[2] > -10  # " Paris." after "The capital of France is": the compressed model still knows it
