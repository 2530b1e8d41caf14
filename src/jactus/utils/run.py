"""Building a run from a composed config, shared by jactus-train, jactus-compress and jactus-eval."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("jactus")

# The Hydra configs ship inside the package (jactus/conf), so an installed wheel finds them; users add their own
# groups and experiments with `--config-dir DIR` or `hydra.searchpath=[file://DIR]` (README, "Your own configs").
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

FAMILIES = {"vision": "vision", "causal_lm": "qa"}  # model family -> the data family it reads


@dataclass
class Run:
    loaded: object  # jactus.models.LoadedModel
    datamodule: object
    module: object  # jactus.lit.TaskModule


def check_config(cfg: DictConfig) -> None:
    """Fail before any heavy work when the model and data do not fit together."""
    model_family, data_family = cfg.model.get("family"), cfg.data.get("family")
    if model_family not in FAMILIES:
        raise ValueError(f"model.family={model_family!r}: expected one of {sorted(FAMILIES)}")
    if FAMILIES[model_family] != data_family:
        valid = "vision data (synthetic_vision, fashion_mnist, mnist5k, cifar10, ...)" if model_family == "vision" \
            else "QA data (synthetic_qa, boolq, piqa, ..., commonsense8)"
        raise ValueError(f"model={cfg.model.name} is a {model_family} model but data={cfg.data.name} is {data_family} "
                         f"data; pick {valid}")


def build_run(cfg: DictConfig) -> Run:
    from ..lit import CausalLMQA, ImageClassifier

    check_config(cfg)
    loaded = instantiate(cfg.model.backbone, _convert_="all")
    if cfg.model.family == "causal_lm":
        datamodule = instantiate(cfg.data.module, tokenizer=loaded.tokenizer, _convert_="all")
    else:
        datamodule = instantiate(cfg.data.module, _convert_="all")
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim.pop("lr_by_method", None)
    optim["lr"] = learning_rate(cfg)
    calib_loss = (cfg.get("calib") or {}).get("loss", "task")
    if cfg.model.family == "causal_lm":
        module = CausalLMQA(loaded.model, task_names=datamodule.task_names, head_names=loaded.head_names,
                            calib_loss=calib_loss, **optim)
    else:
        if calib_loss != "task":
            raise ValueError(f"calib.loss={calib_loss!r} is for causal-LM QA; a vision model calibrates with its "
                             f"classification loss: set calib.loss=task")
        module = ImageClassifier(loaded.model, head_names=loaded.head_names, **optim)
    return Run(loaded, datamodule, module)


def learning_rate(cfg: DictConfig) -> float:
    """`optim.lr`, or the experiment's entry for this method in `optim.lr_by_method`.

    An `optim.lr` given on the command line (or as a sweep value) wins over that table: a learning-rate sweep runs
    the rates it names. (Hydra merges `optim.lr_by_method={}` into the experiment's table instead of emptying it;
    `optim.lr_by_method=null` disables the table.) A distilled row ("jactus+kd") without an entry of its own takes
    its method's rate."""
    table = cfg.optim.get("lr_by_method") or {}
    label = method_label(cfg)
    if _on_command_line("optim.lr"):
        return float(cfg.optim.lr)
    for key in (label, label.split("+", 1)[0]):
        if key in table:
            return float(table[key])
    return float(cfg.optim.lr)


def _on_command_line(key: str) -> bool:
    if not HydraConfig.initialized():
        return False
    return any(override.lstrip("+~").split("=", 1)[0] == key for override in HydraConfig.get().overrides.task)


def method_label(cfg: DictConfig) -> str:
    """The method's config name (jactus, jactus_rho0, lora, ...): what reports group by. An explicit
    `distill.weight` > 0 adds "+kd" (a method's own default, TACO's distillation, is part of its name)."""
    if cfg.get("method_label"):
        return str(cfg.method_label)
    if HydraConfig.initialized():
        name = HydraConfig.get().runtime.choices.get("method", "unknown")
    else:
        name = str(cfg.method.get("_target_", "unknown")).rsplit(".", 1)[-1].lower()
    weight = (cfg.get("distill") or {}).get("weight")
    return f"{name}+kd" if weight else name


def flat_config(cfg: DictConfig) -> dict:
    """The resolved config as flat `a/b/c` keys (what W&B and CSV hyperparameters show)."""
    out: dict = {}

    def walk(prefix: str, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}" if prefix else str(key), value)
        else:
            out[prefix] = node

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


def task_wrapper(task: Callable) -> Callable:
    """Always close W&B (so the next job of a multirun starts clean) and log the failure before re-raising."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig):
        try:
            return task(cfg)
        except Exception:
            log.exception("run failed")
            raise
        finally:
            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish()

    return wrapped
