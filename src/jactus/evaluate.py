"""jactus-eval: load a compact model directory (no original weights) and measure its test accuracy.

    jactus-eval compact_dir=logs/train/runs/<time>/compact model=dinov2_small data=fashion_mnist

Writes summary.json and items.jsonl.gz (the per-item results; see jactus.summary) like every run (method, budget and
the original size come from the compact model's own summary.json when it sits beside it, as jactus-compress and
jactus-train write them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from .compress import resolve_device
from .core import count_params, load_compact
from .summary import ITEMS_FILE, bytes_fields, git_sha, write_items, write_summary
from .utils.run import CONF_DIR, check_config, task_wrapper
from .utils.tables import print_results_table


@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    from .lit import CausalLMQA, ImageClassifier

    start = time.perf_counter()
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
    written = _origin_summary(compact_dir)
    # the method's own count where the run recorded it (a pruned model's zeros are not deployed parameters)
    params = written.get("params_deployed") or count_params(model)
    original = written.get("params_original")
    summary = {
        "method": written.get("method", "compact"), "model": cfg.model.name, "data": cfg.data.name,
        "budget": written.get("budget"), "seed": int(cfg.seed), "params_original": original,
        "params_deployed": params, "params_trainable": 0, "params_ratio": params / original if original else None,
        "metrics": metrics, "wall_s": time.perf_counter() - start, "git_sha": git_sha(), "status": "ok",
        "compact_dir": str(compact_dir), "fine_tuned": written.get("fine_tuned"),
        **bytes_fields(model, written.get("bytes_original")),
    }
    items = module.item_records("test", default_task=cfg.data.name)
    if items:
        summary["items"] = ITEMS_FILE
        write_items(Path(cfg.paths.output_dir), items)
    write_summary(Path(cfg.paths.output_dir), summary)
    print_results_table(f"{compact_dir} on {cfg.data.name}: accuracy (%), nll", [("compact", metrics)])
    return summary


def _origin_summary(compact_dir: Path) -> dict:
    """The summary of the run that wrote `compact_dir`: jactus-compress writes it inside the compact dir, jactus-train
    beside it, a palette run two levels up (`<run>/compact/budget_<b>`, whose member entry gives budget and size)."""
    candidates = [compact_dir / "summary.json", compact_dir.parent / "summary.json"]
    if compact_dir.parent.name == "compact":
        candidates.append(compact_dir.parent.parent / "summary.json")
    origin = next((path for path in candidates if path.is_file()), None)
    written = json.loads(origin.read_text()) if origin is not None else {}
    member = next((m for m in written.get("palette") or [] if compact_dir.name == f"budget_{m['budget']}"), None)
    if member is not None:
        written = {**written, "budget": member["budget"], "params_deployed": member.get("params_deployed")}
    return written


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
