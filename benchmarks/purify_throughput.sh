#!/usr/bin/env bash
# Purify throughput on this machine: the first PER_CLASS CIFAR-10 test images of each class
# (10 x PER_CLASS 32x32 PNGs, made by examples/make_image_folder.py) through the shipped CIFAR-10
# purifier, with the per-stage profile, RUNS times, then the median. The first batch of a run
# pays one-time set-up (oneDNN primitives), so small folders read lower than large ones;
# docs/purify.md ("Throughput") quotes PER_CLASS=100 (1,000 images) and PER_CLASS=400 (4,000).
# Run it on a quiet machine: timings shared with other jobs mean little.
#   DATA_ROOT=../shared/data PER_CLASS=400 RUNS=8 bash benchmarks/purify_throughput.sh
set -euo pipefail
DATA_ROOT="${DATA_ROOT:-../shared/data}"
THREADS="${THREADS:-2}"
PER_CLASS="${PER_CLASS:-100}"
RUNS="${RUNS:-1}"
BATCH="${BATCH:-256}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python examples/make_image_folder.py "$DATA_ROOT" "$work/data" --dataset cifar10 --per-class 1 \
  --test-per-class "$PER_CLASS" > /dev/null
for run in $(seq "$RUNS"); do
  rm -rf "$work/out"
  OMP_NUM_THREADS="$THREADS" pssr purify "$work/data/test" "$work/out" --model cifar10 --batch-size "$BATCH" \
    --profile -q 2>&1 | tee "$work/run$run.txt" | { [ "$RUNS" -eq 1 ] && cat || sed -n 1p; }
done
if [ "$RUNS" -gt 1 ]; then
  grep -h "images/s" "$work"/run*.txt | sed 's/.*= \([0-9.]*\) images.*/\1/' | sort -n \
    | awk '{v[NR]=$1} END {m = NR % 2 ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2;
             printf "%d runs: min %.1f, median %.1f, max %.1f images/s\n", NR, v[1], m, v[NR]}'
fi
