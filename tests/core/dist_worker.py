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
