"""jactus: Joint Adaptation and Compression with a Task-aware Union of Subspaces."""

from .core import (
    CalibrationStats,
    FactorizedLinear,
    LayerStats,
    LowRankLinear,
    RankPlan,
    apply_rank_map,
    calibrate,
    compress_model,
    count_params,
    factorize,
    find_targets,
    load_compact,
    plan_ranks,
    save_compact,
    warmup_head,
)
from .hf_export import export_hf

__all__ = [
    "CalibrationStats", "FactorizedLinear", "LayerStats", "LowRankLinear", "RankPlan", "apply_rank_map", "calibrate",
    "compress_model", "count_params", "export_hf", "factorize", "find_targets", "load_compact", "plan_ranks",
    "save_compact", "warmup_head",
]
