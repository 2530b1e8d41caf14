"""Export a compact causal LM as a Hugging Face directory that loads without jactus (docs/HF_EXPORT.md).

`export_hf(compact, out_dir)` writes `config.json` (the base family's config plus `auto_map` and `jactus_rank_map`),
`model.safetensors` (the low-rank layers as `<name>.down.weight` / `<name>.up.weight` / `<name>.up.bias`),
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

from .core.compact import ARCH_FILE, WEIGHTS_FILE, _deployed_tensors, _rank_map, load_compact

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
    sparse = [name for name, module in model.named_modules() if isinstance(getattr(module, "sparse", None), nn.Module)]
    if sparse:
        raise ValueError(f"cannot export a model with sparse corrections (method.sparse_share > 0; e.g. {sparse[0]}) "
                         f"to the Hugging Face format yet: load it with jactus.load_compact")
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES or not hasattr(model, "config"):
        raise ValueError(f"cannot export {name} to the Hugging Face format; supported causal LMs: "
                         f"{', '.join(SUPPORTED_CLASSES)}")


def _tied_output_key(model: nn.Module) -> str | None:
    """The state-dict key of the output embedding's weight when it is the input embedding's weight, else None."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(output, nn.Linear) or output.weight is not embedding.weight:
        return None
    name = next(name for name, module in model.named_modules() if module is output)
    return f"{name}.weight"


def _weights(model: nn.Module, tied_key: str | None) -> dict[str, torch.Tensor]:
    """Every persistent tensor, factorized layers folded, the tied output weight left out (transformers re-ties)."""
    tensors, non_persistent = _deployed_tensors(model)
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if name in non_persistent or name == tied_key:
            continue
        tensor = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (views, or one tensor under two names): those are copied.
        storage = tensor.untyped_storage()
        if storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _config(model: nn.Module, rank_map: dict[str, int], tied: bool) -> dict:
    config = model.config.to_diff_dict()  # what save_pretrained writes: the values that differ from the defaults
    config.update(model_type=f"jactus_{model.config.model_type}", architectures=["JactusForCausalLM"],
                  auto_map=AUTO_MAP, jactus_base_class=type(model).__name__, jactus_rank_map=rank_map,
                  tie_word_embeddings=tied)
    dtype_key = "dtype" if "dtype" in model.config.to_dict() else "torch_dtype"  # transformers < 4.56: torch_dtype
    config[dtype_key] = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
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

    rank_map = {name: rank for name, rank in _rank_map(model).items() if rank is not None}
    tied_key = _tied_output_key(model)
    if tied_key is not None and tied_key.removesuffix(".weight") in rank_map:
        tied_key = None  # a low-rank output layer is not tied (it has no single weight)
    save_file(_weights(model, tied_key), str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config = _config(model, rank_map, tied=tied_key is not None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))
    for file in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / file, out_dir / file)
    (out_dir / BASE_FILE).write_text(BASE_TEMPLATE.format(
        config_class=type(model.config).__name__, model_class=type(model).__name__,
        model_type=model.config.model_type))
    with_tokenizer = _write_tokenizer(tokenizer, compact_dir, out_dir)
    print(f"jactus-export: {type(model).__name__} with {len(rank_map)} low-rank layers -> {out_dir}"
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
