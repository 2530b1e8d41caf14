"""A sparse correction `S x` on top of a low-rank layer: fixed support, trainable values (METHOD.md section 10, the
last bullet: JACTUS with a sparse share of the budget).

`SparseDelta` holds the support as flat row-major positions (`index`, a buffer, so checkpoints and compact models
carry it) and the values as an fp32 parameter; its forward materialises the m x n matrix for the call (as many
bytes as the layer's dense weight, freed after the call) and applies it with one GEMM, which beats a gather-based
sparse product at the densities of interest (0.1-5%) on GPUs and CPUs alike.

The support is chosen by the empirical diagonal Fisher of the layer's (dense-equivalent) weight, the accumulated
square of the per-batch weight gradient `G = g^T x` (g: the gradient at the layer's output, x: its input), measured
on the model as it is (for JACTUS: the factorized model), from hooks: no weight-shaped `.grad` is ever allocated,
and the running sums live on the CPU in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .precision import trainable_dtype


class SparseDelta(nn.Module):
    """`y = S x`, `S` m x n with non-zeros `values` at the flat positions `index` (row * n + column)."""

    def __init__(self, out_features: int, in_features: int, index: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= out_features * in_features):
            raise ValueError(f"sparse support index out of range for a {out_features} x {in_features} matrix")
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("index", index)
        if values is None:
            values = torch.zeros(index.numel(), dtype=trainable_dtype(torch.float32), device=index.device)
        if values.shape != index.shape:
            raise ValueError(f"sparse values {tuple(values.shape)} do not match the support {tuple(index.shape)}")
        self.values = nn.Parameter(values)

    @property
    def nnz(self) -> int:
        return self.index.numel()

    def matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense m x n matrix (differentiable in `values`)."""
        dtype = dtype or self.values.dtype
        flat = torch.zeros(self.out_features * self.in_features, dtype=dtype, device=self.values.device)
        return flat.index_add(0, self.index, self.values.to(dtype)).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix(x.dtype))

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, nnz={self.nnz}"


def weight_fisher(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable,
                  loss_fn: Callable[[nn.Module, object], torch.Tensor], progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer, sum over batches of (g^T x)^2: the empirical diagonal Fisher of its m x n weight, on the CPU in
    fp32. Every layer's output must require grad (some parameter upstream or inside it trains). Under an initialised
    process group the sums are all-reduced, so every rank picks the same support."""
    from .progress import progress_bar

    scores = {name: torch.zeros(layer.out_features, layer.in_features) for name, layer in layers.items()}
    handles = []

    def hook(name):
        def forward_hook(module, args, output):
            x = args[0].detach()
            if not output.requires_grad:
                raise RuntimeError(f"weight_fisher: the output of {name} does not require grad (nothing upstream "
                                   f"trains), so its output gradient cannot be observed")

            def backward_hook(grad):
                g = grad.reshape(-1, grad.shape[-1]).float()
                weight_grad = g.T @ x.reshape(-1, x.shape[-1]).float()  # [m, n] for this batch
                scores[name].add_(weight_grad.pow_(2).cpu())

            output.register_hook(backward_hook)

        return forward_hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()  # no dropout: the score of the model as it is
    try:
        for batch in progress_bar(batches, desc="sparse support (weight Fisher)", disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for name, score in scores.items():
            device = next(layers[name].parameters()).device
            reduced = score.to(device)
            torch.distributed.all_reduce(reduced)
            scores[name] = reduced.cpu()
    return scores


def top_support(score: torch.Tensor, nnz: int) -> torch.Tensor:
    """The flat positions of the `nnz` largest scores, sorted (ties broken by position, so ranks agree)."""
    if not 0 <= nnz <= score.numel():
        raise ValueError(f"nnz={nnz}: expected 0..{score.numel()} for a {tuple(score.shape)} matrix")
    flat = score.flatten()
    # a stable order: descending score, then ascending position
    order = torch.argsort(flat, descending=True, stable=True)
    return order[:nnz].sort().values


def uniform_nnz(shapes: Mapping[str, tuple[int, int]], total: int) -> dict[str, int]:
    """`total` non-zeros spread over layers in proportion to their sizes (the same density everywhere), the
    rounding remainder given to the largest layers; exact: the counts sum to `total`."""
    sizes = {name: m * n for name, (m, n) in shapes.items()}
    capacity = sum(sizes.values())
    if not 0 <= total <= capacity:
        raise ValueError(f"{total} non-zeros do not fit in {capacity} entries")
    counts = {name: total * size // capacity for name, size in sizes.items()}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n))[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def sparse_index_bytes(layers: Iterable[SparseDelta]) -> int:
    """Bytes of the supports stored as CSR with int32 column indices and row pointers (what a sparse kernel reads)."""
    return sum(4 * layer.nnz + 4 * (layer.out_features + 1) for layer in layers)
