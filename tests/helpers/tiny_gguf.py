"""Write a Hugging Face Llama's weights as a GGUF file in llama.cpp's layout, so tests load a real GGUF checkpoint
(`from_pretrained(dir, gguf_file=...)`) without a download: the same route as the embedded SmolLM2."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# transformers' Llama parameter names (after `model.layers.{i}.`) -> llama.cpp's tensor names (after `blk.{i}.`)
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _rotary_interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows with each head's two rotary halves interleaved; transformers undoes this on load."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_llama_gguf(model, path: str | Path, name: str = "tiny-llama") -> Path:
    """Write `model` (a transformers `LlamaForCausalLM`) to the GGUF file `path` with F32 tensors; an untied output
    embedding is written as `output.weight` (llama.cpp leaves it out when tied)."""
    import gguf

    config = model.config
    state = {key: value.detach().float().cpu().numpy() for key, value in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = state[f"model.layers.{layer}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                weight = _rotary_interleave(weight, config.num_attention_heads)
            elif gguf_name == "attn_k.weight":
                weight = _rotary_interleave(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
