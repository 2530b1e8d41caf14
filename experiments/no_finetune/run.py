"""Evidence on real weights, before any fine-tuning: how close each factorization keeps the task loss and accuracy
to the dense model, at several budgets, from ONE calibration.

    python experiments/no_finetune/run.py model=dinov2_small data=fashion_mnist
    python experiments/no_finetune/run.py model=smollm2_135m data=arc_e

Rows, one calibration for all of them: plain SVD truncation (uniform ranks, no statistics); SVD-LLM (input
whitening, uniform ranks: compress-then-adapt's starting point); K-FAC whitening with uniform ranks (the metric
alone); JACTUS with the marginal-gain allocator at rho = 0 and at rho = 0.25 (the default). Writes results.json and
results.md next to this file under <model>_<data>/. Any jactus-train override applies (data sizes,
calib.num_samples, ...).
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from jactus.core import calibrate, factorize, plan_ranks  # noqa: E402
from jactus.core.calibration import to_device  # noqa: E402
from jactus.summary import git_sha  # noqa: E402
from jactus.utils.run import CONF_DIR, build_run  # noqa: E402

VARIANTS = {
    "plain SVD, uniform": dict(stats_mode="none", allocator="uniform", rho=0.0, weight_basis="plain"),
    "SVD-LLM (input whitening), uniform": dict(stats_mode="input", allocator="uniform", rho=0.0,
                                               weight_basis="whitened"),
    "K-FAC whitening, uniform": dict(stats_mode="kfac", allocator="uniform", rho=0.0, weight_basis="whitened"),
    "JACTUS rho=0 (K-FAC, marginal gain)": dict(stats_mode="kfac", allocator="marginal_gain", rho=0.0,
                                                weight_basis="whitened"),
    "JACTUS rho=0.25": dict(stats_mode="kfac", allocator="marginal_gain", rho=0.25, weight_basis="whitened"),
}
BUDGETS = (0.8, 0.6)


@torch.no_grad()
def mean_loss(module, batches) -> float:
    module.model.eval()
    losses = [float(module.calibration_loss(module.model, batch)) for batch in batches]
    return sum(losses) / len(losses)


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "callbacks=none", *overrides])
    torch.manual_seed(cfg.seed)
    run = build_run(cfg)
    run.datamodule.setup("fit")
    module, model = run.module, run.module.model
    calibration = [to_device(b, "cpu") for b in run.datamodule.calibration_dataloader()]
    module.warmup_head(calibration, cfg.calib.head_warmup_steps, cfg.calib.head_warmup_lr)
    test = list(run.datamodule.test_dataloader())
    # held-out task loss on training-format batches the calibration did not see
    held_out = list(run.datamodule.train_dataloader())[-8:]
    rows = [{"variant": "dense", "budget": 1.0, "ratio": 1.0, "loss": mean_loss(module, held_out),
             **module.evaluate(test)}]
    start = time.perf_counter()
    stats = calibrate(model, calibration, module.calibration_loss)
    calib_s = time.perf_counter() - start
    for name, knobs in VARIANTS.items():
        plans = plan_ranks(model, stats, list(BUDGETS), allocator=knobs["allocator"], stats_mode=knobs["stats_mode"])
        for budget, plan in zip(BUDGETS, plans, strict=True):
            module.model = factorize(copy.deepcopy(model), stats, plan, rho=knobs["rho"],
                                     weight_basis=knobs["weight_basis"], stats_mode=knobs["stats_mode"])
            rows.append({"variant": name, "budget": budget, "ratio": plan.ratio, "loss": mean_loss(module, held_out),
                         **module.evaluate(test)})
            module.model = model
            print(rows[-1], flush=True)
    out_dir = Path(__file__).parent / f"{cfg.model.name}_{cfg.data.name}"
    out_dir.mkdir(exist_ok=True)
    record = {"command": "python experiments/no_finetune/run.py " + " ".join(overrides),
              "date": datetime.date.today().isoformat(), "device": f"cpu ({torch.get_num_threads()} threads)",
              "git_sha": git_sha(), "calibration_s": calib_s, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    acc_keys = sorted({k for r in rows for k in r if k.startswith("test/acc")})
    lines = [f"# {cfg.model.name} on {cfg.data.name}: factorization before any fine-tuning", "",
             f"`{record['command']}` ({record['date']}, {record['device']})", "",
             "| variant | budget | retained | held-out loss | " + " | ".join(k.split('/')[-1] for k in acc_keys) + " |",
             "|---|---|---|---|" + "---|" * len(acc_keys)]
    for r in rows:
        cells = " | ".join(f"{r[k]:.1f}" if k in r else "-" for k in acc_keys)
        lines.append(f"| {r['variant']} | {r['budget']} | {100 * r['ratio']:.1f}% | {r['loss']:.3f} | {cells} |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
