#!/usr/bin/env bash
# The runs behind the defaults model.query_std and selection.distinct: each benchmark trained
# with our default and with the alternatives, one run after another, nothing else running.
# Usage: bash benchmarks/defaults/run.sh WORKDIR [bags|mnist|cohort|needles ...]  (repo root)
set -euo pipefail
work=${1:?usage: run.sh WORKDIR [benchmark ...]}
shift
benchmarks=${*:-bags mnist cohort needles}
ips=${IPS:-.venv/bin/ips}
here=$(dirname "$0")
mkdir -p "$work"

train() {  # NAME CONFIG DATA EXTRA_SETS...: train, then evaluate last.pt on the test split
    local name=$1 config=$2 data=$3
    shift 3
    if grep -q "\"name\": \"$name\"" "$here/results.jsonl" 2>/dev/null; then
        return  # measured already (the script continues where it stopped)
    fi
    local sets=()
    for s in "$@"; do sets+=(--set "$s"); done
    rm -rf "$work/$name"
    local start=$SECONDS
    IPS_CACHE_DIR="$work/cache" $ips train -q --config "$config" --set data.path="$data" \
        "${sets[@]}" --out "$work/$name" --no-progress
    local seconds=$((SECONDS - start))
    IPS_CACHE_DIR="$work/cache" $ips eval -q --checkpoint "$work/$name/last.pt" --split test \
        --json --no-progress --out "$work/$name/test_last.json" > /dev/null
    .venv/bin/python "$here/summarize.py" "$work/$name" --name "$name" --seconds "$seconds" \
        --sets "$*" >> "$here/results.jsonl"
}

for b in $benchmarks; do
    case $b in
    bags)  # 400 train (40 of them validation) / 200 test bags, two seeds
        [ -f "$work/bags/labels.csv" ] || .venv/bin/python "$here/make_bags.py" \
            --out "$work/bags" --seed 0 --train 400 --test 200
        for seed in 0 1; do
            for q in 0.02 0.1 0.3 1.0; do
                train "bags_q${q}_s$seed" "$here/bags.yaml" "$work/bags" \
                    model.query_std=$q train.seed=$seed
            done
            train "bags_nodistinct_s$seed" "$here/bags.yaml" "$work/bags" \
                selection.distinct=false train.seed=$seed
        done
        ;;
    mnist)  # benchmarks/megapixel_mnist_cpu.md's data and config (500 x 500, 10 epochs)
        [ -f "$work/mm500.npz" ] || $ips make-mnist --out "$work/mm500.npz" \
            --mnist "${IPS_MNIST:-../shared/data/mnist.npz}" --train 5000 --test 1000 \
            --canvas 500 --noise 6 --seed 0
        for q in 0.02 0.3 1.0; do
            train "mnist_q$q" megapixel_mnist_cpu "$work/mm500.npz" model.query_std=$q
        done
        train mnist_nodistinct megapixel_mnist_cpu "$work/mm500.npz" selection.distinct=false
        ;;
    cohort)  # benchmarks/own_data.md's cohort and config (160 slides of 8192^2, 10 epochs)
        [ -f "$work/cohort8k/labels.csv" ] || $ips make-cohort --out "$work/cohort8k" \
            --slides 160 --size 8192 --seed 0
        for q in 0.02 0.3 1.0; do
            train "cohort_q$q" slides_cpu "$work/cohort8k/labels.csv" model.query_std=$q
        done
        train cohort_nodistinct slides_cpu "$work/cohort8k/labels.csv" selection.distinct=false
        ;;
    needles)  # benchmarks/defaults/make_needles.py: 216 train / 24 val / 120 test photos
        [ -f "$work/needles/labels.csv" ] || .venv/bin/python "$here/make_needles.py" \
            --out "$work/needles" --seed 0
        for q in 0.02 0.3 1.0; do
            train "needles_q$q" "$here/needles.yaml" "$work/needles/labels.csv" model.query_std=$q
        done
        ;;
    *) echo "unknown benchmark $b" >&2; exit 2 ;;
    esac
done
