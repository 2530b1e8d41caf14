"""FSDP fine-tuning of a compact (FactorizedLinear) Llama under Lightning: a couple of training steps.

Two strategies:
- `fsdp2` (default): Lightning's `ModelParallelStrategy` with torch FSDP2 `fully_shard` applied in `configure_model`,
  one unit per decoder layer plus the root. FSDP2 shards per parameter, so frozen `U`/`V` and trainable `C` live in
  one unit without `use_orig_params`. Runs on the CPU with gloo (`--accelerator cpu --devices 2`) and on GPUs (NCCL).
- `fsdp1`: Lightning's `FSDPStrategy` (torch FSDP1) with every `FactorizedLinear` and decoder layer in its own wrap
  unit and `use_orig_params=True` (conf/trainer/fsdp.yaml). Lightning refuses it on the CPU (see RESULTS.md), so it is
  for GPUs only: `--strategy fsdp1 --accelerator gpu --devices 1` exercises the path on one GPU.

The compact model is made as the project makes it, before the strategy wraps the model: calibrate -> plan_ranks ->
factorize (deterministic, identical on every rank). The run checks that the loss is finite, that only the trainable
set changed, and that every rank ends with the same cores.

    python experiments/bench/fsdp_smoke.py --accelerator cpu --devices 2            # CPU, gloo (cpu-scale)
    python experiments/bench/fsdp_smoke.py --accelerator gpu --devices 1 --strategy fsdp1
    python experiments/bench/fsdp_smoke.py --accelerator gpu --devices 8 --strategy fsdp2  # one node, 8 GPUs
"""

from __future__ import annotations

import argparse
import copy
import time

import common
import lightning as L
import torch
from torch.utils.data import DataLoader


class ShardedCausalLM(L.LightningModule):
    """The project's causal-LM task module plus FSDP2 sharding in `configure_model` (per decoder layer, then root)."""

    def __init__(self, model, lr: float = 1e-3, fsdp2: bool = True):
        super().__init__()
        self.model, self.lr, self.fsdp2 = model, lr, fsdp2
        self.losses: list[float] = []

    def configure_model(self):
        if not self.fsdp2:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        loss = common.lm_loss(self.model, batch)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def compact_tiny_llama(device: torch.device):
    from jactus.core.allocation import plan_ranks
    from jactus.core.calibration import calibrate
    from jactus.core.factorize import factorize

    model = common.build_llama("toy", torch.float32, device)
    batches = common.lm_batches(2, 2, 32, common.LLAMA["toy"]["vocab_size"], device, seed=1)
    stats = calibrate(model, batches, common.lm_loss, progress=False, device=device)
    return factorize(model, stats, plan_ranks(model, stats, budget=0.8), progress=False)


def export_round_trip(model, full: dict[str, torch.Tensor]) -> bool:
    """The trained (gathered) parameters in `model`, an unsharded copy taken before training, deployed:
    save_compact -> load_compact gives the same logits as the factorized model."""
    import tempfile

    from jactus.core import load_compact, save_compact

    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or any(name in dict(model.named_parameters()) for name in missing):
        return False
    ids = torch.randint(0, common.LLAMA["toy"]["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        expected = model.eval()(input_ids=ids).logits
        save_compact(model, folder)
        loaded = load_compact(folder)(input_ids=ids).logits
    return bool(torch.allclose(loaded, expected, rtol=1e-4, atol=1e-5))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=("fsdp2", "fsdp1"), default="fsdp2")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    common.setup_threads()
    from jactus.core.layers import FactorizedLinear

    torch.manual_seed(0)
    model = compact_tiny_llama(torch.device("cpu"))
    # FSDP2 refuses non-contiguous parameters ("FSDP does not support non-contiguous parameters yet"), and factorize
    # can hand FactorizedLinear transposed views as U/V; made contiguous here until the core does it (RESULTS.md).
    noncontiguous = [n for n, p in model.named_parameters() if not p.is_contiguous()]
    for param in model.parameters():
        param.data = param.data.contiguous()
    unsharded = copy.deepcopy(model)  # the structure the export check loads the trained parameters into
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        strategy = FSDPStrategy(auto_wrap_policy={FactorizedLinear, LlamaDecoderLayer}, use_orig_params=True,
                                sharding_strategy="FULL_SHARD", state_dict_type="full")
    module = ShardedCausalLM(model, fsdp2=args.strategy == "fsdp2")
    data = common.lm_batches(args.steps * args.devices, 2, 32, common.LLAMA["toy"]["vocab_size"], torch.device("cpu"))
    loader = DataLoader(data, batch_size=None)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, precision="32-true" if args.accelerator == "cpu" else "bf16-mixed")
    start = time.perf_counter()
    trainer.fit(module, loader)
    wall = time.perf_counter() - start

    # Gather full parameters (FSDP2 DTensors -> full tensors) to check what changed.
    full = {}
    for name, param in module.model.named_parameters():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        full[name] = tensor.detach().float().cpu()
    changed_trainable = sum(not torch.equal(full[n], v.float()) for n, v in trainable_before.items() if n in full)
    changed_frozen = sum(not torch.equal(full[n], v.float()) for n, v in frozen_before.items() if n in full)
    cores = torch.cat([full[n].flatten() for n in sorted(full) if n.endswith(".C")])
    gathered = [torch.zeros_like(cores) for _ in range(trainer.world_size)]
    if trainer.world_size > 1:
        torch.distributed.all_gather(gathered, cores.to(trainer.strategy.root_device))
        same_cores = all(torch.equal(g.cpu(), gathered[0].cpu()) for g in gathered)
    else:
        same_cores = True
    record = {
        "benchmark": "fsdp_smoke", "scale": "cpu-scale" if args.accelerator == "cpu" else "gpu",
        "device": common.device_string(trainer.strategy.root_device), "date": common.DATE,
        "strategy": f"{args.strategy} ({type(strategy).__name__}), {args.devices} x {args.accelerator}, backend "
                    f"{torch.distributed.get_backend() if torch.distributed.is_initialized() else 'none'}",
        "model": f"compact toy Llama {common.LLAMA['toy']} at budget 0.8 ("
                 f"{sum(isinstance(m, FactorizedLinear) for m in module.model.modules())} FactorizedLinear)",
        "steps": trainer.global_step, "losses_rank": module.losses, "wall_s": round(wall, 2),
        "trainable_changed": f"{changed_trainable}/{len(trainable_before)}",
        "frozen_changed": f"{changed_frozen}/{len(frozen_before)}", "cores_identical_across_ranks": same_cores,
        "noncontiguous_params_fixed": len(noncontiguous), "noncontiguous_example": noncontiguous[:3],
    }
    record["export_loads"] = export_round_trip(unsharded, full) if trainer.is_global_zero else None
    record["ok"] = bool(trainer.global_step == args.steps and all(map(lambda x: x == x, module.losses))
                        and changed_frozen == 0 and changed_trainable > 0 and same_cores
                        and record["export_loads"] is not False)
    if trainer.is_global_zero:
        common.write_json(record, args.out)
    return record


if __name__ == "__main__":
    main()
