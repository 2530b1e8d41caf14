"""The core library needs torch and safetensors alone: with the training, report, W&B and asset extras hidden,
`import jactus` works and compresses a plain PyTorch model."""

from __future__ import annotations

import subprocess
import sys

HIDDEN = ["lightning", "pytorch_lightning", "hydra", "omegaconf", "timm", "transformers", "peft", "torchmetrics",
          "torchvision", "wandb", "tensorboard", "onnx", "onnxruntime", "gguf", "datasets", "pandas", "matplotlib",
          "tqdm", "rich", "lm_eval"]

CHILD = f"""
import importlib.abc, sys
HIDDEN = {HIDDEN!r}

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"{{name}} is hidden (not installed)")
        return None

sys.meta_path.insert(0, Hide())
import torch
from torch import nn
import jactus
from jactus.core.factorize import fold_factorized

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
batches = [(torch.randn(8, 16), torch.randint(0, 8, (8,))) for _ in range(3)]
loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
model, plan = jactus.compress_model(model, batches, loss, 0.7, targets=["0", "2"], rank_multiple=2,
                                    scope="targets", progress=True)
assert isinstance(model[0], jactus.FactorizedLinear) and plan.ratio <= 0.7
model = fold_factorized(model)
print("OK", sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN))
"""


def test_core_imports_and_compresses_with_torch_and_safetensors_alone():
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "OK []"


def test_plain_datasets_import_without_lightning():
    child = CHILD.split("import torch\n")[0].replace(f"HIDDEN = {HIDDEN!r}", "HIDDEN = ['lightning', 'pytorch_lightning']")
    child += ("import jactus.data.qa, jactus.data.vision, jactus.data.vision_paper\n"
              "from jactus.data import COMMONSENSE_TASKS, get_vision_dataset\n"
              "items = jactus.data.vision.synthetic_vision(split='test', test_items=8)\n"
              "assert len(items) == 8 and len(COMMONSENSE_TASKS) == 8\n"
              "try:\n    from jactus.data import QADataModule\nexcept ImportError:\n    print('MODULE HIDDEN')\n")
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "MODULE HIDDEN"  # the DataModule (and only it) needs Lightning
