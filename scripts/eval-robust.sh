#!/usr/bin/env bash
# The robust classifiers alone (issue 15): every attack of the harness, the ε curve, and the
# sanity checks of Carlini et al. 2019 (an unbounded-ε PGD must reach 0%; PGD-100 <= PGD-20;
# robust accuracy falls with ε — the report warns where it does not; Square near or above the
# gradient attacks). For a classifier alone, oblivious and adaptive attacks coincide: there is
# no defense to adapt to. Resumable: rerun after an interruption and finished runs are skipped.
#   DATA_ROOT=../shared/data bash scripts/eval-robust.sh mnist
# Env: LIMIT (1000), LIMIT_EXPENSIVE (500: AutoAttack and Square), SEED (0), CLASSIFIER
# (default pssr/weights/classifier-<dataset>-robust.safetensors), OUT (results/<dataset>-robust).
set -euo pipefail
dataset="${1:-mnist}"
DATA_ROOT="${DATA_ROOT:-../shared/data}"
LIMIT="${LIMIT:-1000}"
LIMIT_EXPENSIVE="${LIMIT_EXPENSIVE:-500}"
SEED="${SEED:-0}"
CLASSIFIER="${CLASSIFIER:-pssr/weights/classifier-$dataset-robust.safetensors}"
OUT="${OUT:-results/$dataset-robust}"
if [ "$dataset" = mnist ]; then
  attacks=(fgsm pgd pgd100 pgd-l2 mifgsm cw deepfool "square:n_queries=1000" autoattack
           pgd:eps=0.1 pgd:eps=0.2 pgd:eps=0.4 pgd:eps=1)
  fold=()
else
  attacks=(fgsm pgd pgd100 pgd-l2 mifgsm cw deepfool "square:n_queries=1000" autoattack
           pgd:eps=2/255 pgd:eps=4/255 pgd:eps=12/255 pgd:eps=16/255 pgd:eps=1)
  fold=(--fold-batchnorm)
fi
attack_args=(); for a in "${attacks[@]}"; do attack_args+=(--attack "$a"); done
mkdir -p "$OUT" docs/figures
pssr eval --classifier "$CLASSIFIER" --data-root "$DATA_ROOT" --defense none "${attack_args[@]}" \
  --limit "$LIMIT" --limit-expensive "$LIMIT_EXPENSIVE" --seed "$SEED" "${fold[@]}" \
  --state "$OUT/state.safetensors" -q --json "$OUT/report.json" --markdown "$OUT/report.md" \
  --eps-curve "docs/figures/$dataset-robust-eps-curve.png"
