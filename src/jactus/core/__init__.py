"""The JACTUS math in plain PyTorch (METHOD.md sections 1-5); no Lightning or Hydra here."""

from .allocation import ALLOCATORS, SCOPES, RankPlan, layer_spectra, plan_ranks
from .calibration import CalibrationStats, LayerStats, calibrate, default_loss_normalizer, warmup_head
from .compact import build_architecture, load_compact, save_compact
from .decompositions import Decompositions
from .factorize import apply_rank_map, factorize, fold_factorized
from .layers import FactorizedLinear, LowRankLinear
from .params import count_params, deployed_params, linear_cost
from .streaming import compress_model
from .subspace import STATS_MODES, factorize_layer, projected_core, union_subspace
from .targets import DEFAULT_TARGETS, find_targets

__all__ = [
    "ALLOCATORS", "DEFAULT_TARGETS", "SCOPES", "STATS_MODES", "CalibrationStats", "Decompositions", "FactorizedLinear",
    "LayerStats", "LowRankLinear", "RankPlan", "apply_rank_map", "build_architecture", "calibrate", "compress_model",
    "count_params", "default_loss_normalizer", "deployed_params", "factorize", "factorize_layer", "find_targets",
    "fold_factorized", "layer_spectra", "linear_cost", "load_compact", "plan_ranks", "projected_core", "save_compact",
    "union_subspace", "warmup_head",
]
