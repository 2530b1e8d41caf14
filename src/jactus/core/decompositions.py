"""The decompositions of one set of calibration statistics, computed once per layer and shared by rank planning and
factorization.

Per layer: the metric (the damped input side and its Cholesky factor once per shared-input group, q/k/v or gate/up),
the whitened weight's SVD from one eigendecomposition of its smaller Gram matrix (values only for planning; kept with
its vectors when a factorization follows), the task directions, the projected core. Callers go through the layers
group by group (`groups`) and `release` each group when done, so that what is kept stays bounded.

Precision: decompositions run on the weight's device in `compute_dtype` ("auto": float32 on CUDA, float64 otherwise).
In float32 a layer whose Cholesky fails or whose results are not finite is redone in float64 and listed in
`fp64_fallbacks`; an error in float64 is raised, naming the layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from .linalg import COMPUTE_DTYPES, DEFAULT_DAMPING, EIG_METHODS, check_choice, resolve_compute_dtype
from .subspace import (
    STATS_MODES,
    CovarianceSide,
    Metric,
    WhitenedSVD,
    factorize_group,
    factorize_layer,
    layer_metric,
    stacked_whitened_svd,
    whitened_svd,
)

logger = logging.getLogger(__name__)
_SHARED = "#shared"  # the key suffix of a shared-basis group's stacked SVD (kept under its first layer)


class Decompositions:
    """Per-layer decompositions of `stats` (a `CalibrationStats`; None for `stats_mode="none"`)."""

    def __init__(self, stats, stats_mode: str = "kfac", damping: float = DEFAULT_DAMPING, *,
                 compute_dtype: str | torch.dtype = "auto", eig_method: str = "auto"):
        check_choice(stats_mode, STATS_MODES, "stats_mode")
        check_choice(compute_dtype, COMPUTE_DTYPES, "compute_dtype")
        check_choice(eig_method, EIG_METHODS, "eig_method")
        if damping < 0:
            raise ValueError(f"damping={damping}: expected >= 0")
        self.stats, self.stats_mode, self.damping = stats, stats_mode, damping
        self.compute_dtype, self.eig_method = compute_dtype, eig_method
        groups = stats.input_groups if stats is not None else []
        self._leader = {name: group[0] for group in groups for name in group}
        self._metrics: dict[tuple[str, torch.dtype], Metric] = {}
        self._input_sides: dict[tuple[str, torch.dtype], CovarianceSide] = {}
        self._svds: dict[str, WhitenedSVD] = {}
        self.fp64_fallbacks: list[str] = []

    def groups(self, names: Iterable[str]) -> list[list[str]]:
        """`names` split into groups that share one input covariance, each group where its first member is."""
        grouped: dict[str, list[str]] = {}
        for name in names:
            grouped.setdefault(self._leader.get(name, name), []).append(name)
        return list(grouped.values())

    def dtype(self, weight: torch.Tensor) -> torch.dtype:
        return resolve_compute_dtype(self.compute_dtype, weight.device)

    def metric(self, name: str, weight: torch.Tensor, dtype: torch.dtype | None = None) -> Metric:
        """The layer's metric in `dtype` (default: the compute dtype), built once and kept until `release`."""
        dtype = dtype or self.dtype(weight)
        if (name, dtype) not in self._metrics:
            layer_stats = None
            if self.stats_mode != "none":
                layer_stats = None if self.stats is None else self.stats.layers.get(name)
                if layer_stats is None:
                    raise ValueError(f"layer {name!r} has no calibration statistics (stats_mode={self.stats_mode!r} "
                                     f"needs them)")
            input_key = (self._leader.get(name, name), dtype)
            metric = layer_metric(layer_stats, self.stats_mode, self.damping, name, weight.device, dtype,
                                  self._input_sides.get(input_key))
            if metric.input is not None:
                self._input_sides[input_key] = metric.input
            self._metrics[(name, dtype)] = metric
        return self._metrics[(name, dtype)]

    def spectrum(self, name: str, weight: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """Singular values of the layer's whitened weight (float64, CPU, descending).

        `keep=True` computes its singular vectors in the same eigendecomposition and keeps them for
        `factorize_layer` (until `release` without `keep_svd`).
        """
        def compute(dtype: torch.dtype) -> torch.Tensor:
            svd = whitened_svd(weight, self.metric(name, weight, dtype), name, vectors=keep)
            if keep:
                self._svds[name] = svd
            return svd.values

        return self._checked(name, weight, compute).to("cpu", torch.float64)

    def factorize_layer(self, name: str, weight: torch.Tensor, rank: int, rho: float = 0.25,
                        weight_basis: str = "whitened",
                        nested: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(U, C, V)` of the layer at `rank` (`subspace.factorize_layer`, with `nested` bases for a palette), in
        the dtype it was computed in."""
        def compute(dtype: torch.dtype):
            svd = self._svds.get(name)
            if svd is not None and svd.values.dtype != dtype:
                svd = None
            return factorize_layer(weight, self.metric(name, weight, dtype), rank, rho, weight_basis, name, svd,
                                   self.eig_method, nested)

        return self._checked(name, weight, compute)

    def group_spectrum(self, names: list[str], weights: list[torch.Tensor], keep: bool = False) -> torch.Tensor:
        """Singular values of the stacked whitened weights of layers that share an input basis (float64, CPU,
        descending; `subspace.stacked_whitened_svd`); `keep=True` keeps the vectors for `factorize_group`, under the
        first layer's name."""
        def compute(dtype: torch.dtype) -> torch.Tensor:
            metrics = [self.metric(name, weight, dtype) for name, weight in zip(names, weights, strict=True)]
            svd = stacked_whitened_svd(weights, metrics, names[0], vectors=keep)
            if keep:
                self._svds[names[0] + _SHARED] = svd
            return svd.values

        return self._checked(names[0], weights[0], compute).to("cpu", torch.float64)

    def factorize_group(self, names: list[str], weights: list[torch.Tensor], rank: int, rho: float = 0.25,
                        weight_basis: str = "whitened"):
        """`(V, [(U_i, C_i), ...])` of layers that share an input basis, at `rank` (`subspace.factorize_group`)."""
        def compute(dtype: torch.dtype):
            svd = self._svds.get(names[0] + _SHARED)
            if svd is not None and svd.values.dtype != dtype:
                svd = None
            metrics = [self.metric(name, weight, dtype) for name, weight in zip(names, weights, strict=True)]
            return factorize_group(weights, metrics, rank, rho, weight_basis, names[0], svd, self.eig_method)

        return self._checked(names[0], weights[0], compute)

    def release(self, names: Iterable[str], keep_svd: bool = False) -> None:
        """Forget what was kept for these layers (and their input sides); a later request recomputes it."""
        names = set(names)
        leaders = {self._leader.get(name, name) for name in names}
        self._metrics = {key: value for key, value in self._metrics.items() if key[0] not in names}
        self._input_sides = {key: value for key, value in self._input_sides.items() if key[0] not in leaders}
        if not keep_svd:
            self._svds = {key: svd for key, svd in self._svds.items() if key.removesuffix(_SHARED) not in names}

    def _checked(self, name: str, weight: torch.Tensor, compute: Callable[[torch.dtype], object]):
        """`compute(dtype)` in the compute dtype; a float32 failure (Cholesky, non-finite output) redone in float64."""
        dtype = self.dtype(weight)
        if dtype == torch.float64:
            return compute(dtype)
        try:
            return compute(dtype)
        except (FloatingPointError, torch.linalg.LinAlgError) as error:
            logger.warning("layer %r: float32 decomposition failed (%s); redoing it in float64", name, error)
            self.fp64_fallbacks.append(name)
            return compute(torch.float64)
