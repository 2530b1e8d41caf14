#!/usr/bin/env bash
# Budget curves of DINOv2-S on Fashion-MNIST (issue 28 item 3; the runs: ./run.sh, which copies them into runs/; TACO
# at 0.8 of the bytes, seeds 0 and 1, are the table's runs in ../table/runs/taco_bytes): one report per metric here
# (acc/, nll/): the table, the budget curves against LoRA (curves.csv: gaps with paired 95% intervals over the test
# images x 2 seeds, where each method meets LoRA, the best at each budget) and the figures against retained
# parameters, deployed bytes and measured latency (images_b8 of experiments/bench/out/infer_real_cpu.json,
# CPU-scale); and the compressed start's test accuracy before fine-tuning (start_acc/).
#   experiments/results/offline_vit/curves/report.sh
set -eu
cd "$(dirname "$0")/../../../.."
HERE=experiments/results/offline_vit/curves
shopt -s nullglob
dirs=("$HERE"/runs/*/ experiments/results/offline_vit/table/runs/taco_bytes/taco_0.8_bytes_s[01])
for metric in acc nll; do
  ${JACTUS_REPORT:-.venv/bin/jactus-report} "${dirs[@]}" --out "$HERE/$metric" --metric test/$metric --curves lora \
    --panels average --latency experiments/bench/out/infer_real_cpu.json --latency-measure images_b8
done
# the compressed start: every method's model before fine-tuning (LoRA and DoRA have none: they start dense)
${JACTUS_REPORT:-.venv/bin/jactus-report} "${dirs[@]}" --out "$HERE/start_acc" --metric test/acc --before \
  --panels average
