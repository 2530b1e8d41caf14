"""Plain-PyTorch math for the baselines (no Lightning, no Hydra): TuneComp's two-branch layer and schedules."""

from .tunecomp import (
    TwoBranchLinear,
    deployed_cost,
    group_lasso,
    select_prunable,
    teacher_weight,
    whitened_low_rank,
)

__all__ = ["TwoBranchLinear", "deployed_cost", "group_lasso", "select_prunable", "teacher_weight", "whitened_low_rank"]
