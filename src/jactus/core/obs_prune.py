"""Second-order (OBS / SparseGPT-style) pruning of linear layers, plain PyTorch (docs/METHOD.md section 10, `taco`).

A target `y = W x + b` (`W` m x n) is pruned to a mask while the surviving weights are updated to minimise the
layer's output error on the calibration inputs, `trace((W - W') Sx (W - W')^T)`, with the damped input covariance as
the Hessian shared by all rows: `H = Sx + damping * mean(diag Sx) * I`.

Column elimination (SparseGPT): with `U` the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`), column j is fixed to
its masked value `q_j` and the error `e = (w_j - q_j) / U_jj` is pushed onto the columns not yet fixed,
`W[:, j:] -= e U[j, j:]`; this is the OBS update with the inverse Hessian of the remaining columns, which `U`'s row j
holds. The updates run inside blocks of `block_size` columns, and each finished block updates the rest of the
matrix with one GEMM (lazy batch updates).

Mask selection, with the exact number of kept weights:
- unstructured: each block prunes its share of the layer's pruned count (cumulative rounding, so the shares sum
  exactly) at the smallest saliencies `w^2 / U_jj^2` of the block, measured when the block starts (SparseGPT's
  adaptive mask selection: the saliency sees the updates made by earlier blocks);
- N:M: in every row, each group of M consecutive input columns keeps its N largest saliencies, chosen when the
  group's first column is reached (the hardware 2:4 layout is along the input dimension).

`global_keep_counts` turns one model-wide number of kept weights into per-layer counts by a single threshold on the
*relative* OBS saliency `relative_saliency`: `w^2 / [H^-1]_jj` of the dense weights (the output error of removing
that one weight with the optimal update of its row) divided by the layer's output energy per weight,
`trace(W Sx W^T) / (m n)`. Raw saliencies are in each layer's own output units: a layer reading small activations
(attention and MLP output projections after softmax-weighted sums and GELU) scores low everywhere, and one raw
threshold prunes such layers completely (seen on a ViT). The relative score does not change when a layer's inputs or
weights are rescaled, and the per-weight normalisation makes it free of the layer's size: dividing by the whole
energy instead would shrink every score of an m-row layer by 1/m, and one threshold would prune larger layers harder
(i.i.d. layers of 64 and 1024 rows, one `Sx`, half the weights kept: densities 0.83 and 0.43). For white inputs
`Sx = c I` the score is `(1 + damping) w^2 / mean(w^2)` whatever `m`, `n` or `c`. What still tells layers apart is
`1 / [H^-1]_jj`, the variance of input j that the other inputs do not predict, against the energy the inputs carry:
a layer with redundant inputs loses little output per removed weight (its row update compensates) and gives up
more weights. Normalising by the layer's mean saliency would also be size-free, but would set every layer's mean
score to 1 and erase that signal.

`prune_linears` is the driver: calibrate the inputs (`calibrate`, input statistics only, in passes that fit
`max_stats_bytes`), prune, and write the weights back only after every pass, so every Hessian is measured on the
dense model (one-shot, as `compress_model` does; not SparseGPT's sequential layer-by-layer propagation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .bounded import first_batch_input_groups
from .calibration import LayerStats, broadcast, calibrate, distributed, split_passes
from .progress import progress_bar

PATTERN_UNSTRUCTURED = "unstructured"
ALLOCATIONS = ("uniform", "global")


def parse_pattern(pattern: str, key: str = "pattern") -> tuple[int, int] | None:
    """`"unstructured"` -> None; `"N:M"` (N non-zeros in every M consecutive inputs, 1 <= N < M) -> (N, M)."""
    if pattern == PATTERN_UNSTRUCTURED:
        return None
    parts = str(pattern).split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        n, m = (int(part) for part in parts)
        if 1 <= n < m:
            return n, m
    raise ValueError(f"{key}={pattern!r}: expected {PATTERN_UNSTRUCTURED!r} or 'N:M' with 1 <= N < M (N non-zeros "
                     f"in every M consecutive inputs), e.g. '2:4'")


def damped_hessian(input_cov: torch.Tensor, damping: float) -> torch.Tensor:
    """`Sx + damping * mean(diag Sx) * I` in float64."""
    hessian = input_cov.to(torch.float64).clone()
    hessian.diagonal().add_(damping * float(hessian.diagonal().mean()))
    return hessian


def _cholesky(matrix: torch.Tensor, what: str, name: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        raise ValueError(f"layer {name!r}: the {what} is not positive definite (Cholesky failed at column {int(info)}); "
                         f"raise the damping (calib.damping, now relative to mean(diag Sx))")
    return factor


def inverse_hessian(input_cov: torch.Tensor, damping: float, name: str = "layer") -> torch.Tensor:
    """`H^-1` in float64, `H` the damped input covariance."""
    return torch.cholesky_inverse(_cholesky(damped_hessian(input_cov, damping), "damped input covariance", name))


def inverse_hessian_factor(inverse: torch.Tensor, name: str = "layer") -> torch.Tensor:
    """The upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), float64."""
    return _cholesky(inverse, "inverse Hessian", name).mT


def obs_saliency(weight: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`w_ij^2 / [H^-1]_jj` (float32, on the weight's device): the output error of removing one weight."""
    diagonal = inverse.diagonal().to(weight.device, torch.float32)
    return weight.float().pow(2) / diagonal


def relative_saliency(weight: torch.Tensor, input_cov: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`obs_saliency / (trace(W Sx W^T) / (m n))`: each weight's output error as a multiple of the layer's output
    energy per weight, comparable across layers of any size and scale (module docstring)."""
    weight64 = weight.detach().to(input_cov.device, torch.float64)
    energy_per_weight = float(((weight64 @ input_cov.to(torch.float64)) * weight64).sum()) / weight.numel()
    return obs_saliency(weight, inverse) / max(energy_per_weight, torch.finfo(torch.float32).tiny)


@torch.no_grad()
def obs_prune(
    weight: torch.Tensor,
    factor: torch.Tensor,
    *,
    keep: int | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` (m x n) with `factor` = `inverse_hessian_factor` -> `(pruned weight, mask)`, the weight in its
    own dtype with exact zeros where the bool mask is False.

    Exactly one of `keep` (unstructured: the number of weights kept) and `n_m` (keep N of every M consecutive inputs
    in each row) is given. Computation in float32 on the weight's device.
    """
    if (keep is None) == (n_m is None):
        raise ValueError("obs_prune: give exactly one of keep (unstructured) and n_m (N:M)")
    rows, cols = weight.shape
    if tuple(factor.shape) != (cols, cols):
        raise ValueError(f"obs_prune: factor {tuple(factor.shape)} does not match a weight with {cols} inputs")
    if block_size < 1:
        raise ValueError(f"block_size={block_size!r}: expected a positive integer")
    if n_m is not None:
        n, m = n_m
        if cols % m or block_size % m:
            raise ValueError(f"pattern {n}:{m} needs the input width ({cols}) and block_size ({block_size}) to be "
                             f"multiples of {m}")
    elif not 0 <= keep <= rows * cols:
        raise ValueError(f"obs_prune: keep={keep} is outside 0..{rows * cols} for a {rows} x {cols} weight")
    work = weight.detach().to(torch.float32).clone()
    upper = factor.to(work.device, torch.float32)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=work.device)
    pruned_total = 0 if keep is None else rows * cols - keep

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = work[:, start:end]  # a view: the column updates below land in `work`
        block_upper = upper[start:end, start:end]
        block_mask = mask[:, start:end]
        errors = torch.zeros_like(block)
        if keep is not None:
            count = pruned_total * end // cols - pruned_total * start // cols  # cumulative rounding: exact in sum
            if count:
                saliency = block.pow(2) / block_upper.diagonal().pow(2)
                dropped = torch.zeros(block.numel(), dtype=torch.bool, device=work.device)
                dropped[torch.topk(saliency.flatten(), count, largest=False).indices] = True
                block_mask[dropped.view_as(block_mask)] = False
        for j in range(end - start):
            if n_m is not None and j % n_m[1] == 0:
                group = slice(j, j + n_m[1])
                saliency = block[:, group].pow(2) / block_upper.diagonal()[group].pow(2)
                drop = torch.topk(saliency, n_m[1] - n_m[0], dim=1, largest=False).indices
                block_mask[:, group].scatter_(1, drop, False)
            column = block[:, j]
            kept = column * block_mask[:, j]
            error = (column - kept) / block_upper[j, j]
            block[:, j:].sub_(error[:, None] * block_upper[j, j:][None, :])
            block[:, j] = kept  # exact zeros, whatever rounding the update left
            errors[:, j] = error
        work[:, end:].sub_(errors @ upper[start:end, end:])
    return work.to(weight.dtype), mask


def global_keep_counts(saliencies: Mapping[str, torch.Tensor], keep_total: int) -> dict[str, int]:
    """Per-layer kept counts for one threshold on the saliencies of all layers: the `keep_total` largest scores
    survive; ties at the threshold go to the layers in order. Exact: the counts sum to `keep_total`."""
    capacity = sum(score.numel() for score in saliencies.values())
    if not 0 <= keep_total <= capacity:
        raise ValueError(f"{keep_total} kept weights do not fit in {capacity} entries")
    if keep_total == 0:
        return {name: 0 for name in saliencies}
    flat = torch.cat([score.detach().float().cpu().flatten() for score in saliencies.values()])
    threshold = float(torch.kthvalue(flat, capacity - keep_total + 1).values)  # the keep_total-th largest
    del flat
    counts = {name: int((score > threshold).sum()) for name, score in saliencies.items()}
    left = keep_total - sum(counts.values())
    for name, score in saliencies.items():
        ties = min(left, int((score == threshold).sum()))
        counts[name] += ties
        left -= ties
    return counts


def prune_linears(
    model: nn.Module,
    modules: Mapping[str, nn.Linear],
    batches: Sequence,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    keep: Mapping[str, int] | None = None,
    keep_total: int | None = None,
    n_m: tuple[int, int] | None = None,
    damping: float = 1e-2,
    block_size: int = 128,
    mask_key: str = "attention_mask",
    device: torch.device | str | None = None,
    max_stats_bytes: int | None = None,
    stats_dtype: torch.dtype = torch.float64,
    offload_to_cpu: bool = False,
    park_on_cpu: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Prune every linear of `modules` in place (module docstring) -> `{name: bool mask}` on the weights' devices.

    How many weights survive: `keep` (per-layer counts), `keep_total` (one model-wide count split by
    `global_keep_counts`, which costs one more calibration pass over all layers when the statistics take several
    passes, and the saliencies of all target weights in CPU float32 memory), or `n_m`. Under torch.distributed
    the statistics are all-reduced (`calibrate`) and rank 0's pruned weights and masks are broadcast, so every rank
    holds the same model.
    """
    if sum(option is not None for option in (keep, keep_total, n_m)) != 1:
        raise ValueError("prune_linears: give exactly one of keep, keep_total and n_m")
    if keep is not None and set(keep) != set(modules):
        raise ValueError(f"prune_linears: keep counts for {sorted(keep)[:4]} do not match the targets "
                         f"{sorted(modules)[:4]}")
    if device is None:
        device = next(iter(modules.values())).weight.device
    device = torch.device(device)
    groups = first_batch_input_groups(model, modules, batches, loss_fn, device, "prune_linears")
    passes = split_passes(groups, modules, False, max_stats_bytes, stats_dtype)

    def statistics(pass_groups: list[list[str]]) -> dict[str, LayerStats]:
        return calibrate(model, batches, loss_fn, {name: modules[name] for group in pass_groups for name in group},
                         mask_key=mask_key, need_gradients=False, offload_to_cpu=offload_to_cpu, device=device,
                         progress=progress, stats_dtype=stats_dtype, groups=pass_groups).layers

    kept_stats: dict[str, LayerStats] | None = None
    if keep_total is not None:
        saliencies: dict[str, torch.Tensor] = {}
        for index, pass_groups in enumerate(passes):
            layers = statistics(pass_groups)
            for group in pass_groups:
                input_cov = layers[group[0]].input_cov.to(device)
                inverse = inverse_hessian(input_cov, damping, group[0])
                for name in group:
                    saliencies[name] = relative_saliency(modules[name].weight, input_cov, inverse).cpu()
            if index == len(passes) - 1:
                kept_stats = layers  # the last pass's statistics serve phase 2 as well
            del layers
        keep = global_keep_counts({name: saliencies[name] for name in modules}, keep_total)
        del saliencies
        passes = [passes[-1], *passes[:-1]]

    masks: dict[str, torch.Tensor] = {}
    parked: dict[str, torch.Tensor] = {}
    bar = progress_bar(total=len(modules), desc="prune (OBS)", disable=not progress)
    for index, pass_groups in enumerate(passes):
        layers = kept_stats if index == 0 and kept_stats is not None else statistics(pass_groups)
        kept_stats = None
        last = index == len(passes) - 1  # every calibration is done: prune in place
        for group in pass_groups:
            inverse = inverse_hessian(layers[group[0]].input_cov.to(device), damping, group[0])
            factor = inverse_hessian_factor(inverse, group[0])
            del inverse
            for name in group:
                layer = modules[name]
                pruned, mask = obs_prune(layer.weight, factor, keep=None if keep is None else keep[name], n_m=n_m,
                                         block_size=block_size)
                if distributed():  # identical layers on every rank, whatever floating point did per rank
                    broadcast(pruned)
                    broadcast(mask)
                masks[name] = mask
                if last:
                    layer.weight.data.copy_(pruned)
                else:
                    parked[name] = pruned.cpu() if park_on_cpu else pruned
                bar.update()
            for name in group:
                layers.pop(name, None)
        del layers
    bar.close()
    for name, pruned in parked.items():
        modules[name].weight.data.copy_(pruned)
    return masks


def n_m_index_bytes(nnz: int, m: int) -> int:
    """N:M metadata: each kept value's position inside its group of M, ceil(log2 M) bits (2:4: 2 bits)."""
    return math.ceil(nnz * math.ceil(math.log2(m)) / 8)

