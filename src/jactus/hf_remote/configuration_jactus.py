"""Configuration of a causal LM compressed by jactus, loaded through `auto_map` (written by jactus-export).

It is the base family's configuration plus `jactus_rank_map` (layer name -> rank of its low-rank replacement) and,
when some layers have sparse corrections, `jactus_sparse_nnz` (layer name -> number of non-zeros), which
`config.json` carries and the base class keeps as extra attributes. Needs torch and transformers only.
"""

from .jactus_base import BASE_MODEL_TYPE, BaseConfig


class JactusConfig(BaseConfig):
    # A model type of its own: without trust_remote_code, transformers refuses the directory instead of building the
    # dense base model and leaving the low-rank weights unread.
    model_type = f"jactus_{BASE_MODEL_TYPE}"
    # The family's tensor-parallel plan names plain linear layers; the low-rank ones have no such split.
    base_model_tp_plan = None
