#!/usr/bin/env bash
# Trains the zoo's default classifiers with the shipped presets (seed 0), resumably: rerun this
# script after an interruption and each run continues from its last checkpoint. Runs live in
# training-runs/ (tracked, so that an unfinished run survives into the next session's checkout);
# a finished classifier is copied to pssr/weights/ (shipped with the package).
#   DATA_ROOT=../shared/data bash scripts/train-classifiers.sh
set -euo pipefail
DATA_ROOT="${DATA_ROOT:-../shared/data}"
for preset in mnist cifar10; do
  out="training-runs/classifier-$preset"
  shipped="pssr/weights/classifier-$preset.safetensors"
  if [ -f "$shipped" ]; then echo "$preset: done ($shipped)"; continue; fi
  resume=(); [ -f "$out/state.safetensors" ] && resume=(--resume)
  pssr train-classifier "$preset" --data-root "$DATA_ROOT" --out "$out" "${resume[@]}"
  cp "$out/classifier.safetensors" "$shipped"
done
