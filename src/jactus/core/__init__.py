"""The JACTUS math in plain PyTorch (docs/METHOD.md sections 1-5); no Lightning or Hydra here."""

from .allocation import ALLOCATORS, BUDGET_ALLOCATORS, SCOPES, RankPlan, layer_spectra, plan_ranks
from .bounded import compress_model, resolve_max_stats_bytes
from .calibration import CalibrationStats, LayerStats, calibrate, default_loss_normalizer, warmup_head
from .compact import build_architecture, load_compact, save_compact, stored_bytes
from .decompositions import Decompositions
from .factorize import apply_rank_map, factorize, fold_factorized
from .freeze import set_trainable, train_cores
from .layers import FactorizedLinear, LowRankLinear
from .params import count_params, deployed_params, linear_cost
from .precision import check_precision, model_dtype, upcast_trainable
from .subspace import STATS_MODES, factorize_layer, projected_core, union_subspace
from .targets import DEFAULT_TARGETS, find_targets

__all__ = [
    "ALLOCATORS", "BUDGET_ALLOCATORS", "DEFAULT_TARGETS", "SCOPES", "STATS_MODES", "CalibrationStats",
    "Decompositions", "FactorizedLinear",
    "LayerStats", "LowRankLinear", "RankPlan", "apply_rank_map", "build_architecture", "calibrate", "compress_model",
    "check_precision", "count_params", "default_loss_normalizer", "deployed_params", "factorize", "factorize_layer",
    "find_targets", "fold_factorized", "layer_spectra", "linear_cost", "load_compact", "model_dtype",
    "plan_ranks", "projected_core", "resolve_max_stats_bytes", "save_compact", "set_trainable", "stored_bytes",
    "train_cores",
    "union_subspace", "upcast_trainable", "warmup_head",
]
