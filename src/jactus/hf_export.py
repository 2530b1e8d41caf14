"""Export a compact causal LM as a Hugging Face directory that loads without jactus (docs/HF_EXPORT.md).

`export_hf(compact, out_dir)` writes `config.json` (the base family's config plus `auto_map`, `jactus_rank_map` and,
for sparse corrections, `jactus_sparse_nnz`; without the source's `quantization_config`, since the weights written
are plain tensors), `model.safetensors` (the low-rank layers as `<name>.down.weight` / `<name>.up.weight` /
`<name>.up.bias`, a sparse correction as `<name>.sparse.index` / `<name>.sparse.values`), the model's own
`generation_config.json`, the remote code (`configuration_jactus.py`, `modeling_jactus.py`, `jactus_base.py`) and the
tokenizer when there is one. `AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` then loads it
with torch and transformers alone. timm models have no such loader: their deployable format is the compact
directory itself (`load_compact`).

Run `jactus-export COMPACT_DIR OUT_DIR [--tokenizer PATH] [--overwrite]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .core.compact import (
    ARCH_FILE,
    GENERATION_CONFIG_FILE,
    WEIGHTS_FILE,
    deployed_tensors,
    load_compact,
    rank_map_of,
)
from .core.layers import FactorizedLinear, LowRankLinear
from .core.precision import model_dtype
from .core.sparse import SparseDelta

# Causal LMs of the Llama family: decoder layers of nn.Linear projections that a rank map can name one by one.
SUPPORTED_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
REMOTE_CODE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_CODE_FILES = ("configuration_jactus.py", "modeling_jactus.py")
BASE_FILE = "jactus_base.py"
AUTO_MAP = {"AutoConfig": "configuration_jactus.JactusConfig",
            "AutoModelForCausalLM": "modeling_jactus.JactusForCausalLM"}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
TIMM_MESSAGE = ("timm models have no Hugging Face loader to export to: their deployable format is the compact "
                "directory itself, read back with jactus.load_compact (see docs/HF_EXPORT.md)")

BASE_TEMPLATE = '''"""Written by jactus-export: the transformers classes this low-rank model extends."""

from transformers import {config_class} as BaseConfig
from transformers import {model_class} as BaseForCausalLM

BASE_MODEL_TYPE = "{model_type}"
'''


def _check_exportable(model: nn.Module) -> None:
    if getattr(model, "jactus_arch", {}).get("library") == "timm" or type(model).__module__.startswith("timm."):
        raise ValueError(f"cannot export {type(model).__name__} to the Hugging Face format: {TIMM_MESSAGE}")
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES or not hasattr(model, "config"):
        raise ValueError(f"cannot export {name} to the Hugging Face format; supported causal LMs: "
                         f"{', '.join(SUPPORTED_CLASSES)}")
    for layer_name, module in model.named_modules():
        sparse = getattr(module, "sparse", None)
        if isinstance(sparse, nn.Module) and not (isinstance(module, (FactorizedLinear, LowRankLinear))
                                                  and isinstance(sparse, SparseDelta)):
            raise ValueError(f"cannot export the sparse correction {type(sparse).__name__} of {layer_name} "
                             f"({type(module).__name__}): the exported code carries SparseDelta corrections of "
                             f"low-rank layers (FactorizedLinear, LowRankLinear) only")
    for tensor_name, tensor in model.state_dict(keep_vars=True).items():
        if not (tensor.is_floating_point() or tensor_name.endswith(".sparse.index")):
            raise ValueError(f"cannot export {tensor_name}, stored as {tensor.dtype}: a quantized weight, which the "
                             f"Hugging Face export writes only as a plain floating-point tensor; load the model "
                             f"dequantised and compress that")


def _sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The low-rank layers that have a sparse correction, by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (FactorizedLinear, LowRankLinear)) and module.sparse is not None}


def _tied_output_key(model: nn.Module) -> str | None:
    """The state-dict key of the output embedding's weight when it is the input embedding's weight, else None."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(output, nn.Linear) or output.weight is not embedding.weight:
        return None
    name = next(name for name, module in model.named_modules() if module is output)
    return f"{name}.weight"


def _sparse_index_dtype(out_features: int, in_features: int) -> torch.dtype:
    """The dtype of a sparse correction's flat positions in the export: int32 where every position of the matrix fits
    (as the compact format stores them), else int64; `SparseCorrection` in modeling_jactus.py applies the same rule."""
    return torch.int32 if out_features * in_features <= 2**31 else torch.int64


def _weights(model: nn.Module, tied_key: str | None) -> dict[str, torch.Tensor]:
    """Every persistent tensor, factorized layers folded, the tied output weight left out (transformers re-ties)."""
    # plain tensors: the exported code reads dense weights (a pruned layer's zeros too) and its own position dtype
    tensors, non_persistent, _ = deployed_tensors(model, encode=False)
    index_dtypes = {f"{name}.sparse.index": _sparse_index_dtype(layer.out_features, layer.in_features)
                    for name, layer in _sparse_layers(model).items()}
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if name in non_persistent or name == tied_key:
            continue
        tensor = tensor.detach().cpu().contiguous()
        if name in index_dtypes:
            tensor = tensor.to(index_dtypes[name])
        # safetensors refuses tensors that share memory (views, or one tensor under two names): those are copied.
        storage = tensor.untyped_storage()
        if storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _config(model: nn.Module, rank_map: dict[str, int], sparse_nnz: dict[str, int], tied: bool) -> dict:
    config = model.config.to_diff_dict()  # what save_pretrained writes: the values that differ from the defaults
    # The weights written are plain floating-point tensors (_check_exportable refuses any other), so a quantization
    # entry of the source (a GGUF file dequantised on load, say) would make transformers look for quantized weights
    # that are not there; it is kept, for the record, under a name no loader reads.
    source_quantization = config.pop("quantization_config", None)
    if source_quantization is not None:
        config["jactus_source_quantization"] = source_quantization
    config.update(model_type=f"jactus_{model.config.model_type}", architectures=["JactusForCausalLM"],
                  auto_map=AUTO_MAP, jactus_base_class=type(model).__name__, jactus_rank_map=rank_map,
                  tie_word_embeddings=tied)
    if sparse_nnz:
        config["jactus_sparse_nnz"] = sparse_nnz
    dtype_key = "dtype" if "dtype" in model.config.to_dict() else "torch_dtype"  # transformers < 4.56: torch_dtype
    # the backbone's dtype: trainable tensors (norms, cores, sparse values) may be fp32 on a bf16 model
    config[dtype_key] = str(model_dtype(model)).removeprefix("torch.")
    return config


def _write_tokenizer(tokenizer, compact_dir: Path | None, out_dir: Path) -> bool:
    if tokenizer is None and compact_dir is not None and any((compact_dir / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = str(compact_dir)
    if tokenizer is None:
        return False
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    tokenizer.save_pretrained(str(out_dir))
    return True


def _prepare_out_dir(out_dir: Path, compact_dir: Path | None, overwrite: bool) -> None:
    if compact_dir is not None and out_dir.resolve() == compact_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the compact directory itself; give another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; give a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out_dir {out_dir} is not empty; give an empty or new directory, or overwrite=True "
                                  "(--overwrite) to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def export_hf(compact: str | Path | nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `compact` (a directory written by `save_compact`, or the compact or factorized model itself) as a
    Hugging Face directory with its own modeling code; returns `out_dir`.

    `tokenizer`: a tokenizer, or a directory / hub id to load one from; by default the compact directory's tokenizer
    when it has one. `overwrite` replaces a non-empty `out_dir`.
    """
    compact_dir = None
    if isinstance(compact, (str, Path)):
        compact_dir = Path(compact)
        arch_file = compact_dir / ARCH_FILE
        if arch_file.is_file() and json.loads(arch_file.read_text()).get("library") == "timm":
            raise ValueError(f"cannot export {compact_dir} to the Hugging Face format: {TIMM_MESSAGE}")
        model = load_compact(compact_dir)
    elif isinstance(compact, nn.Module):
        model = compact
    else:
        raise TypeError(f"compact is a {type(compact).__name__}; expected a compact directory or an nn.Module")
    _check_exportable(model)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, compact_dir, overwrite)

    from safetensors.torch import save_file

    rank_map = {name: rank for name, rank in rank_map_of(model).items() if rank is not None}
    tied_key = _tied_output_key(model)
    if tied_key is not None and tied_key.removesuffix(".weight") in rank_map:
        tied_key = None  # a low-rank output layer is not tied (it has no single weight)
    save_file(_weights(model, tied_key), str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    sparse_nnz = {name: layer.sparse.nnz for name, layer in _sparse_layers(model).items()}
    config = _config(model, rank_map, sparse_nnz, tied=tied_key is not None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:  # the compact directory's own, via load_compact
        model.generation_config.to_json_file(str(out_dir / GENERATION_CONFIG_FILE), use_diff=True)
    for file in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / file, out_dir / file)
    (out_dir / BASE_FILE).write_text(BASE_TEMPLATE.format(
        config_class=type(model.config).__name__, model_class=type(model).__name__,
        model_type=model.config.model_type))
    with_tokenizer = _write_tokenizer(tokenizer, compact_dir, out_dir)
    sparse = f", {len(sparse_nnz)} with sparse corrections" if sparse_nnz else ""
    print(f"jactus-export: {type(model).__name__} with {len(rank_map)} low-rank layers{sparse} -> {out_dir}"
          f"{' (with tokenizer)' if with_tokenizer else ' (no tokenizer)'}")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="jactus-export",
        description="Write a compact causal LM as a Hugging Face directory that "
                    "AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True) loads without jactus.")
    parser.add_argument("compact_dir", help="directory written by save_compact / jactus-compress")
    parser.add_argument("out_dir", help="directory to write (new or empty)")
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the compact directory's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        export_hf(args.compact_dir, args.out_dir, tokenizer=args.tokenizer, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        parser.exit(2, f"jactus-export: error: {error}\n")


if __name__ == "__main__":
    main()
