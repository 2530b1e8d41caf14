#!/usr/bin/env bash
# Budget curves of SmolLM2-135M on the validation protocol (issue 28 item 3; the runs: ../validation/run.sh curves,
# with JACTUS's 0.6/0.8/0.9 runs from its shared stage and LoRA from item5): copies the finished runs' summary.json,
# items.jsonl.gz and .hydra from LOG into ../validation/runs, then writes one report per metric here (acc/, nll/):
# the table, the budget curves against LoRA (curves.csv: gaps with paired 95% intervals over the 160 validation
# questions x 2 seeds, where each method meets LoRA, the best at each budget) and the figures against retained
# parameters, deployed bytes and measured latency (experiments/bench/out/infer_real_cpu.json, CPU-scale); and the
# compressed start's val NLL before fine-tuning (start_nll/).
#   experiments/results/offline_llama/curves/report.sh
set -eu
cd "$(dirname "$0")/../../../.."
LOG=${LOG:-logs/val3}
RUNS=experiments/results/offline_llama/validation/runs
for run in "$LOG"/cta_b*_s? "$LOG"/taco_bytes_b*_s? "$LOG"/sbmlp_b*_r0_c512_s? "$LOG"/dora_s? \
           "$LOG"/sbmlp_pool2048_s? "$LOG"/sbmlp_meas4_s?; do
  [ -f "$run/summary.json" ] && [ ! -f "$RUNS/$(basename "$run")/summary.json" ] || continue
  mkdir -p "$RUNS/$(basename "$run")"
  cp -r "$run/summary.json" "$run/items.jsonl.gz" "$run/.hydra" "$RUNS/$(basename "$run")/"
done
shopt -s nullglob
dirs=("$RUNS"/lora_s? "$RUNS"/dora_s? "$RUNS"/sbmlp_r0_c512_s? "$RUNS"/sbmlp_b*_r0_c512_s? "$RUNS"/cta_b*_s?
      "$RUNS"/taco_bytes_b*_s?)
for metric in acc nll; do
  ${JACTUS_REPORT:-.venv/bin/jactus-report} "${dirs[@]}" --out experiments/results/offline_llama/curves/$metric \
    --metric val/$metric --curves lora --panels average --latency experiments/bench/out/infer_real_cpu.json
done
# the compressed start: every method's model before fine-tuning (LoRA has none: it starts as the dense model)
${JACTUS_REPORT:-.venv/bin/jactus-report} "${dirs[@]}" --out experiments/results/offline_llama/curves/start_nll \
  --metric val/nll --before --panels average
