#!/usr/bin/env bash
# Trains the zoo's default classifiers with the shipped presets (seed 0), resumably: rerun this
# script after an interruption and each run continues from its last checkpoint.
#   DATA_ROOT=../shared/data bash scripts/train-classifiers.sh
set -euo pipefail
DATA_ROOT="${DATA_ROOT:-../shared/data}"
for preset in mnist cifar10; do
  out="runs/classifier-$preset"
  if [ -f "$out/classifier.safetensors" ]; then echo "$preset: done ($out/classifier.safetensors)"; continue; fi
  resume=(); [ -f "$out/state.safetensors" ] && resume=(--resume)
  pssr train-classifier "$preset" --data-root "$DATA_ROOT" --out "$out" "${resume[@]}"
done
