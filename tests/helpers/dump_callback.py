"""A test-only callback: each rank writes what it built, right after the method (before DDP wraps), when training
starts (after a checkpoint's weights are restored) and at the end."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class DumpPerRank(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def _dump(self, trainer, pl_module, when: str) -> None:
        method = next(c for c in trainer.callbacks if type(c).__name__ == "CompressionCallback").method
        cores = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items() if k.endswith(".C")}
        ranks = dict(method.plan.ranks) if getattr(method, "plan", None) is not None else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"ranks": ranks, "cores": cores}, self.out_dir / f"{when}_rank{trainer.global_rank}.pt")

    def setup(self, trainer, pl_module, stage):  # runs after CompressionCallback.setup (callbacks run in order)
        if stage == "fit":  # trainer.test/validate after fit call setup again: keep the state before training
            self._dump(trainer, pl_module, "setup")

    def on_train_start(self, trainer, pl_module):
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, pl_module, "end")


class RecordModes(Callback):
    """Writes, at the first training batch, the names of the model's modules that are in eval mode and of its
    dropout modules with their flags."""

    def __init__(self, out_file: str):
        self.out_file = Path(out_file)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        import json

        modules = list(pl_module.model.named_modules())
        record = {"eval": [name for name, module in modules if not module.training],
                  "dropout": {name: module.training for name, module in modules
                              if isinstance(module, torch.nn.Dropout)}}
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        self.out_file.write_text(json.dumps(record))
