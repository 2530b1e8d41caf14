"""Worker for the 2-process gloo test (a plain module so torch.multiprocessing.spawn can import it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyTokenModel(nn.Module):
    """Tokens [B, L, 6] -> fc1 -> relu -> fc2 -> masked mean pool -> head: targets fc1, fc2."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, attention_mask):
        h = self.fc2(torch.relu(self.fc1(x)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


def make_model() -> TinyTokenModel:
    torch.manual_seed(0)
    return TinyTokenModel()


def make_batches(count: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[0, 3:] = 0
        mask[2, 1:] = 0
        batches.append({"x": torch.randn(3, 5, 6, generator=generator), "attention_mask": mask,
                        "labels": torch.randint(0, 3, (3,), generator=generator)})
    return batches


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["x"], batch["attention_mask"]), batch["labels"])


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from jactus.core import calibrate, plan_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = make_model()
        shard = make_batches()[rank::world_size]
        stats = calibrate(model, shard, loss_fn, progress=False)
        plan = plan_ranks(model, stats, 0.8, rank_multiple=1, scope="targets")
        stats.save(f"{out_dir}/stats{rank}.pt")
        torch.save(plan.to_dict(), f"{out_dir}/plan{rank}.pt")
    finally:
        dist.destroy_process_group()


class TwinModel(nn.Module):
    """Two identical linears on one input whose outputs the loss treats alike: their statistics and spectra are
    equal, so every rank step of the marginal-gain allocation is a tie between them (broken by layer order)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.twin_a = nn.Linear(16, 16)
        self.twin_b = nn.Linear(16, 16)
        with torch.no_grad():
            self.twin_b.weight.copy_(self.twin_a.weight)
            self.twin_b.bias.copy_(self.twin_a.bias)
        self.head = nn.Linear(16, 3)

    def forward(self, x, attention_mask):
        h = torch.relu(self.twin_a(x)) + torch.relu(self.twin_b(x))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


def make_twin_batches(count: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(3, 5, 16, generator=generator), "attention_mask": torch.ones(3, 5, dtype=torch.long),
             "labels": torch.randint(0, 3, (3,), generator=generator)} for _ in range(count)]


TWIN_TARGETS = ["twin_a", "twin_b"]
# scope=targets: 2 x (256 + 16) parameters; each rank step costs 32: 0.36 allows 5 steps, an odd number, so the
# last step goes to twin_a by layer order, or to twin_b when its statistics are 1e-12 larger.
TWIN_BUDGET = 0.36


def run_perturbed(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Rank 1's statistics are perturbed by 1e-12 (relative) after the all-reduce, as floating point could on a
    different device; the plan and layers must still be rank 0's on both ranks. Also: the head warm-up gives the
    same head on both ranks, and a rank without calibration batches makes both ranks raise, not hang."""
    import datetime

    import torch.distributed as dist

    import jactus.core.bounded as bounded
    from jactus.core import FactorizedLinear, compress_model, plan_ranks, warmup_head

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    real_calibrate = bounded.calibrate

    def perturbed(*args, **kwargs):
        stats = real_calibrate(*args, **kwargs)
        if rank == 1 and "twin_b" in stats.layers:
            stats.layers["twin_b"].grad_cov.mul_(1 + 1e-12)
        return stats

    result: dict = {}
    try:
        model = TwinModel()
        torch.manual_seed(100 + rank)  # a different head on each rank before the warm-up
        nn.init.normal_(model.head.weight)
        shard = make_twin_batches()[rank::world_size]
        warmup_head(model, model.head.parameters(), shard, loss_fn, steps=3, lr=1e-2)
        result["head"] = model.head.weight.detach().clone()

        stats = perturbed(model, shard, loss_fn, TWIN_TARGETS, progress=False)
        result["local_plan"] = plan_ranks(model, stats, TWIN_BUDGET, rank_multiple=1, scope="targets",
                                          targets=TWIN_TARGETS).ranks
        bounded.calibrate = perturbed
        compressed, plan = compress_model(model, shard, loss_fn, TWIN_BUDGET, targets=TWIN_TARGETS, rank_multiple=1,
                                          scope="targets", progress=False)
        result["plan"] = dict(plan.ranks)
        result["layers"] = {name: {key: value.detach().clone() for key, value in module.state_dict().items()}
                            for name, module in compressed.named_modules() if isinstance(module, FactorizedLinear)}
        bounded.calibrate = real_calibrate
        try:
            compress_model(TwinModel(), shard if rank == 0 else [], loss_fn, TWIN_BUDGET, targets=TWIN_TARGETS,
                           progress=False)
        except ValueError as err:
            result["empty_error"] = str(err)
    finally:
        torch.save(result, f"{out_dir}/perturbed{rank}.pt")
        dist.destroy_process_group()
