"""Error-aware (sequential) compression (docs/METHOD.md section 12.1): each block of the model is factorized from the
statistics of its inputs as the *compressed* blocks before it produce them.

One-shot compression fits every layer to the dense model's inputs `x`; deployed, a layer sees `x'`, what the
compressed layers upstream make of the same tokens. Going block by block (a transformer's decoder layers, a ViT's
blocks) with two streams of hidden states over the calibration batches, the dense stream `x` (dense blocks) and the
compressed stream `x'` (the blocks factorized so far), each target of the next block gets

    S' = E[x' x'^T]                     (the inputs it will see)
    T  = E[x_c x'^T],  x_c = lam x + (1 - lam) x'        (what it should reproduce, `lam` = `compensation`)

and the best full-rank map from what it sees to what it should produce, `W' = W T S'^{-1} = W + lam W E[(x - x')
x'^T] S'^{-1}` (least squares in the layer's K-FAC metric; `S'` damped in that solve as every covariance, so `W' = W`
exactly at `lam = 0` or where the prefix is exact). The layer is then factorized as one-shot JACTUS would, with
`W'` for `W` and `S'` for `Sx` (bases, task directions and projected core rebuilt; the gradient side `Sg` and the
ranks are the one-shot calibration's and plan's):

    lam = 0: W' = W, the compressed prefix's own input statistics (GPTQ-style);
    lam = 1: fit `W x` from `x'`, compensating the error upstream.

Within a block the inputs are the dense block's on the compressed stream (block-sequential, not layer-sequential).
Cost over one-shot: three forwards of each block over the calibration batches (the dense block on both streams, the
compressed block on its own; no backward), about one more calibration pass; memory: the two streams of hidden states (on the
CPU with `offload_to_cpu`), one block's `S'` and `T`, and the gradient covariances the one-shot pass measured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .calibration import CalibrationStats, LayerStats, LossFn, _all_reduce, _layer_input, to_device, token_rows
from .decompositions import Decompositions
from .factorize import build_layers
from .linalg import damp
from .modes import module_modes, restore_modes
from .progress import progress_bar


def check_compensation(value, key: str = "compensation") -> float | None:
    """`compensation`: None (one-shot) or a weight in [0, 1]; `key` names the setting in the error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value!r}: expected null (one-shot compression) or a weight in [0, 1] "
                         f"(0: the compressed prefix's own input statistics; 1: fit the dense output W x from x')")
    return float(value)


def target_blocks(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module, list[str]]]:
    """The blocks that hold the targets, in their `nn.ModuleList`/`nn.Sequential` order (a decoder's layers, a ViT's
    blocks): `(block name, block, its targets)`. Every target must sit in one such block."""
    modules = dict(model.named_modules())
    containers = {name for name, module in modules.items() if isinstance(module, (nn.ModuleList, nn.Sequential))}
    blocks: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        owner = None
        for cut in range(len(parts) - 1, 0, -1):  # the innermost container holding the target
            if ".".join(parts[: cut - 1]) in containers and parts[cut - 1].isdigit():
                owner = ".".join(parts[:cut])
                break
        if owner is None:
            raise ValueError(f"error-aware compression goes block by block, but target {name!r} is not inside a "
                             f"numbered block of an nn.ModuleList/nn.Sequential (e.g. model.layers.3); leave it out "
                             f"of the targets or compress one-shot (compensation=null)")
        blocks.setdefault(owner, []).append(name)
    parents = {block.rpartition(".")[0] for block in blocks}
    if len(parents) != 1:
        raise ValueError(f"error-aware compression needs the targets in one stack of blocks; found blocks under "
                         f"{sorted(parents)}")
    order = sorted(blocks, key=lambda block: int(block.rpartition(".")[2]))
    return [(block, modules[block], blocks[block]) for block in order]


class _Stop(Exception):
    pass


_CACHE_KEYS = ("past_key_value", "past_key_values", "cache", "layer_past")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return kwargs[key]
    raise ValueError(f"cannot find a block's hidden states among its arguments {list(kwargs)}")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else "x"
    return args, {**kwargs, key: hidden}


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _first_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence, loss_fn: LossFn, device,
                        store) -> list[tuple[tuple, dict]]:
    """Each batch's arguments of the first block (the forward stops there); no key/value cache is carried."""
    captured: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        kwargs = {key: value for key, value in kwargs.items()  # a key/value cache would grow with every replay
                  if key not in _CACHE_KEYS and not type(value).__name__.endswith("Cache")}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        hidden = _hidden(args, kwargs)
        args, kwargs = _with_hidden(args, kwargs, store(hidden.detach()))
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Stop):
                    loss_fn(model, to_device(batch, device))
    finally:
        handle.remove()
    return captured


def sequential_build(
    model: nn.Module,
    batches: Sequence,
    loss_fn: LossFn,
    linears: Mapping[str, nn.Linear],
    rank_map: Mapping[str, int | None],
    grad_covs: Mapping[str, torch.Tensor | None],
    input_groups: Sequence[Sequence[str]],
    compensation: float,
    *,
    stats_mode: str = "kfac",
    damping: float,
    rho: float,
    weight_basis: str,
    shared: Sequence[Sequence[str]] = (),
    mask_key: str = "attention_mask",
    device: torch.device,
    offload_to_cpu: bool = False,
    compute_dtype="auto",
    eig_method: str = "auto",
    stats_dtype: torch.dtype = torch.float64,
    progress: bool = True,
    on_layers: Callable[[dict[str, nn.Module]], None] | None = None,
) -> dict[str, nn.Module]:
    """The `FactorizedLinear` of every target with an int rank in `rank_map`, built block by block from the
    compressed prefix's statistics (module docstring). `grad_covs`: each target's output-gradient covariance from
    the one-shot calibration (None entries for `stats_mode` without them). The model is returned as it came: the
    built layers are swapped in only while the streams need them. `on_layers(new)` sees each block's layers."""
    blocks = target_blocks(model, linears)
    group_of = {name: list(group) for group in input_groups for name in group}
    stream_device = torch.device("cpu") if offload_to_cpu else device

    def store(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(stream_device)

    modes = module_modes(model)
    model.eval()
    built: dict[str, nn.Module] = {}
    masks = []
    for batch in batches:
        mask = batch.get(mask_key) if isinstance(batch, Mapping) else None
        masks.append(None if mask is None else mask.bool().to(device))
    try:
        inputs = _first_block_inputs(model, blocks[0][1], batches, loss_fn, device, store)
        dense = [_hidden(args, kwargs) for args, kwargs in inputs]
        compressed = list(dense)
        bar = progress_bar(total=len(blocks), desc=f"compress 2/2 (error-aware, compensation {compensation:g})",
                           disable=not progress)
        for block_name, block, names in blocks:
            def local(name: str, prefix: str = block_name + ".") -> str:
                return name.removeprefix(prefix)  # the target's name inside its block

            leaders = list(dict.fromkeys(group_of.get(name, [name])[0] for name in names))
            stats, next_dense = _prefix_statistics(block, local, leaders, linears, inputs, dense, compressed, masks,
                                                   compensation, stats_dtype, device, store)
            new = _refit(block, names, leaders, group_of, linears, stats, rank_map, grad_covs, stats_mode, damping,
                         rho, weight_basis, shared, compute_dtype, eig_method, compensation)
            built.update(new)
            if on_layers is not None:
                on_layers(new)
            dense = next_dense  # the dense block on the dense stream
            originals = {name: block.get_submodule(local(name)) for name in new}
            _swap(block, local, new)
            compressed = _run(block, inputs, compressed, store, device)
            _swap(block, local, originals)
            bar.update()
        bar.close()
    finally:
        restore_modes(modes)
    return built


def _swap(block: nn.Module, local: Callable[[str], str], layers: Mapping[str, nn.Module]) -> None:
    for name, layer in layers.items():
        block.set_submodule(local(name), layer)


def _run(block: nn.Module, inputs, stream, store, device) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for (args, kwargs), hidden in zip(inputs, stream, strict=True):
            args, kwargs = _with_hidden(args, kwargs, hidden.to(device))
            out.append(store(_block_output(block(*args, **kwargs))))
    return out


def _prefix_statistics(block, local, leaders, linears, inputs, dense, compressed, masks, compensation, stats_dtype,
                       device, store) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, int]], list[torch.Tensor]]:
    """Per shared-input group of the (dense) block: `(S', lam E[(x - x') x'^T], tokens)` over the calibration tokens
    (module docstring), from the block run on both streams; and the block's output on the dense stream."""
    n_of = {leader: linears[leader].in_features for leader in leaders}
    sums = {leader: torch.zeros(n_of[leader], n_of[leader], dtype=stats_dtype, device=device) for leader in leaders}
    cross = {leader: torch.zeros_like(sums[leader]) for leader in leaders}
    tokens = dict.fromkeys(leaders, 0)
    seen: dict[str, torch.Tensor] = {}
    state = {"mask": None, "phase": "compressed"}

    def hook(leader):
        def record(module, args, kwargs, output):
            rows = token_rows(_layer_input(args, kwargs).detach(), state["mask"]).float()
            if state["phase"] == "compressed":
                seen[leader] = rows
                sums[leader].add_((rows.T @ rows).to(stats_dtype))
                tokens[leader] += rows.shape[0]
            else:  # the dense stream: the same tokens, in the same order
                other = seen.pop(leader)
                if compensation:
                    cross[leader].add_(((rows - other).T @ other).to(stats_dtype), alpha=compensation)
        return record

    handles = [block.get_submodule(local(leader)).register_forward_hook(hook(leader), with_kwargs=True)
               for leader in leaders]
    outputs = []
    try:
        with torch.no_grad():
            for (args, kwargs), x, x_prime, mask in zip(inputs, dense, compressed, masks, strict=True):
                state["mask"] = mask
                for phase, hidden in (("compressed", x_prime), ("dense", x)):
                    state["phase"] = phase
                    call_args, call_kwargs = _with_hidden(args, kwargs, hidden.to(device))
                    output = block(*call_args, **call_kwargs)
                outputs.append(store(_block_output(output)))
    finally:
        for handle in handles:
            handle.remove()
    counts = _all_reduce(torch.tensor([tokens[leader] for leader in leaders], dtype=torch.float64, device=device))
    result = {}
    for leader, count in zip(leaders, counts.tolist(), strict=True):
        result[leader] = (_all_reduce(sums[leader]) / count, _all_reduce(cross[leader]) / count, int(count))
    return result, outputs


def _refit(block, names, leaders, group_of, linears, stats, rank_map, grad_covs, stats_mode, damping, rho,
           weight_basis, shared, compute_dtype, eig_method, compensation) -> dict[str, nn.Module]:
    """The block's layers factorized from `W' = W T S'^{-1}` in the metric `(S', Sg)`."""
    layers: dict[str, LayerStats] = {}
    effective: dict[str, nn.Linear] = {}
    for leader in leaders:
        second, cross, count = stats[leader]
        factor = torch.linalg.cholesky(damp(second, damping, leader, second.dtype)) if compensation else None
        for name in group_of.get(leader, [leader]):
            if name not in names or rank_map.get(name) is None:
                continue
            linear = linears[name]
            W = linear.weight.detach().to(second.dtype)
            # W' = W T S'^{-1} = W + W (T - S') S'^{-1}, T - S' = lam E[(x - x') x'^T] (exactly W at lam = 0, or
            # where the prefix is exact); S' damped in the solve only: solve S' Z = (W (T - S'))^T, Z^T added to W
            mapped = W + torch.cholesky_solve((W @ cross).T, factor).T if compensation else W
            virtual = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                device="meta")
            virtual.weight = nn.Parameter(mapped.to(linear.weight.dtype), requires_grad=False)
            virtual.bias = linear.bias
            effective[name] = virtual
            layers[name] = LayerStats(second, grad_covs.get(name), count)
    if not effective:
        return {}
    groups = [[name for name in group_of.get(leader, [leader]) if name in effective] for leader in leaders]
    decompositions = Decompositions(CalibrationStats(layers, [g for g in groups if len(g) > 1]), stats_mode, damping,
                                    compute_dtype=compute_dtype, eig_method=eig_method)
    block_shared = [list(group) for group in shared if group[0] in effective]
    return build_layers(decompositions, effective, [rank_map], rho, weight_basis, progress=False,
                        shared=block_shared)[0]

