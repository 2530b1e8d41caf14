"""jactus-eval: load a compact model directory (no original weights) and measure its test accuracy.

    jactus-eval compact_dir=logs/train/runs/<time>/compact model=dinov2_small data=fashion_mnist
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from .compress import resolve_device
from .core import count_params, load_compact
from .utils.run import CONF_DIR, check_config, task_wrapper
from .utils.tables import print_results_table


@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    from .lit import CausalLMQA, ImageClassifier

    compact_dir = Path(cfg.compact_dir)
    if not (compact_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"compact_dir={compact_dir}: expected a directory written by save_compact "
                                "(model.safetensors, rank_map.json, arch.json)")
    check_config(cfg)
    device = resolve_device(cfg.device)
    model = load_compact(compact_dir).to(device)
    if cfg.model.family == "causal_lm":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(compact_dir) if (compact_dir / "tokenizer_config.json").exists() \
            else instantiate(cfg.model.backbone).tokenizer
        datamodule = instantiate(cfg.data.module, tokenizer=tokenizer, _convert_="all")
        datamodule.setup("test")
        module = CausalLMQA(model, task_names=datamodule.task_names, lr=cfg.optim.lr)
    else:
        datamodule = instantiate(cfg.data.module, _convert_="all")
        datamodule.setup("test")
        module = ImageClassifier(model, lr=cfg.optim.lr)
    metrics = module.evaluate(datamodule.test_dataloader(), device)
    result = {"compact_dir": str(compact_dir), "data": cfg.data.name, "params": count_params(model), "metrics": metrics}
    out = Path(cfg.paths.output_dir) / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_results_table(f"{compact_dir} on {cfg.data.name}: accuracy (%), nll", [("compact", metrics)])
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
