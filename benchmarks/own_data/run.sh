#!/usr/bin/env bash
# Own data, end to end on pixels from a table, on the CPU: accuracy on a generated slide cohort
# and the peak memory of training on 8k x 8k against 32k x 32k slides.
# Usage: bash benchmarks/own_data/run.sh WORKDIR   (from the repository root, .venv installed)
set -euo pipefail
work=${1:?usage: run.sh WORKDIR}
ips=${IPS:-.venv/bin/ips}
here=$(dirname "$0")
mkdir -p "$work"

# 1. accuracy: 160 slides of 8192 x 8192 (half with lesions), 100 train / 20 val / 40 test
[ -f "$work/cohort8k/labels.csv" ] || $ips make-cohort --out "$work/cohort8k" --slides 160 --size 8192 --seed 0
rm -rf "$work/run8k" "$work/cache8k"
IPS_CACHE_DIR="$work/cache8k" $ips train --config slides_cpu \
    --set data.path="$work/cohort8k/labels.csv" --out "$work/run8k" --no-progress
cp "$work/run8k/metrics.csv" "$here/metrics.csv"
for ckpt in best last; do
    IPS_CACHE_DIR="$work/cache8k" $ips eval --checkpoint "$work/run8k/$ckpt.pt" --split test \
        --json --no-progress --out "$here/test_$ckpt.json"
done
IPS_CACHE_DIR="$work/cache8k" $ips predict --checkpoint "$work/run8k/best.pt" \
    "$work/cohort8k/labels.csv" --split test --out "$work/predict8k" --no-progress
cp "$work/predict8k/metrics.json" "$here/predict_metrics.json"

# 2. memory: the same config for 5 epochs (10 steps) on 24 slides of 8192^2 and 24 slides of 32768^2
for size in 8192 32768; do
    [ -f "$work/cohort_$size/labels.csv" ] || $ips make-cohort --out "$work/cohort_$size" --slides 24 --size $size --seed 1
    rm -rf "$work/mem_$size" "$work/cache_$size"
    IPS_CACHE_DIR="$work/cache_$size" $ips train --config slides_cpu \
        --set data.path="$work/cohort_$size/labels.csv" --set train.epochs=5 \
        --out "$work/mem_$size" --no-progress
    cp "$work/mem_$size/metrics.csv" "$here/memory_$size.csv"
done
