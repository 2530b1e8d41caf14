#!/usr/bin/env bash
# Issue 7 item 5 on offline_vit (fashion_mnist, CPU scale): JACTUS@0.8 ties compress-then-adapt@0.8 in the table;
# vary one knob of JACTUS@0.8 at a time (everything else as in the table), and the JACTUS ablations. Seed 0 (seed 1
# where time allowed: SEEDS="0 1"). The reference rows (jactus@0.8, compress_then_adapt@0.8) are the table's own runs
# at the same seeds (the ViT code path has not changed since: git_sha in every summary).
# Run from the repository root with .venv active; each command writes logs/train/multiruns/<time>/.
set -euo pipefail
ROW="experiment=offline_vit data=fashion_mnist variant=jactus_0.8"
for SEED in ${SEEDS:-0}; do
  # the ablations: rho=0, plain weight basis, uniform allocator, input-only / gradient-only statistics
  # (their configs are not in lr_by_method, so JACTUS's rate is given explicitly)
  jactus-train -m $ROW seed=$SEED optim.lr=1e-4 \
      method=jactus_rho0,jactus_plain,jactus_uniform,jactus_input_stats,jactus_grad_stats
  # the knobs of item 5, one at a time: rho, calibration size, head warm-up (the core's learning rate was searched
  # on val/acc: ../lr_search; damping was not run)
  jactus-train -m $ROW seed=$SEED method.rho=0.5
  jactus-train -m $ROW seed=$SEED calib.num_samples=1024
  jactus-train -m $ROW seed=$SEED calib.head_warmup_steps=300
done
