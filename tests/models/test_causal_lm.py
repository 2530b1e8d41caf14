from __future__ import annotations

import pytest
import torch

from jactus.models import byte_level_tokenizer, create_causal_lm

from .conftest import TINY_LLAMA


def test_tiny_llama_is_a_deterministic_gqa_model_with_an_offline_tokenizer():
    loaded = create_causal_lm(config=TINY_LLAMA)
    again = create_causal_lm(config=TINY_LLAMA)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert (loaded.family, loaded.head_names) == ("causal_lm", [])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == len(tokenizer) == 258
    torch.testing.assert_close(model.lm_head.weight, again.model.lm_head.weight)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.padding_side == "right"
    batch = tokenizer(["héllo wörld", "a"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (batch["input_ids"].shape[1] - 2)
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == "héllo wörld"
    assert model(**batch).logits.shape == (2, batch["input_ids"].shape[1], 258)


def test_tiny_llama_rebuilds_from_jactus_arch():
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = create_causal_lm(config=TINY_LLAMA)
    arch = loaded.model.jactus_arch
    assert arch["library"] == "transformers"
    config = AutoConfig.for_model(**arch["config"])
    copy = AutoModelForCausalLM.from_config(config)
    copy.load_state_dict(loaded.model.state_dict())
    ids = torch.tensor([[256, 70, 71, 72]])
    torch.testing.assert_close(copy.eval()(ids).logits, loaded.model.eval()(ids).logits)


def test_tokenizer_saves_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("abc")["input_ids"] == tokenizer("abc")["input_ids"]


def test_bad_sources_fail_early():
    with pytest.raises(ValueError, match="unknown embedded language model 'smollm3'.*smollm2_135m"):
        create_causal_lm(embedded="smollm3")
    with pytest.raises(ValueError, match="exactly one of"):
        create_causal_lm()
    with pytest.raises(ValueError, match="exactly one of"):
        create_causal_lm(name_or_path="x", config=TINY_LLAMA)
    with pytest.raises(ValueError, match="vocab_size=1000"):
        create_causal_lm(config={**TINY_LLAMA, "vocab_size": 1000})
    with pytest.raises(ValueError, match="dtype='float8'"):
        create_causal_lm(config=TINY_LLAMA, dtype="float8")


@pytest.mark.assets
def test_smollm2_answers_paris(smollm2):
    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert smollm2.model.jactus_arch["config"]["hidden_size"] == 576
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
