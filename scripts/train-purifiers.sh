#!/usr/bin/env bash
# Trains the shipped PSSR purifiers with the shipped presets (seed 0), resumably: rerun this
# script after an interruption and each run continues from its last checkpoint. Runs live in
# training-runs/ (tracked, so that an unfinished run survives into the next session's checkout);
# a finished purifier is copied to pssr/weights/ (shipped with the package). Needs the shipped
# classifiers (scripts/train-classifiers.sh). Extra arguments go to every `pssr train`, e.g.
#   DATA_ROOT=../shared/data bash scripts/train-purifiers.sh mnist
set -euo pipefail
DATA_ROOT="${DATA_ROOT:-../shared/data}"
presets=("$@"); [ ${#presets[@]} -eq 0 ] && presets=(mnist cifar10)
for preset in "${presets[@]}"; do
  out="training-runs/purifier-$preset"
  shipped="pssr/weights/purifier-$preset.safetensors"
  if [ -f "$shipped" ]; then echo "$preset: done ($shipped)"; continue; fi
  resume=(); [ -f "$out/state.safetensors" ] && resume=(--resume)
  pssr train "$preset" --data-root "$DATA_ROOT" --out "$out" "${resume[@]}"
  cp "$out/purifier.safetensors" "$shipped"
done
