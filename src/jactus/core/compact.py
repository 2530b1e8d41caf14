"""The deployable compact model (docs/METHOD.md section 5).

A compact directory holds
- `model.safetensors`: every parameter and buffer (non-persistent ones such as rotary `inv_freq` too, so a meta-device
  rebuild is exact), each `FactorizedLinear` folded into `LowRankLinear` weights (`down.weight = V^T`,
  `up.weight = U C`); a tensor shared by several names (tied embeddings) is stored once, the other names recorded as
  aliases in the file's metadata;
  a linear marked `jactus_weight_format = "bitmask"` (TACO's pruned layers) stores its weight as `<layer>.weight_values`
  (the non-zeros, row-major) and `<layer>.weight_bitmask` (one bit an entry, uint8, least significant bit first),
  and a sparse correction's flat positions are stored as int32 where they fit (both listed in the metadata and
  decoded by `load_compact`), so the file's bytes are what the budget in bytes counts (docs/METHOD.md section 5);
- `rank_map.json`: layer -> rank (low-rank layers) or null (targets kept dense); layers that share one input basis
  (docs/METHOD.md section 3.3) share one `down`, stored once (the others are aliases of it);
- `arch.json`: how to rebuild the backbone without its weights: `{"library": "timm", "name", "kwargs"}` or
  `{"library": "transformers", "config": config.to_dict(), "class": ...}`;
- `generation_config.json` (a model that has a generation config): its own generation settings (sampling defaults,
  stop ids), which a model rebuilt from its config alone would not have; `load_compact` and jactus-export carry them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .factorize import apply_rank_map, fold_layers
from .layers import FactorizedLinear, LowRankLinear

WEIGHTS_FILE, RANK_MAP_FILE, ARCH_FILE = "model.safetensors", "rank_map.json", "arch.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_ALIASES, _NON_PERSISTENT, _ENCODED = "jactus_aliases", "jactus_non_persistent_buffers", "jactus_encoded"
BITMASK_FORMAT = "bitmask"  # the value of a linear's `jactus_weight_format` that stores its weight as non-zeros + bits
_BITS = 2 ** torch.arange(8, dtype=torch.int32)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, one bit an entry in row-major order, least significant bit first."""
    flat = mask.flatten()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8).to(torch.int32) * _BITS.to(flat.device)).sum(1).to(torch.uint8)


def unpack_bitmask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of `shape` that `pack_bitmask` packed."""
    bits = (packed.to(torch.int32).unsqueeze(1) & _BITS.to(packed.device)).ne(0).flatten()
    return bits[: math.prod(shape)].view(shape)


def bitmask_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one layer's bitmask."""
    return math.ceil(out_features * in_features / 8)


def _encode(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """Rewrite `tensors` in place into the stored encodings (module docstring); returns what `_decode` needs."""
    bitmask: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if getattr(module, "jactus_weight_format", None) == BITMASK_FORMAT and isinstance(module, nn.Linear):
            key = f"{name}.weight" if name else "weight"
            weight = tensors.pop(key).detach()
            nonzero = weight != 0
            tensors[f"{key}_values"] = weight[nonzero]
            tensors[f"{key}_bitmask"] = pack_bitmask(nonzero)
            bitmask[key] = list(weight.shape)
    int32 = []
    for name, tensor in list(tensors.items()):
        if name.endswith(".sparse.index") and (not tensor.numel() or int(tensor.max()) < 2**31):
            tensors[name] = tensor.to(torch.int32)
            int32.append(name)
    return {"bitmask": bitmask, "int32": int32}


def _decode(tensors: dict[str, torch.Tensor], encoded: Mapping) -> None:
    """Undo `_encode` in place: dense weights from non-zeros + bitmask, int64 positions."""
    for key, shape in encoded.get("bitmask", {}).items():
        values, packed = tensors.pop(f"{key}_values"), tensors.pop(f"{key}_bitmask")
        mask = unpack_bitmask(packed, tuple(shape))
        weight = torch.zeros(tuple(shape), dtype=values.dtype, device=values.device)
        weight[mask] = values
        tensors[key] = weight
    for name in encoded.get("int32", []):
        tensors[name] = tensors[name].long()


def _architecture(model: nn.Module, arch: Mapping | None) -> dict:
    arch = arch if arch is not None else getattr(model, "jactus_arch", None)
    if arch is None and hasattr(model, "config") and hasattr(model.config, "to_dict"):
        arch = {"library": "transformers", "config": model.config.to_dict()}
    if arch is None:
        raise ValueError(f"save_compact needs the architecture of {type(model).__name__}: pass arch= "
                         "{'library': 'timm', 'name': ..., 'kwargs': {...}} or set model.jactus_arch")
    arch = dict(arch)
    if arch.get("library") not in ("timm", "transformers"):
        raise ValueError(f"arch library {arch.get('library')!r}: expected 'timm' or 'transformers'")
    if arch["library"] == "transformers" and "class" not in arch and hasattr(model, "config"):
        arch["class"] = type(model).__name__
    return arch


def rank_map_of(model: nn.Module) -> dict[str, int | None]:
    """Low-rank layers with their ranks, plus the targets a plan kept dense (null)."""
    modules = dict(model.named_modules())
    ranks: dict[str, int | None] = {name: module.rank for name, module in modules.items()
                                    if isinstance(module, (FactorizedLinear, LowRankLinear))}
    for name, rank in getattr(model, "jactus_rank_map", {}).items():
        if rank is None and isinstance(modules.get(name), nn.Linear):
            ranks[name] = None
    return ranks


def deployed_tensors(model: nn.Module, encode: bool = True) -> tuple[dict[str, torch.Tensor], set[str], dict]:
    """name -> tensor of every parameter and buffer (aliases included), factorized layers folded and, with `encode`,
    the stored encodings applied (module docstring); the names of non-persistent buffers; and the encodings
    (`_encode`; empty without `encode`: a pruned layer's weight keeps its zeros, positions stay int64)."""
    persistent = set(model.state_dict(keep_vars=True))
    tensors: dict[str, torch.Tensor] = {}
    non_persistent: set[str] = set()
    folded_prefixes = []
    # layers that share one input basis fold to one `down`, stored once
    for name, deployed in fold_layers(model.named_modules(remove_duplicate=False)).items():
        prefix = f"{name}." if name else ""
        folded_prefixes.append(prefix)
        for key, value in deployed.state_dict().items():
            tensors[prefix + key] = value
    for name, value in model.named_parameters(remove_duplicate=False):
        if not any(name.startswith(prefix) for prefix in folded_prefixes):
            tensors[name] = value
    for name, value in model.named_buffers(remove_duplicate=False):
        if not any(name.startswith(prefix) for prefix in folded_prefixes):
            tensors[name] = value
            if name not in persistent:
                non_persistent.add(name)
    return tensors, non_persistent, _encode(tensors, model) if encode else {}


def _distinct_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], set[str], dict]:
    """name -> tensor of each distinct deployed tensor (factorized layers folded, encodings applied; not copied), the
    aliases (a name -> the name of the same tensor: tied weights), the names of non-persistent buffers and the
    encodings."""
    tensors, non_persistent, encoded = deployed_tensors(model)
    distinct: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owner: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in owner:  # the same tensor under another name (tied weights)
            aliases[name] = owner[key]
            continue
        owner[key] = name
        distinct[name] = tensor
    return distinct, aliases, non_persistent, encoded


BYTE_KINDS = ("dense", "low_rank", "sparse_values", "sparse_index", "buffers")


def stored_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """The deployed model's bytes as `save_compact` stores them (the tensor data of `model.safetensors`, without its
    JSON header), by kind: `low_rank` (the folded factors of low-rank layers and their biases), `sparse_values` and
    `sparse_index` (the non-zeros of a sparse correction or of a pruned weight stored as a bitmask, and their
    positions: int32 flat positions, or the bitmask), `buffers` (non-trainable state such
    as rotary tables), `dense` (every other parameter: embeddings, dense linears, norms, heads), and `total`. A
    pruned linear marked for the bitmask format (TACO's export) counts its non-zeros and bitmask.
    `dtype`: count floating-point tensors as if cast to it (the dense model's bytes in the deployed model's dtype)."""
    distinct, _, _, _ = _distinct_tensors(model)
    low_rank = [f"{name}." for name, module in model.named_modules()
                if isinstance(module, (FactorizedLinear, LowRankLinear))]
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    counts = dict.fromkeys(BYTE_KINDS, 0)
    for name, tensor in distinct.items():
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        size = tensor.numel() * cast.itemsize
        if name.endswith((".sparse.values", ".weight_values")):
            kind = "sparse_values"
        elif name.endswith((".sparse.index", ".weight_bitmask")):
            kind = "sparse_index"
        elif any(name.startswith(prefix) for prefix in low_rank):
            kind = "low_rank"
        elif name in parameters:
            kind = "dense"
        else:
            kind = "buffers"
        counts[kind] += size
    counts["total"] = sum(counts[kind] for kind in BYTE_KINDS)
    return counts


def save_compact(model: nn.Module, path: str | Path, arch: Mapping | None = None) -> Path:
    """Write the deployable model to the directory `path` (created); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    arch = _architecture(model, arch)
    rank_map = rank_map_of(model)
    distinct, aliases, non_persistent, encoded = _distinct_tensors(model)
    unique: dict[str, torch.Tensor] = {}
    saved_storages: set[int] = set()
    for name, tensor in distinct.items():
        copy = tensor.cpu().contiguous()
        # safetensors refuses tensors that share memory: a view of a larger or already saved storage is copied.
        storage = copy.untyped_storage()
        if storage.data_ptr() in saved_storages or storage.nbytes() != copy.numel() * copy.element_size():
            copy = copy.clone()
        saved_storages.add(copy.untyped_storage().data_ptr())
        unique[name] = copy
    path.mkdir(parents=True, exist_ok=True)
    metadata = {_ALIASES: json.dumps(aliases), _NON_PERSISTENT: json.dumps(sorted(non_persistent)),
                _ENCODED: json.dumps(encoded), "format": "pt"}
    save_file(unique, str(path / WEIGHTS_FILE), metadata=metadata)
    (path / RANK_MAP_FILE).write_text(json.dumps(rank_map, indent=2))
    (path / ARCH_FILE).write_text(json.dumps(arch, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.to_json_file(str(path / GENERATION_CONFIG_FILE), use_diff=True)
    return path


def shared_groups(aliases: Mapping[str, str]) -> list[list[str]]:
    """The layers that share one input basis, from a compact file's aliases (`<member>.down.weight` -> the first
    member's): each group, first member first."""
    groups: dict[str, list[str]] = {}
    suffix = ".down.weight"
    for alias, name in aliases.items():
        if alias.endswith(suffix) and name.endswith(suffix):
            groups.setdefault(name.removesuffix(suffix), [name.removesuffix(suffix)]).append(alias.removesuffix(suffix))
    return list(groups.values())


def build_architecture(arch: Mapping) -> nn.Module:
    """The backbone described by `arch`, built on the meta device (no weights read, no hub access)."""
    with torch.device("meta"):
        if arch["library"] == "timm":
            import timm

            return timm.create_model(arch["name"], pretrained=False, **arch.get("kwargs", {}))
        import transformers

        config_dict = dict(arch["config"])
        config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        class_name = arch.get("class") or (config.architectures or [None])[0]
        if class_name is not None:
            return getattr(transformers, class_name)(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def attach_sparse_structure(model: nn.Module, nnz: Mapping[str, int], device=None) -> None:
    """Give each named low-rank layer an empty sparse correction with that many non-zeros (structure to load a
    state dict into: a compact model, a checkpoint to resume)."""
    from .sparse import SparseDelta

    for name, count in nnz.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, (FactorizedLinear, LowRankLinear)):
            raise ValueError(f"{name} carries a sparse correction but is {type(layer).__name__}, not a low-rank layer")
        index = torch.zeros(count, dtype=torch.long, device=device)
        layer.sparse = SparseDelta(layer.out_features, layer.in_features, index,
                                   torch.zeros(count, device=device))


def load_compact(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the compact model saved by `save_compact` on `device`, in eval mode, with `model.jactus_arch` set."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    expected = {WEIGHTS_FILE: "the folded weights", RANK_MAP_FILE: "layer -> rank", ARCH_FILE: "the backbone"}
    for file, what in expected.items():
        if not (path / file).is_file():
            raise FileNotFoundError(f"compact model: {path / file} not found (expected {what}, written by "
                                    f"save_compact)")
    arch = json.loads((path / ARCH_FILE).read_text())
    rank_map = json.loads((path / RANK_MAP_FILE).read_text())
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
        metadata = handle.metadata() or {}
    aliases = json.loads(metadata.get(_ALIASES, "{}"))
    non_persistent = set(json.loads(metadata.get(_NON_PERSISTENT, "[]")))
    encoded = json.loads(metadata.get(_ENCODED, "{}"))
    tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    _decode(tensors, encoded)
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]

    model = build_architecture(arch)
    apply_rank_map(model, rank_map, LowRankLinear, shared=shared_groups(aliases))
    attach_sparse_structure(model, {name[: -len(".sparse.values")]: tensor.numel() for name, tensor in tensors.items()
                                    if name.endswith(".sparse.values")}, device=device)
    state = {name: tensor for name, tensor in tensors.items() if name not in non_persistent}
    model.load_state_dict(state, strict=True, assign=True)
    for name in non_persistent:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner.register_buffer(leaf, tensors[name], persistent=False)
    # Re-tie: every alias becomes the very same Parameter object as the name it aliases.
    for alias, name in aliases.items():
        alias_owner, _, alias_leaf = alias.rpartition(".")
        source_owner, _, source_leaf = name.rpartition(".")
        source = getattr(model.get_submodule(source_owner) if source_owner else model, source_leaf)
        setattr(model.get_submodule(alias_owner) if alias_owner else model, alias_leaf, source)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"compact model {path}: tensors {left[:5]} were not in {WEIGHTS_FILE}")
    for key in encoded.get("bitmask", {}):  # saved again (a resave, an evaluation's copy) in the same format
        model.get_submodule(key.rpartition(".")[0]).jactus_weight_format = BITMASK_FORMAT
    model.jactus_arch = arch
    model.jactus_rank_map = rank_map
    if (path / GENERATION_CONFIG_FILE).is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model.eval()
