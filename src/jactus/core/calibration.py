"""Calibration statistics (docs/METHOD.md section 1): input and output-gradient covariances of every target linear.

For each target `y = W x + b` over the calibration tokens `t = 1..T` (tokens where `batch[mask_key]` is set, else all
tokens, e.g. every ViT patch token):

    Sx = (1/T) sum_t x_t x_t^T        Sg = (1/T) sum_t g_t g_t^T,   g_t = dL/dy_t

Each batch adds one GEMM `X^T X` with fp32 accumulation (on the compute device) into running sums of `stats_dtype`
(float64 by default, docs/METHOD.md), divided by the token count at the end. float32 sums halve the memory of the
statistics (what a 7B model needs on one GPU): a float32 sum of float32 GEMM partials keeps a relative error around
1e-6 over thousands of batches, far below the 1e-2 relative damping every decomposition adds. Layers that read the
same input tensor (q/k/v, gate/up) share one `Sx`, stored once.

Batch-size independence of Sg: `loss_fn` usually returns a per-batch *mean*, so `dL/dy` carries a factor
`1 / N_b` that depends on how the data is split into batches. Each batch's gradients are therefore multiplied by
`N_b = loss_normalizer(batch)`, the number of terms the mean runs over, which turns them into gradients of the
*summed* loss over the whole calibration set. The default normalizer counts label tokens after the causal shift
(`labels[..., 1:] != -100`, what HF causal-LM losses average over) for token labels, and examples otherwise
(vision `(images, labels)`: `len(labels)`). For a `loss_fn` that already returns a sum pass `loss_normalizer=lambda b: 1`.
A global scale of Sg changes neither the whitened directions nor the allocation (all gains scale alike), so only the
relative weighting of batches matters, and with it the statistics do not depend on the batch split.

The model runs in eval mode (no dropout noise in the statistics); its mode and every parameter's `requires_grad` flag
are restored afterwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .linalg import check_finite
from .modes import module_modes, restore_modes
from .progress import progress_bar
from .targets import find_targets

LossFn = Callable[[nn.Module, Any], torch.Tensor]
STATS_FORMAT = "jactus-calibration-v1"
STATS_DTYPES = (torch.float64, torch.float32)


@dataclass
class LayerStats:
    """Statistics of one target: `input_cov` (n x n), `grad_cov` (m x m, None without gradients), in `stats_dtype`."""

    input_cov: torch.Tensor
    grad_cov: torch.Tensor | None
    tokens: int


@dataclass
class CalibrationStats:
    """`layers[name] -> LayerStats`; layers in one `input_groups` entry share the same `input_cov` tensor."""

    layers: dict[str, LayerStats]
    input_groups: list[list[str]] = field(default_factory=list)

    def nbytes(self) -> int:
        """Bytes held by the statistics, each shared input covariance counted once."""
        tensors = {id(t): t for st in self.layers.values() for t in (st.input_cov, st.grad_cov) if t is not None}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def save(self, path: str | Path) -> None:
        """torch.save with each shared input covariance written once."""
        index: dict[int, int] = {}
        input_covs: list[torch.Tensor] = []
        layers = {}
        for name, st in self.layers.items():
            if id(st.input_cov) not in index:
                index[id(st.input_cov)] = len(input_covs)
                input_covs.append(st.input_cov.cpu())
            layers[name] = {"input": index[id(st.input_cov)], "tokens": int(st.tokens),
                            "grad_cov": None if st.grad_cov is None else st.grad_cov.cpu()}
        torch.save({"format": STATS_FORMAT, "input_covs": input_covs, "layers": layers,
                    "input_groups": self.input_groups}, Path(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> CalibrationStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration statistics {path} not found (written by CalibrationStats.save)")
        data = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            raise ValueError(f"{path} is not a jactus calibration file ({STATS_FORMAT})")
        layers = {name: LayerStats(data["input_covs"][entry["input"]], entry["grad_cov"], entry["tokens"])
                  for name, entry in data["layers"].items()}
        return cls(layers, [list(group) for group in data["input_groups"]])


def default_loss_normalizer(batch: Any) -> float:
    """How many terms a mean-reduced task loss averages over in `batch` (see the module docstring)."""
    labels = None
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        if labels is None:
            labels = next((v for v in batch.values() if torch.is_tensor(v)), None)
    elif isinstance(batch, (tuple, list)) and batch:
        labels = batch[1] if len(batch) > 1 else batch[0]
    elif torch.is_tensor(batch):
        labels = batch
    if not torch.is_tensor(labels) or labels.dim() == 0:
        return 1.0
    if labels.dim() >= 2 and not labels.is_floating_point():  # token labels: causal-LM mean over shifted labels
        return float((labels[..., 1:] != -100).sum())
    return float(labels.shape[0])


def calibrate(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn,
    targets: Sequence[str] | Mapping[str, nn.Linear] | None = None,
    *,
    mask_key: str = "attention_mask",
    need_gradients: bool = True,
    offload_to_cpu: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    loss_normalizer: Callable[[Any], float] | None = None,
    stats_dtype: torch.dtype = torch.float64,
    groups: Sequence[Sequence[str]] | None = None,
    input_batches: Iterable | None = None,
) -> CalibrationStats:
    """One calibration pass over `batches` -> `CalibrationStats` of every target.

    `batches` is an iterable (list, DataLoader, iterator) of batches, `loss_fn(model, batch)` the task loss; `targets`
    are patterns for `find_targets` (None: its defaults) or a `{name: nn.Linear}` dict. Batches are moved to `device`
    (default: the model's device; the model itself is not moved). Running sums are kept in `stats_dtype` (float64 or
    float32, see the module docstring); they all live at once, `stats_bytes` of them per shared-input group: to bound
    that memory, `compress_model` calls this once per pass over the groups that fit. `groups`: the targets'
    shared-input groups when already known (`input_groups`), which skips the forward that finds them. Under an
    initialised `torch.distributed`, sums and token counts are all-reduced, so every rank gets identical statistics;
    every rank must then call it, and if one has no batch, all of them raise.

    `input_batches` (docs/METHOD.md section 1, generic text): batches that add to the input covariances only, run
    forward without gradients after `batches`; `Sx` is then the second moment over the tokens of both, `Sg` over
    the task batches' tokens alone.
    """
    check_stats_dtype(stats_dtype)
    input_batches = () if input_batches is None else input_batches
    modules = dict(targets) if isinstance(targets, Mapping) else find_targets(model, targets)
    if device is None:
        first_param = next(model.parameters(), None)
        device = first_param.device if first_param is not None else torch.device("cpu")
    device = torch.device(device)
    stats_device = torch.device("cpu") if offload_to_cpu else device
    normalizer = loss_normalizer or default_loss_normalizer
    iterator = iter(batches)
    first = next(iterator, None)
    check_every_rank_has_batches(0 if first is None else 1, "calibrate", device)

    modes = module_modes(model)
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        if groups is None:
            groups = input_groups(model, modules, to_device(first, device), loss_fn)
        groups = _check_groups(groups, modules)
        layers = _calibration_pass(
            model, modules, groups, itertools.chain([first], iterator), loss_fn, device=device,
            stats_device=stats_device, stats_dtype=stats_dtype, mask_key=mask_key, need_gradients=need_gradients,
            normalizer=normalizer, progress=progress, desc="calibration",
            total=(len(batches) + len(input_batches) if hasattr(batches, "__len__")
                   and hasattr(input_batches, "__len__") else None),
            input_batches=input_batches)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        restore_modes(modes)
    return CalibrationStats({name: layers[name] for name in modules}, [g for g in groups if len(g) > 1])


def check_every_rank_has_batches(count: int, what: str, device: torch.device | str = "cpu") -> None:
    """Raise on every rank when any rank has no batch (a lone raise would leave the others waiting in a collective)."""
    if distributed():
        counts = torch.zeros(dist.get_world_size(), dtype=torch.float64)
        counts[dist.get_rank()] = count
        counts = _all_reduce(counts)
        empty = [rank for rank, value in enumerate(counts.tolist()) if value == 0]
        if empty:
            raise ValueError(f"{what}: rank(s) {empty} of {len(counts)} got no calibration batch (batches per rank: "
                             f"{[int(v) for v in counts.tolist()]}); the calibration set is split across ranks, so "
                             f"it needs at least one batch per rank: raise calib.num_samples or lower the batch size")
    elif count == 0:
        raise ValueError(f"{what} got no calibration batches")


def check_stats_dtype(stats_dtype) -> torch.dtype:
    if stats_dtype not in STATS_DTYPES:
        raise ValueError(f"stats_dtype={stats_dtype!r}: expected torch.float64 or torch.float32")
    return stats_dtype


def _check_groups(groups: Sequence[Sequence[str]], modules: Mapping[str, nn.Linear]) -> list[list[str]]:
    groups = [list(group) for group in groups]
    names = [name for group in groups for name in group]
    if sorted(names) != sorted(modules) or any(not group for group in groups):
        raise ValueError(f"groups {groups[:4]} must hold every target exactly once; targets: {list(modules)[:8]}")
    return groups


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, mapping, list, tuple, named tuple; other values as they are) on `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def input_groups(model: nn.Module, modules: Mapping[str, nn.Linear], batch: Any, loss_fn: LossFn) -> list[list[str]]:
    """Groups of targets that read the very same input tensor, found in one gradient-free forward of `batch`.

    Each group is in call order (its first member, the leader, accumulates the shared covariance); targets never
    called get a group of their own (they fail later for lack of tokens).
    """
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook(name):
        def record(module, args, kwargs, output):
            x = _layer_input(args, kwargs)
            for tensor, group in seen:
                if tensor is x:
                    if name not in group:
                        group.append(name)
                    return
            seen.append((x, [name]))
        return record

    handles = [module.register_forward_hook(hook(name), with_kwargs=True) for name, module in modules.items()]
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    assigned: set[str] = set()
    for _, group in seen:
        group = [name for name in group if name not in assigned]  # a module called twice stays in its first group
        if group:
            groups.append(group)
            assigned.update(group)
    groups.extend([name] for name in modules if name not in assigned)
    return groups


def stats_bytes(group: Sequence[str], modules: Mapping[str, nn.Linear], need_gradients: bool,
                stats_dtype: torch.dtype = torch.float64) -> int:
    """Bytes of one shared-input group's statistics: `n^2` once, `m^2` per layer with gradients."""
    n = modules[group[0]].in_features
    entries = n * n + (sum(modules[name].out_features ** 2 for name in group) if need_gradients else 0)
    return entries * torch.empty(0, dtype=stats_dtype).element_size()


def split_passes(groups: list[list[str]], modules: Mapping[str, nn.Linear], need_gradients: bool,
                 max_stats_bytes: int | None, stats_dtype: torch.dtype = torch.float64) -> list[list[list[str]]]:
    """Pack input groups, in order, into passes whose statistics (`stats_bytes`) fit `max_stats_bytes` (what
    `compress_model` runs one `calibrate` for)."""
    if max_stats_bytes is None:
        return [groups]

    def size(group: list[str]) -> int:
        return stats_bytes(group, modules, need_gradients, stats_dtype)

    passes: list[list[list[str]]] = [[]]
    used = 0
    for group in groups:
        need = size(group)
        if need > max_stats_bytes:
            raise ValueError(f"max_stats_bytes={max_stats_bytes} is below the {need} bytes that the statistics of "
                             f"{group} alone need")
        if used + need > max_stats_bytes and passes[-1]:
            passes.append([])
            used = 0
        passes[-1].append(group)
        used += need
    return passes


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks when torch.distributed is initialised (CPU sums travel through CUDA under NCCL)."""
    if not distributed():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        on_device = tensor.cuda()
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return tensor.copy_(on_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's values into `tensor` on every rank, in place (CPU tensors travel through CUDA under NCCL)."""
    if not distributed():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        on_device = tensor.cuda()
        dist.broadcast(on_device, src=0)
        return tensor.copy_(on_device)
    dist.broadcast(tensor, src=0)
    return tensor


def _second_moment(rows: torch.Tensor) -> torch.Tensor:
    """`rows^T rows` accumulated and returned in fp32.

    On CUDA, half-precision rows go through a half-precision GEMM with fp32 accumulation and output: the product of
    two bf16/fp16 numbers is exact in fp32, so this equals the fp32 GEMM of the upcast rows up to summation order,
    at the tensor-core rate (an fp32 GEMM of a 7B model's statistics costs more than its forward and backward).
    """
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(rows.T, rows, out_dtype=torch.float32)
    rows = rows.float()
    return rows.T @ rows


def masks(mask: torch.Tensor | None, tensor: torch.Tensor) -> bool:
    """Whether the batch's token `mask` ([..., T]) selects among the positions of an activation [..., T, d]."""
    return mask is not None and tuple(mask.shape) == tuple(tensor.shape[:-1])


def token_rows(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The calibration tokens of an activation [..., d] as rows [T_b, d]: those `mask` selects, else every one."""
    return tensor[mask] if masks(mask, tensor) else tensor.reshape(-1, tensor.shape[-1])


def _calibration_pass(model, modules, groups, batches, loss_fn, *, device, stats_device, stats_dtype, mask_key,
                      need_gradients, normalizer, progress, desc, total, input_batches=()) -> dict[str, LayerStats]:
    leader_of = {name: group[0] for group in groups for name in group}
    input_sums = {g[0]: torch.zeros(modules[g[0]].in_features, modules[g[0]].in_features, dtype=stats_dtype,
                                    device=stats_device) for g in groups}
    grad_sums = {name: torch.zeros(modules[name].out_features, modules[name].out_features, dtype=stats_dtype,
                                   device=stats_device) for name in leader_of} if need_gradients else {}
    tokens = {name: 0 for name in leader_of}
    input_tokens = {name: 0 for name in leader_of}  # tokens of input-only batches: in Sx, not in Sg
    state: dict[str, Any] = {"mask": None, "mask_count": None, "scale": 1.0, "inputs": {}, "input_only": False}

    def masked(tensor: torch.Tensor) -> bool:
        return masks(state["mask"], tensor)

    def select(tensor: torch.Tensor) -> torch.Tensor:
        return token_rows(tensor, state["mask"])

    def grad_hook(name):
        scale_sq = float(state["scale"]) ** 2

        def accumulate(grad):
            grad_sums[name].add_(_second_moment(select(grad)).to(stats_device, stats_dtype), alpha=scale_sq)
        return accumulate

    def forward_hook(name):
        leader = leader_of[name]

        def hook(module, args, kwargs, output):
            x = _layer_input(args, kwargs).detach()  # downstream inputs carry the activation graph: keep it out
            if name == leader:
                state["inputs"][name] = _layer_input(args, kwargs)
                input_sums[name].add_(_second_moment(select(x)).to(stats_device, stats_dtype))
            elif state["inputs"].get(leader) is not _layer_input(args, kwargs):
                raise RuntimeError(f"layer {name!r} no longer reads the same input as {leader!r}; input sharing "
                                   f"must not change between batches")
            count = state["mask_count"] if masked(x) else x.numel() // x.shape[-1]
            if state["input_only"]:
                input_tokens[name] += count
                return
            tokens[name] += count
            if need_gradients and torch.is_grad_enabled():
                if not output.requires_grad:  # everything upstream is frozen: start the activation graph here
                    output.requires_grad_(True)
                output.register_hook(grad_hook(name))
        return hook

    handles = [modules[name].register_forward_hook(forward_hook(name), with_kwargs=True) for name in leader_of]
    try:

        tagged = itertools.chain(((batch, False) for batch in batches), ((batch, True) for batch in input_batches))
        for step, (batch, input_only) in enumerate(progress_bar(tagged, desc=desc, total=total, disable=not progress,
                                                                leave=False)):
            batch = to_device(batch, device)
            mask = batch.get(mask_key) if isinstance(batch, Mapping) else None
            state["mask"] = None if mask is None else mask.bool()
            state["mask_count"] = None if mask is None else int(state["mask"].sum())  # one sync per batch
            state["input_only"] = input_only
            gradients = need_gradients and not input_only
            state["scale"] = normalizer(batch) if gradients else 1.0
            with torch.set_grad_enabled(gradients):
                loss = loss_fn(model, batch)
                if gradients:
                    if not bool(torch.isfinite(loss.detach()).all()):
                        raise FloatingPointError(f"calibration loss is not finite at batch {step}: {loss.item()}; "
                                                 f"the output-gradient statistics would be NaN")
                    if not loss.requires_grad:
                        raise RuntimeError("the calibration loss does not depend on any target layer's output")
                    loss.backward()
            state["inputs"].clear()
    finally:
        for handle in handles:
            handle.remove()
        state["inputs"].clear()

    counts = _all_reduce(torch.tensor([[tokens[name], input_tokens[name]] for name in leader_of],
                                      dtype=torch.float64, device=stats_device))
    tokens = {name: int(count[0]) for name, count in zip(leader_of, counts.tolist(), strict=True)}
    input_tokens = {name: int(count[1]) for name, count in zip(leader_of, counts.tolist(), strict=True)}
    result: dict[str, LayerStats] = {}
    for group in groups:
        leader = group[0]
        if tokens[leader] == 0:
            raise ValueError(f"target layer {leader!r} saw no calibration tokens (is it used in the forward pass?)")
        input_cov = _all_reduce(input_sums[leader]) / (tokens[leader] + input_tokens[leader])
        check_finite(input_cov, "input covariance", leader)
        for name in group:
            grad_cov = None
            if need_gradients:
                grad_cov = _all_reduce(grad_sums[name]) / tokens[name]
                check_finite(grad_cov, "output-gradient covariance", name)
            result[name] = LayerStats(input_cov, grad_cov, tokens[name] + input_tokens[name])
    return result


def broadcast_parameters(params: Iterable[nn.Parameter]) -> None:
    """Rank 0's values of `params` on every rank (no-op outside torch.distributed)."""
    for param in params:
        broadcast(param.data)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks (no-op outside torch.distributed): with the same start on
    every rank, every rank then takes the same optimizer step (a head warm-up on each rank's calibration shard)."""
    if not distributed():
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        _all_reduce(param.grad).div_(dist.get_world_size())


def warmup_head(model: nn.Module, head_params: Iterable[nn.Parameter], batches: Iterable, loss_fn: LossFn,
                steps: int, lr: float = 1e-3) -> list[float]:
    """A short linear probe: train only `head_params` for `steps` steps (AdamW) with the backbone frozen.

    The model runs in eval mode; its mode and every `requires_grad` flag are restored afterwards. Batches are
    cycled (re-iterated) when there are fewer than `steps`. Returns the loss of each step. Under `torch.distributed`
    every rank starts from rank 0's head and steps with the gradient averaged over the ranks' batches, so every rank
    ends with the same head (the calibration statistics that follow depend on it).
    """
    params = list(head_params)
    if not params:
        raise ValueError("warmup_head got no head parameters")
    if steps <= 0:
        return []
    device = params[0].device
    modes = module_modes(model)
    flags = [(param, param.requires_grad) for param in model.parameters()]
    losses: list[float] = []
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        broadcast_parameters(params)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        iterator = iter(batches)
        while len(losses) < steps:
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(batches)
                batch = next(iterator, None)
                if batch is None:
                    break
            loss = loss_fn(model, to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params)
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for param in params:
            param.grad = None
        for param, flag in flags:
            param.requires_grad_(flag)
        restore_modes(modes)
    return losses
