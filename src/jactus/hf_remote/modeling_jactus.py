"""A causal LM whose listed linear layers are low-rank, `up(down(x))`, loaded through `auto_map` (written by
jactus-export). Needs torch and transformers only.

`JactusForCausalLM` is the base family's causal LM (`jactus_base.py`) with each layer of `config.jactus_rank_map`
swapped for a `LowRankLinear` of that rank; every other layer stays as the family builds it, so `generate`,
caching and the tokenizer work as for the base model.
"""

from torch import nn

from .configuration_jactus import JactusConfig
from .jactus_base import BaseForCausalLM


class LowRankLinear(nn.Module):
    """`up(down(x))`: `down` in -> rank without bias, `up` rank -> out with the bias of the layer it replaces."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.up(self.down(x))


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
            if not isinstance(rank, int) or not 1 <= rank <= min(linear.in_features, linear.out_features):
                raise ValueError(f"jactus_rank_map gives {name!r} rank {rank!r}; valid: an integer in "
                                 f"[1, {min(linear.in_features, linear.out_features)}]")
            weight = linear.weight
            setattr(parent, leaf, LowRankLinear(linear.in_features, linear.out_features, rank,
                                                bias=linear.bias is not None, device=weight.device,
                                                dtype=weight.dtype))
