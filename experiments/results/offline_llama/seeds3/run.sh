#!/usr/bin/env bash
# Issue 19 item 4 at CPU scale: the offline_llama table with 150 test questions a task (1200 in all), 150 steps of
# batch 8 for every trained row (2.3 epochs of the 512 training items), 20 validation items a task, seeds 0 1 2.
# The seed also draws each task's test/val/train split, so a row's seeds are three different 150-item test sets and
# rows are paired within a seed. Runs two jobs at a time, one thread each, resumable (experiments/results/run_jobs.sh):
#   experiments/results/offline_llama/seeds3/run.sh [SEEDS] [ROWS]     # defaults "0 1 2" and every row below
# EXTRA appends overrides to every job (e.g. EXTRA=calib.stats_cache=logs/stats_cache: rows of one seed share a
# calibration). Two instances may share LOG (P=1 each balances the cores; a claimed job is skipped),
# then collect and report (README.md of this folder). A 150-step row takes 25-35 min here, the table about 15 h of
# one core: run it in several sittings (LOG keeps what is done) or on a GPU.
set -u
cd "$(dirname "$0")/../../../.."
SEEDS=${1:-"0 1 2"}
ROWS=${2:-"zero_shot lora jactus_0.8 dora compress_then_adapt_0.8 jactus_0.8_targets compress_then_adapt_0.8_targets tunecomp_0.8 jactus_0.8_kd taco_0.8 taco_0.8_bytes jactus_0.8_shared jactus_0.8_pool"}
export LOG=${LOG:-logs/offline_llama_seeds3}
export COMMON="experiment=offline_llama logger=csv trainer.enable_checkpointing=false evaluate_before=false \
data.module.test_per_task=150 data.module.val_per_task=20 trainer.max_steps=150 ${EXTRA:-}"
for seed in $SEEDS; do
  for row in $ROWS; do
    # the JACTUS rows that ran before gate/up sharing became the experiment's default keep per-layer bases
    case $row in jactus_0.8|jactus_0.8_targets|jactus_0.8_kd) pin=jactus_share_bases=false ;; *) pin= ;; esac
    case $row in
      *_targets) echo "${row}_s$seed variant=${row%_targets} budget.scope=targets seed=$seed $pin" ;;
      *_bytes) echo "${row}_s$seed variant=${row%_bytes} budget.unit=bytes seed=$seed" ;;
      *) echo "${row}_s$seed variant=$row seed=$seed $pin" ;;
    esac
  done
done | experiments/results/run_jobs.sh
