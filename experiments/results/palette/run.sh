#!/usr/bin/env bash
# Issue 17 item 4 (vision half, CPU scale): one JACTUS palette run of N steps against independent JACTUS runs of
# N and N/4 steps, DINOv2-S on Fashion-MNIST with the offline_vit settings, budgets 0.5/0.6/0.7/0.8, lr 1e-4 for all.
# Runs two jobs at a time (2 CPU cores, one thread each). Usage:
#   experiments/results/palette/run.sh [SEEDS] [N]        # defaults: "0 1" and 100
#   ROWS="palette indep_n indep_q" experiments/results/palette/run.sh   # pick rows (also palette_uniform)
#   EXPERIMENT=offline_llama LR=5e-4 BUDGETS="0.6 0.8" LOG=experiments/results/palette/logs_llama \
#     experiments/results/palette/run.sh 0 40                          # the SmolLM2 half at CPU scale
# Each run writes $LOG/<name>/summary.json; then (see README.md):
#   jactus-report $LOG --out experiments/results/palette --split-by trainer.max_steps --split-by method.sampling
set -u
cd "$(dirname "$0")/../../.."
SEEDS=${1:-"0 1"}
N=${2:-100}
Q=$((N / 4))
ROWS=${ROWS:-"palette indep_n indep_q"}
BUDGETS=${BUDGETS:-"0.5 0.6 0.7 0.8"}
LOG=${LOG:-experiments/results/palette/logs_tmp}
EXPERIMENT=${EXPERIMENT:-offline_vit}   # offline_llama: the SmolLM2 half (LR=5e-4, its experiment's JACTUS rate)
LR=${LR:-1e-4}
PALETTE="[$(echo $BUDGETS | tr ' ' ',')]"
export LOG P=${P:-2}   # jobs at once; several instances may share LOG (experiments/results/run_jobs.sh claims each job)
export COMMON="experiment=$EXPERIMENT optim.lr=$LR evaluate_before=false logger=csv trainer.enable_checkpointing=false \
trainer.max_epochs=100"

for seed in $SEEDS; do
  for row in $ROWS; do
    case $row in
      palette) echo "palette_s${seed}_n${N} method=jactus_palette 'method.palette=$PALETTE' trainer.max_steps=$N seed=$seed" ;;
      palette_uniform) echo "palette_uniform_s${seed}_n${N} method=jactus_palette 'method.palette=$PALETTE' method.sampling=uniform trainer.max_steps=$N seed=$seed" ;;
      indep_n) for b in $BUDGETS; do echo "jactus${b}_s${seed}_n${N} method=jactus budget.ratio=$b trainer.max_steps=$N seed=$seed"; done ;;
      indep_q) for b in $BUDGETS; do echo "jactus${b}_s${seed}_n${Q} method=jactus budget.ratio=$b trainer.max_steps=$Q seed=$seed"; done ;;
    esac
  done
done | experiments/results/run_jobs.sh
