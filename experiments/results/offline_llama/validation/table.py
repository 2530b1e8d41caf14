"""The validation study's table (issue 19 item 3): per JACTUS setting, before and after fine-tuning, the validation
split's NLL and accuracy, mean and per seed. Reads every summary.json under the given folders.
    python experiments/results/offline_llama/validation/table.py experiments/results/offline_llama/validation/runs
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

KEYS = (("method", "method"), ("budget.ratio", "budget"), ("trainer.max_steps", "steps"), ("method.rho", "rho"),
        ("calib.num_samples", "calib"), ("calib.loss", "calib loss"), ("distill.weight", "distill"), ("lr", "lr"),
        ("method.dense_adapter_r", "dense-target LoRA r"), ("method.core_dropout", "core dropout"),
        ("method.share_bases", "shared bases"), ("method.compensation", "compensation"), ("budget.unit", "unit"),
        ("data.module.calib_source", "calib source"), ("method.measure_batches", "measured gains"),
        ("data.module.calib_text", "calib text"), ("method.sparse_share", "sparse share"),
        ("method.sparse_init", "sparse init"))

COMPRESSING_ONLY = {"budget.ratio", "calib.num_samples", "budget.unit", "data.module.calib_source",
                    "data.module.calib_text"}  # any method with a budget (JACTUS, TACO, TuneComp)
JACTUS_ONLY = {"method.rho", "calib.loss", "method.dense_adapter_r", "method.core_dropout", "method.share_bases",
               "method.compensation", "method.measure_batches", "method.sparse_share", "method.sparse_init"}
DEFAULTS = {"calib.loss": "task", "method.dense_adapter_r": 0, "method.core_dropout": 0.0, "method.share_bases": False,
            "budget.unit": "params", "data.module.calib_source": "train", "method.measure_batches": 0,
            "data.module.calib_text": 0, "method.sparse_share": 0.0, "method.sparse_init": "zero"}


def setting(run: Path, summary: dict) -> tuple:
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())

    def get(dotted):
        if dotted in ("lr", "method"):
            return summary.get(dotted)
        if dotted in COMPRESSING_ONLY and summary.get("budget") is None:
            return None  # LoRA: 100%, no calibration
        if dotted in JACTUS_ONLY and not str(summary.get("method", "")).startswith("jactus"):
            return None
        value = config
        for part in dotted.split("."):
            value = (value or {}).get(part)
        if isinstance(value, str) and value.startswith("${oc.select:"):  # unresolved in .hydra: the root key or default
            key, _, default = value[len("${oc.select:"):-1].partition(",")
            value = config.get(key, yaml.safe_load(default))
        if value is None and dotted in DEFAULTS:
            return DEFAULTS[dotted]  # runs from before the option
        if isinstance(value, list):
            return "/".join(value)  # the kinds that share a basis, e.g. gate_proj/up_proj
        return value
    return tuple(get(key) for key, _ in KEYS)


def fmt(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def main(dirs: list[str]) -> None:
    rows: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for directory in dirs:
        for path in sorted(Path(directory).rglob("summary.json")):
            summary = json.loads(path.read_text())
            if summary.get("status") not in (None, "ok", "completed"):
                continue
            rows[setting(path.parent, summary)][summary["seed"]] = summary
    header = [label for _, label in KEYS] + ["seeds", "before: val NLL", "before: acc", "val NLL", "val acc",
                                             "val NLL per seed"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---:"] * len(header)) + "|")
    for key in sorted(rows, key=lambda k: tuple(str(v) for v in k)):
        runs = rows[key]
        seeds = sorted(runs)
        before = [(runs[s].get("metrics_before") or {}).get("method", {}) for s in seeds]
        after = [runs[s]["metrics"] for s in seeds]
        cells = [str(v) for v in key] + [",".join(map(str, seeds)),
                                         fmt([b["val/nll"] for b in before if "val/nll" in b], 3),
                                         fmt([b["val/acc"] for b in before if "val/acc" in b], 1),
                                         fmt([a["val/nll"] for a in after], 3), fmt([a["val/acc"] for a in after], 1),
                                         " ".join(f"{a['val/nll']:.3f}" for a in after)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["experiments/results/offline_llama/validation/runs"])
