"""A sparse correction `S x` on top of a low-rank layer: fixed support, trainable values (docs/METHOD.md section 10:
JACTUS with a sparse share of the budget).

`SparseDelta` holds the support as flat row-major positions (`index`, a buffer, so checkpoints and compact models
carry it) and the values as an fp32 parameter; its forward materialises the m x n matrix for the call (as many
bytes as the layer's dense weight, freed after the call) and applies it with one GEMM, which beats a gather-based
sparse product at the densities of interest (0.1-5%) on GPUs and CPUs alike. The matrix is not saved for the backward
pass (`sparse_linear` keeps only x and rebuilds S there), and the values' gradient is gathered from row blocks of
`g^T x` of bounded size, never from a whole weight-shaped gradient.

The support is chosen by the empirical diagonal Fisher of the layer's (dense-equivalent) weight, the accumulated
square of the per-batch weight gradient `G = g^T x` (g: the gradient at the layer's output, x: its input), measured
on the model as it is (for JACTUS: the factorized model; for RoSA: the LoRA model during its warm-up steps), from
hooks (`FisherAccumulator`): no weight-shaped `.grad` is ever allocated, `g^T x` is formed in row blocks of bounded
size, and the running sums live on the CPU in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .modes import module_modes, restore_modes
from .precision import trainable_dtype

# Elements of one row block of a weight-shaped product (g^T x) on the accelerator: 64 MiB in fp32.
BLOCK_ELEMENTS = 2**24


def weight_gradient_blocks(grad_output: torch.Tensor, inputs: torch.Tensor, dtype: torch.dtype = torch.float32,
                           max_elements: int | None = None):
    """Yield `(first_row, block)`: the weight gradient `g^T x` of a linear layer (summed over tokens) in row blocks
    of at most `max_elements` (default `BLOCK_ELEMENTS`) entries, at least one row each, computed in `dtype`; never
    the whole m x n at once."""
    g = grad_output.reshape(-1, grad_output.shape[-1])
    x = inputs.reshape(-1, inputs.shape[-1]).to(dtype)
    rows = max(1, (max_elements or BLOCK_ELEMENTS) // x.shape[1])
    for start in range(0, g.shape[1], rows):
        yield start, g[:, start:start + rows].to(dtype).T @ x


def dense_matrix(values: torch.Tensor, index: torch.Tensor, out_features: int, in_features: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The m x n matrix with `values` at the flat positions `index` (differentiable in `values`)."""
    flat = torch.zeros(out_features * in_features, dtype=dtype, device=values.device)
    return flat.index_add(0, index, values.to(dtype)).view(out_features, in_features)


class _SparseLinear(torch.autograd.Function):
    """`y = x S^T` in `compute_dtype` (autocast off), returned in x's dtype; saves x, not S."""

    @staticmethod
    def forward(ctx, x, values, index, out_features, in_features, compute_dtype):
        with torch.autocast(x.device.type, enabled=False):
            matrix = dense_matrix(values.detach(), index, out_features, in_features, compute_dtype)
            y = F.linear(x.to(compute_dtype), matrix)
        ctx.save_for_backward(x, values, index)
        ctx.shape, ctx.compute_dtype = (out_features, in_features), compute_dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, values, index = ctx.saved_tensors
        (out_features, in_features), dtype = ctx.shape, ctx.compute_dtype
        grad_x = grad_values = None
        with torch.autocast(grad_y.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                matrix = dense_matrix(values.detach(), index, out_features, in_features, dtype)
                grad_x = (grad_y.to(dtype) @ matrix).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_values = torch.zeros_like(values, dtype=dtype)
                rows = index // in_features
                for start, block in weight_gradient_blocks(grad_y, x, dtype):
                    inside = (rows >= start) & (rows < start + block.shape[0])
                    grad_values[inside] = block.flatten()[index[inside] - start * in_features]
                grad_values = grad_values.to(values.dtype)
        return grad_x, grad_values, None, None, None, None


def sparse_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, out_features: int, in_features: int,
                  compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`x S^T` for the m x n matrix `S` with `values` at the flat positions `index`, computed in `compute_dtype`
    (default: x's dtype) and returned in x's dtype."""
    return _SparseLinear.apply(x, values, index, out_features, in_features, compute_dtype or x.dtype)


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
        return dense_matrix(self.values, self.index, self.out_features, self.in_features, dtype or self.values.dtype)

    def forward(self, x: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """`S x` computed in `compute_dtype` (default: x's dtype), in x's dtype."""
        return sparse_linear(x, self.values, self.index, self.out_features, self.in_features, compute_dtype)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, nnz={self.nnz}"


class FisherAccumulator:
    """While attached, each backward pass through a hooked layer adds `(g^T x)^2` (g: the gradient at the layer's
    output, x: its input) to that layer's running m x n sum on the CPU in fp32: the empirical diagonal Fisher of its
    weight, whether the weight itself trains or not. `batches[name]` counts the backward passes seen.

    Forward passes whose output does not require grad (evaluation, `torch.no_grad`) are skipped, or, with `strict`,
    an error: a layer whose output never requires grad cannot be scored."""

    def __init__(self, layers: Mapping[str, nn.Module], strict: bool = False):
        self.layers = dict(layers)
        self.strict = strict
        self.scores = {name: torch.zeros(layer.out_features, layer.in_features) for name, layer in layers.items()}
        self.batches = dict.fromkeys(layers, 0)
        self.handles = [layer.register_forward_hook(self._forward_hook(name)) for name, layer in layers.items()]

    def _forward_hook(self, name: str):
        def forward_hook(module, args, output):
            if not output.requires_grad:
                if self.strict:
                    raise RuntimeError(f"weight Fisher: the output of {name} does not require grad (nothing upstream "
                                       f"trains), so its output gradient cannot be observed")
                return
            x = args[0].detach()

            def backward_hook(grad):
                score = self.scores[name]
                for start, block in weight_gradient_blocks(grad, x):
                    score[start:start + block.shape[0]].add_(block.pow_(2).cpu())
                self.batches[name] += 1

            output.register_hook(backward_hook)

        return forward_hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def reduced(self) -> dict[str, torch.Tensor]:
        """The sums; under an initialised process group all-reduced (in blocks, through each layer's device), so
        every rank holds the same scores and picks the same support."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for name, score in self.scores.items():
                device = next(self.layers[name].parameters()).device
                flat = score.view(-1)
                for start in range(0, flat.numel(), BLOCK_ELEMENTS):
                    block = flat[start:start + BLOCK_ELEMENTS].to(device)
                    torch.distributed.all_reduce(block)
                    flat[start:start + BLOCK_ELEMENTS].copy_(block.cpu())
        return self.scores


def weight_fisher(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable,
                  loss_fn: Callable[[nn.Module, object], torch.Tensor], progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer, sum over batches of (g^T x)^2: the empirical diagonal Fisher of its m x n weight, on the CPU in
    fp32. Every layer's output must require grad (some parameter upstream or inside it trains). Under an initialised
    process group the sums are all-reduced, so every rank picks the same support."""
    from .progress import progress_bar

    accumulator = FisherAccumulator(layers, strict=True)
    modes = module_modes(model)
    model.eval()  # no dropout: the score of the model as it is
    try:
        for batch in progress_bar(batches, desc="sparse support (weight Fisher)", disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
    finally:
        accumulator.remove()
        model.zero_grad(set_to_none=True)
        restore_modes(modes)
    return accumulator.reduced()


SPARSE_INITS = ("zero", "residual")  # a sparse share's starting values: zero, or the low-rank layer's residual


@torch.no_grad()
def sparse_residual(weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """`W - U C V^T` on the CPU in fp32: what the low-rank layer (`U`, `C`, `V` of a FactorizedLinear) leaves out of
    the dense weight `W` (out x in)."""
    low_rank = layer.U.float() @ layer.C.float() @ layer.V.float().T
    if low_rank.shape != weight.shape:
        raise ValueError(f"dense weight {tuple(weight.shape)} does not match the low-rank layer's "
                         f"{tuple(low_rank.shape)}")
    return weight.float().cpu() - low_rank.cpu()


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


def csr_index_bytes(shape: tuple[int, int], nnz: int) -> int:
    """CSR index of one m x n matrix with `nnz` non-zeros: int32 column indices and m + 1 int32 row pointers (what a
    sparse kernel reads)."""
    return 4 * nnz + 4 * (shape[0] + 1)


def sparse_index_bytes(layers: Iterable[SparseDelta]) -> int:
    """`csr_index_bytes` summed over the supports of `layers`."""
    return sum(csr_index_bytes((layer.out_features, layer.in_features), layer.nnz) for layer in layers)
