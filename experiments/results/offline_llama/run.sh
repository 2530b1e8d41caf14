#!/usr/bin/env bash
# The offline_llama table at CPU scale (2 CPU cores): SmolLM2-135M on the eight commonsense tasks, seed 0,
# 50 steps of batch 8 for every trained row, no validation split (no learning-rate search at this scale: the
# experiment's lr_by_method table is used as it stands). Four sweeps of the one experiment, so that only the first
# (jactus@0.8 and compress_then_adapt@0.8) also measures its compressed model before fine-tuning, on the test split
# (3 min a run here; full_ft, lora, dora and tunecomp start from the dense model, which the zero_shot row measures).
# Run from the repository root with .venv active; each sweep writes logs/train/multiruns/<time>/.
set -euo pipefail
COMMON="experiment=offline_llama seed=0 trainer.max_steps=50 data.module.val_per_task=0"
jactus-train -m $COMMON evaluate_before=true  variant=jactus_0.8,compress_then_adapt_0.8
jactus-train -m $COMMON evaluate_before=false variant=zero_shot,lora,dora
jactus-train -m $COMMON evaluate_before=false variant=jactus_0.6,compress_then_adapt_0.6,cersa
jactus-train -m $COMMON evaluate_before=false variant=tunecomp_0.8,tunecomp_0.6,full_ft
