"""A causal LM whose listed linear layers are low-rank, `up(down(x))`, some with a sparse correction `S x`, loaded
through `auto_map` (written by jactus-export). Needs torch and transformers only.

`JactusForCausalLM` is the base family's causal LM (`jactus_base.py`) with each layer of `config.jactus_rank_map`
swapped for a `LowRankLinear` of that rank, and each layer of `config.jactus_sparse_nnz` given a `SparseCorrection`
with that many non-zeros; every other layer stays as the family builds it, so `generate`, caching and the tokenizer
work as for the base model.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_jactus import JactusConfig
from .jactus_base import BaseForCausalLM


class SparseCorrection(nn.Module):
    """`S x` for the out x in matrix `S` with `values` at the flat row-major positions `index` (row * in + column).

    The matrix is formed for each call in the input's dtype (as large as the dense weight, freed after the call) and
    applied with one matrix product, the operations of jactus's `SparseDelta`, so the logits are those of the
    compact model."""

    def __init__(self, out_features: int, in_features: int, nnz: int, device=None, dtype=None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        # int32 positions where the whole matrix is addressable with them (as jactus-export writes them)
        index_dtype = torch.int32 if out_features * in_features <= 2**31 else torch.int64
        self.register_buffer("index", torch.zeros(nnz, dtype=index_dtype, device=device))
        self.values = nn.Parameter(torch.zeros(nnz, device=device, dtype=dtype))

    def forward(self, x):
        flat = torch.zeros(self.out_features * self.in_features, dtype=x.dtype, device=x.device)
        matrix = flat.index_add(0, self.index, self.values.to(x.dtype)).view(self.out_features, self.in_features)
        return F.linear(x, matrix)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, nnz={self.index.numel()}"


class LowRankLinear(nn.Module):
    """`up(down(x))`: `down` in -> rank without bias, `up` rank -> out with the bias of the layer it replaces; plus
    `sparse(x)` when the layer has a sparse correction."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.sparse = None

    def forward(self, x):
        y = self.up(self.down(x))
        return y if self.sparse is None else y + self.sparse(x).to(y.dtype)


class JactusForCausalLM(BaseForCausalLM):
    config_class = JactusConfig

    def __init__(self, config: JactusConfig):
        super().__init__(config)
        rank_map = getattr(config, "jactus_rank_map", None) or {}
        if rank_map and getattr(config, "tie_word_embeddings", False) and "lm_head" in rank_map:
            raise ValueError("jactus_rank_map makes lm_head low-rank, so it cannot be tied to the input embedding: "
                             "set tie_word_embeddings to false")
        for name, rank in rank_map.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            linear = getattr(parent, leaf, None)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"jactus_rank_map names {name!r}, which is {type(linear).__name__} in "
                                 f"{type(self).__name__}, not nn.Linear")
            # up to the input width: layers that share one input basis may be wider than their output
            if not isinstance(rank, int) or not 1 <= rank <= linear.in_features:
                raise ValueError(f"jactus_rank_map gives {name!r} rank {rank!r}; valid: an integer in "
                                 f"[1, {linear.in_features}]")
            weight = linear.weight
            setattr(parent, leaf, LowRankLinear(linear.in_features, linear.out_features, rank,
                                                bias=linear.bias is not None, device=weight.device,
                                                dtype=weight.dtype))
        for name, nnz in (getattr(config, "jactus_sparse_nnz", None) or {}).items():
            if name not in rank_map:
                raise ValueError(f"jactus_sparse_nnz names {name!r}, which is not a low-rank layer of "
                                 f"jactus_rank_map; valid: {sorted(rank_map)}")
            layer = self.get_submodule(name)
            size = layer.up.out_features * layer.down.in_features
            if not isinstance(nnz, int) or not 0 <= nnz <= size:
                raise ValueError(f"jactus_sparse_nnz gives {name!r} {nnz!r} non-zeros; valid: an integer in "
                                 f"[0, {size}]")
            weight = layer.up.weight
            layer.sparse = SparseCorrection(layer.up.out_features, layer.down.in_features, nnz,
                                            device=weight.device, dtype=weight.dtype)
