#!/usr/bin/env bash
# Issue 28 item 3 on DINOv2-S / Fashion-MNIST (CPU scale, the table's settings: experiment=offline_vit): JACTUS,
# compress-then-adapt and TACO at budgets 0.5-0.95 of the deployed bytes, seeds 0 and 1, and LoRA / DoRA at 1.0 as the
# reference lines, every run with its per-item results (items.jsonl.gz: the report's paired intervals). TACO's budget
# counts bytes (its CSR indices make it the stricter unit); the low-rank methods' counts parameters, which for them is
# the same (their bytes_ratio equals their params_ratio). TACO at 0.8 in bytes, seeds 0 and 1, are the table's runs
# (../table/runs/taco_bytes). Two jobs at a time, one thread each, resumable (experiments/results/run_jobs.sh); about
# four minutes a run (42 runs); the finished runs are copied into runs/ at the end. Then ./report.sh.
set -u
cd "$(dirname "$0")/../../../.."
export LOG=${LOG:-logs/vit_curves}
export COMMON="experiment=offline_vit data=fashion_mnist logger=csv trainer.enable_checkpointing=false"
{
  for seed in 0 1; do
    echo "lora_s$seed variant=lora seed=$seed"
    echo "dora_s$seed variant=dora seed=$seed"
  done
  for b in 0.8 0.6 0.9 0.5 0.95 0.7; do for seed in 0 1; do
    echo "jactus_b${b}_s$seed variant=jactus_0.8 budget.ratio=$b seed=$seed"
    echo "cta_b${b}_s$seed variant=compress_then_adapt_0.8 budget.ratio=$b seed=$seed"
    [ $b = 0.8 ] || echo "taco_bytes_b${b}_s$seed variant=taco_0.8 budget.ratio=$b budget.unit=bytes seed=$seed"
  done; done
  # JACTUS with LoRA r16 on the targets its plan keeps dense (merged at export: the deployed size is unchanged)
  for b in 0.95 0.9; do for seed in 0 1; do
    echo "jactus_da16_b${b}_s$seed variant=jactus_0.8 budget.ratio=$b +method_label=jactus+dense_lora" \
      "method.dense_adapter_r=16 method.dense_adapter_alpha=32 seed=$seed"
  done; done
} | experiments/results/run_jobs.sh
mkdir -p experiments/results/offline_vit/curves/runs
for run in "$LOG"/*/; do  # summary, per-item results and config of every finished run (no checkpoints, no logs)
  [ -f "$run/summary.json" ] || continue
  dest=experiments/results/offline_vit/curves/runs/$(basename "$run")
  mkdir -p "$dest" && cp "$run/summary.json" "$dest/" && cp -r "$run/.hydra" "$dest/"
  [ -f "$run/items.jsonl.gz" ] && cp "$run/items.jsonl.gz" "$dest/"
done
