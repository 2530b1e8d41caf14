#!/usr/bin/env bash
# Issue 19 item 3 at CPU scale: JACTUS@0.8 settings on SmolLM2-135M / commonsense8, chosen on the validation split
# (20 items a task, 160 questions; test=false, so no test item is scored), 50 steps of batch 8, seeds 0 and 1.
# The split is the item-4 table's (150 test items a task first, then the 20 validation items, then 64 training
# items), so the settings chosen here are never tuned on that table's test items. evaluate_before=true also scores
# the compressed model before fine-tuning. calib.stats_cache: the runs of one seed that differ only after
# calibration (rho, distillation, lr) share one calibration per calibration size.
# Two jobs at a time, one thread each, resumable (experiments/results/run_jobs.sh):
#   experiments/results/offline_llama/validation/run.sh [STAGE]     # grid (default) | followup | item5 | layer_damage
#     | core_dropout | taco | tunecomp | shared | curves | pool | measured | text | sparse | sparse_residual | damping
# item5 (issue 19 item 5): LoRA (r 16, alpha 32: the lora row's adapter) on the targets the plan keeps dense; LoRA
# itself on this protocol (the reference); JACTUS at budgets 0.9 and 0.95 (how much of the gap is the compression
# itself); the cores at half the rate over the table's 150 steps (the 150-step run fits its training batches better
# than LoRA but is worse on validation).
# core_dropout (item 5): the table's 150 steps with dropout 0.1 on the cores' change (method.core_dropout), against
# the table's own seed-0/1 JACTUS runs' validation (the 150-step runs fit the training batches better than LoRA).
# taco (item 5): TACO@0.8 on this protocol, with its start scored (evaluate_before): does the table's TACO row lead
# JACTUS because it starts closer to the dense model, or because its 79M trainable weights adapt further?
# tunecomp (item 4's rates): TuneComp@0.8 at the table's 2e-4 and at 1e-3 (seed 0): is its row's loss its rate?
# Every stage pins jactus_share_bases=false (per-layer bases, as these runs had before gate/up sharing became the
# experiment's default); the shared stage asks for sharing explicitly.
# shared (issue 27 item 1): gate/up sharing one input basis (method.share_bases=[gate_proj,up_proj]) at 0.8, 0.9 and
# 0.6, and plain JACTUS at 0.6 beside it (plain 0.8 and 0.9 are the grid's r0_c512 and item5's b0.9 runs).
# curves (issue 28 item 3): JACTUS (the experiment's defaults: gate/up sharing; 0.6, 0.8 and 0.9 are the shared stage's
# runs), compress-then-adapt (the table's SVD-LLM + LoRA) and TACO at budgets 0.5-0.95 of the deployed bytes, and DoRA
# at 1.0 beside the item5 stage's LoRA. TACO's budget counts bytes (its CSR indices make it the stricter unit); the
# low-rank methods' counts parameters, which for them is the same thing (every factor is stored in the backbone's
# dtype: the runs' bytes_ratio equals their params_ratio), so their rows keep the labels of the earlier runs.
# pool (issue 27 item 3): JACTUS@0.8 (gate/up sharing) calibrated on 2048 items instead of 512: the 512 training items,
# then each task's items outside every split in turn (data.module.calib_source=pool; no test or validation item).
# measured (issue 27 item 2): JACTUS@0.8 (gate/up sharing) with measured gains: the last 4 of the 64 calibration
# batches (32 items) held out, each unit scored alone at its planned rank and 32 ranks more
# (method.measure_batches=4; about 180 units x 8 held-out forwards, an hour at one thread beside other jobs).
# text (issue 27 item 3): JACTUS@0.8 (gate/up sharing) with 512 generic-text passages (BoolQ's Wikipedia paragraphs of
# no split) added to the input covariances beside the 512 task items (data.module.calib_text=512).
# sparse (issue 27 item 2): the 0.8 budget in bytes split between rank and a sparse share (5% and 10%: each non-zero
# pays its value and an int32 position), gate/up sharing; against sbmlp_r0_c512 (no share). The share starts at zero,
# so only the trained NLL tells whether it keeps more per byte than rank.
# sparse_residual (issue 27 item 2): the same split at 10%, the share started at the residual W - U C V^T on the support
# of the largest F * R^2 (method.sparse_init=residual), so the start itself tells whether it keeps more per byte.
# damping (issue 27): no training; the gate/up-shared 0.8 start (the shared stage's plan) at calib.damping 1e-1, 1e-3 and
# 1e-4 instead of 1e-2, scored by layer_damage.py +restore_kinds=false (results in start_probe/sbmlp08_damp*.json).
# layer_damage (item 5): no training; the seed-0/1 JACTUS@0.8 start with each kind of target restored dense
# (layer_damage.py), and the allocation tilted by seed 0's measured/proxy ratios (+kind_scale), on seeds 1 and 0.
set -u
cd "$(dirname "$0")/../../../.."
case ${1:-} in layer_damage|damping)  # no training: layer_damage.py scores the compressed start
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  C="experiment=offline_llama variant=jactus_0.8 data.module.test_per_task=150 data.module.val_per_task=20 \
calib.stats_cache=logs/stats_cache logger=none hydra.mode=RUN"
  DAMAGE="${PYTHON:-.venv/bin/python} experiments/results/offline_llama/validation/layer_damage.py"
  OUT=experiments/results/offline_llama/validation
  if [ "$1" = layer_damage ]; then
    C="$C jactus_share_bases=false"
    S='+kind_scale={gate_proj: 1.4, up_proj: 1.3, down_proj: 0.7, o_proj: 0.25, q_proj: 0.3, k_proj: 0.2}'
    for seed in 0 1; do $DAMAGE $C seed=$seed hydra.run.dir=logs/layer_damage/s$seed; done
    for seed in 1 0; do $DAMAGE $C seed=$seed "$S" +restore_kinds=false hydra.run.dir=logs/layer_damage/s${seed}_scaled; done
    mkdir -p $OUT/layer_damage
    for run in s0 s1 s1_scaled s0_scaled; do cp logs/layer_damage/$run/layer_damage.json $OUT/layer_damage/$run.json; done
  else
    mkdir -p $OUT/start_probe
    for run in 0.1_s0 0.001_s0 0.0001_s0 0.001_s1 0.1_s1; do
      $DAMAGE $C seed=${run#*_s} 'method.share_bases=[gate_proj,up_proj]' method.damping=${run%_s*} \
        +restore_kinds=false hydra.run.dir=logs/probe/damp$run
      cp logs/probe/damp$run/layer_damage.json $OUT/start_probe/sbmlp08_damp$run.json
    done
  fi
  exit 0 ;;
esac
export LOG=${LOG:-logs/val3}
export COMMON="experiment=offline_llama logger=csv trainer.enable_checkpointing=false data.module.test_per_task=150 \
data.module.val_per_task=20 trainer.max_steps=50 test=false evaluate_before=true variant=jactus_0.8 \
calib.stats_cache=logs/stats_cache jactus_share_bases=false"
case ${1:-grid} in
  grid) cat <<'JOBS' ;;
r0.25_c128_s0 method.rho=0.25 calib.num_samples=128 seed=0
r0.25_c512_s0 method.rho=0.25 calib.num_samples=512 seed=0
r0_c128_s0 method.rho=0.0 calib.num_samples=128 seed=0
r0.25_c128_s1 method.rho=0.25 calib.num_samples=128 seed=1
r0.25_c512_s1 method.rho=0.25 calib.num_samples=512 seed=1
r0_c128_s1 method.rho=0.0 calib.num_samples=128 seed=1
r0_c512_s0 method.rho=0.0 calib.num_samples=512 seed=0
r0_c512_s1 method.rho=0.0 calib.num_samples=512 seed=1
r0.1_c128_s0 method.rho=0.1 calib.num_samples=128 seed=0
r0.1_c128_s1 method.rho=0.1 calib.num_samples=128 seed=1
seq_r0.25_c128_s0 method.rho=0.25 calib.num_samples=128 calib.loss=sequence seed=0
seq_r0.25_c128_s1 method.rho=0.25 calib.num_samples=128 calib.loss=sequence seed=1
JOBS
  followup) cat <<'JOBS' ;;
kd0.5_r0_c512_s0 method.rho=0.0 calib.num_samples=512 distill.weight=0.5 seed=0
kd0.5_r0_c512_s1 method.rho=0.0 calib.num_samples=512 distill.weight=0.5 seed=1
kd1_r0_c512_s0 method.rho=0.0 calib.num_samples=512 distill.weight=1.0 seed=0
kd1_r0_c512_s1 method.rho=0.0 calib.num_samples=512 distill.weight=1.0 seed=1
lr1e-3_r0_c512_s0 method.rho=0.0 calib.num_samples=512 optim.lr=1e-3 seed=0
lr1e-3_r0_c512_s1 method.rho=0.0 calib.num_samples=512 optim.lr=1e-3 seed=1
lr2.5e-4_r0_c512_s0 method.rho=0.0 calib.num_samples=512 optim.lr=2.5e-4 seed=0
lr2.5e-4_r0_c512_s1 method.rho=0.0 calib.num_samples=512 optim.lr=2.5e-4 seed=1
JOBS
  item5) cat <<'JOBS' ;;
da16_r0_c512_s0 method.rho=0.0 calib.num_samples=512 method.dense_adapter_r=16 method.dense_adapter_alpha=32 seed=0
da16_r0_c512_s1 method.rho=0.0 calib.num_samples=512 method.dense_adapter_r=16 method.dense_adapter_alpha=32 seed=1
lora_s0 variant=lora seed=0
lora_s1 variant=lora seed=1
b0.95_r0_c512_s0 method.rho=0.0 calib.num_samples=512 budget.ratio=0.95 seed=0
lr2.5e-4_150steps_r0_c512_s0 method.rho=0.0 calib.num_samples=512 optim.lr=2.5e-4 trainer.max_steps=150 seed=0
b0.95_r0_c512_s1 method.rho=0.0 calib.num_samples=512 budget.ratio=0.95 seed=1
b0.9_r0_c512_s0 method.rho=0.0 calib.num_samples=512 budget.ratio=0.9 seed=0
b0.9_r0_c512_s1 method.rho=0.0 calib.num_samples=512 budget.ratio=0.9 seed=1
JOBS
  core_dropout) cat <<'JOBS' ;;
cd0.1_150steps_s0 method.core_dropout=0.1 trainer.max_steps=150 seed=0
cd0.1_150steps_s1 method.core_dropout=0.1 trainer.max_steps=150 seed=1
JOBS
  taco) cat <<'JOBS' ;;
taco0.8_s0 variant=taco_0.8 seed=0
taco0.8_s1 variant=taco_0.8 seed=1
JOBS
  tunecomp) cat <<'JOBS' ;;
tunecomp0.8_lr2e-4_s0 variant=tunecomp_0.8 optim.lr=2e-4 seed=0
tunecomp0.8_lr1e-3_s0 variant=tunecomp_0.8 optim.lr=1e-3 seed=0
JOBS
  shared) cat <<'JOBS' ;;
sbmlp_r0_c512_s0 'method.share_bases=[gate_proj,up_proj]' seed=0
sbmlp_r0_c512_s1 'method.share_bases=[gate_proj,up_proj]' seed=1
sbmlp_b0.9_r0_c512_s0 'method.share_bases=[gate_proj,up_proj]' budget.ratio=0.9 seed=0
sbmlp_b0.9_r0_c512_s1 'method.share_bases=[gate_proj,up_proj]' budget.ratio=0.9 seed=1
b0.6_r0_c512_s0 budget.ratio=0.6 seed=0
sbmlp_b0.6_r0_c512_s0 'method.share_bases=[gate_proj,up_proj]' budget.ratio=0.6 seed=0
b0.6_r0_c512_s1 budget.ratio=0.6 seed=1
sbmlp_b0.6_r0_c512_s1 'method.share_bases=[gate_proj,up_proj]' budget.ratio=0.6 seed=1
JOBS
  curves)  # issue 28 item 3: every compressing method at budgets 0.5-0.95 in deployed bytes, DoRA beside LoRA at 1.0
    # one TACO run (about 20 min) beside the shorter low-rank runs, interleaved so both slots stay busy
    short=() taco=()
    for b in 0.8 0.5 0.6 0.9 0.95 0.7; do for seed in 0 1; do
      short+=("cta_b${b}_s$seed variant=compress_then_adapt_0.8 budget.ratio=$b seed=$seed")
      [ -d experiments/results/offline_llama/validation/runs/sbmlp_b${b}_r0_c512_s$seed ] || [ $b = 0.8 ] ||
        short+=("sbmlp_b${b}_r0_c512_s$seed 'method.share_bases=[gate_proj,up_proj]' budget.ratio=$b seed=$seed")
    done; done
    short+=("dora_s0 variant=dora seed=0" "dora_s1 variant=dora seed=1")
    for b in 0.8 0.6 0.9 0.5 0.95 0.7; do for seed in 0 1; do
      taco+=("taco_bytes_b${b}_s$seed variant=taco_0.8 budget.ratio=$b budget.unit=bytes seed=$seed")
    done; done
    for i in "${!short[@]}"; do echo "${short[$i]}"; [ -z "${taco[$((i / 2))]:-}" ] || [ $((i % 2)) = 1 ] || echo "${taco[$((i / 2))]}"; done
    for t in "${taco[@]:$(( (${#short[@]} + 1) / 2 ))}"; do echo "$t"; done ;;
  pool) cat <<'JOBS' ;;
sbmlp_pool2048_s0 'method.share_bases=[gate_proj,up_proj]' calib.num_samples=2048 data.module.calib_source=pool seed=0
sbmlp_pool2048_s1 'method.share_bases=[gate_proj,up_proj]' calib.num_samples=2048 data.module.calib_source=pool seed=1
JOBS
  measured) cat <<'JOBS' ;;
sbmlp_meas4_s0 'method.share_bases=[gate_proj,up_proj]' method.measure_batches=4 seed=0
sbmlp_meas4_s1 'method.share_bases=[gate_proj,up_proj]' method.measure_batches=4 seed=1
JOBS
  text) cat <<'JOBS' ;;
sbmlp_text512_s0 'method.share_bases=[gate_proj,up_proj]' data.module.calib_text=512 seed=0
sbmlp_text512_s1 'method.share_bases=[gate_proj,up_proj]' data.module.calib_text=512 seed=1
JOBS
  sparse_residual) cat <<'JOBS' ;;
sbmlp_sparse0.1res_bytes_s0 'method.share_bases=[gate_proj,up_proj]' method.sparse_share=0.1 method.sparse_init=residual budget.unit=bytes seed=0
sbmlp_sparse0.1res_bytes_s1 'method.share_bases=[gate_proj,up_proj]' method.sparse_share=0.1 method.sparse_init=residual budget.unit=bytes seed=1
JOBS
  sparse)
    for share in 0.05 0.1; do for seed in 0 1; do
      echo "sbmlp_sparse${share}_bytes_s$seed 'method.share_bases=[gate_proj,up_proj]' method.sparse_share=$share budget.unit=bytes seed=$seed"
    done; done ;;
  *) echo "unknown stage ${1}: expected grid, followup, item5, core_dropout, taco, tunecomp, shared, curves, pool, measured, text, sparse, sparse_residual, layer_damage or damping" >&2
     exit 2 ;;
esac | experiments/results/run_jobs.sh
