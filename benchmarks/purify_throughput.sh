#!/usr/bin/env bash
# Purify throughput on this machine: the first 100 CIFAR-10 test images of each class (1,000
# 32x32 PNGs, made by examples/make_image_folder.py) through the shipped CIFAR-10 purifier,
# with the per-stage profile. Run it on a quiet machine: timings shared with other jobs mean little.
#   DATA_ROOT=../shared/data bash benchmarks/purify_throughput.sh
set -euo pipefail
DATA_ROOT="${DATA_ROOT:-../shared/data}"
THREADS="${THREADS:-2}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python examples/make_image_folder.py "$DATA_ROOT" "$work/data" --dataset cifar10 --per-class 1 --test-per-class 100 > /dev/null
OMP_NUM_THREADS="$THREADS" pssr purify "$work/data/test" "$work/out" --model cifar10 --batch-size 256 --profile -q
