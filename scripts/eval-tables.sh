#!/usr/bin/env bash
# The README's robustness tables: every defense (baselines and PSSR) under every attack and
# threat model, on the shipped classifier of a data set. One `pssr eval` per defense, so that a
# stopped session loses one defense's run, not the table (a finished defense is skipped); then
# scripts/merge_eval.py joins them (a defense's worst case only involves its own runs, and the
# oblivious attacks are seeded by name, so every run makes the same ones).
#   DATA_ROOT=../shared/data bash scripts/eval-tables.sh mnist
# Env: LIMIT (1000), LIMIT_EXPENSIVE (200), SEED (0), DEFENSES and ATTACKS (space-separated).
set -euo pipefail
dataset="${1:-mnist}"
DATA_ROOT="${DATA_ROOT:-../shared/data}"
LIMIT="${LIMIT:-1000}"
LIMIT_EXPENSIVE="${LIMIT_EXPENSIVE:-200}"
SEED="${SEED:-0}"
DEFENSES="${DEFENSES:-none jpeg bit-depth:bits=4 bit-depth:bits=1 median tvm pssr}"
if [ "$dataset" = mnist ]; then
  ATTACKS="${ATTACKS:-fgsm pgd mifgsm cw deepfool autoattack square}"
else
  ATTACKS="${ATTACKS:-fgsm pgd pgd100 pgd-l2 mifgsm cw deepfool autoattack square}"
fi
out="results/$dataset"
mkdir -p "$out"
attack_args=(); for a in $ATTACKS; do attack_args+=(--attack "$a"); done
for d in $DEFENSES; do
  json="$out/$(echo "$d" | tr ':=,' '___').json"
  [ -f "$json" ] && { echo "$d: done ($json)"; continue; }
  echo "$d: evaluating" >&2
  pssr eval --classifier "pssr/weights/classifier-$dataset.safetensors" --data-root "$DATA_ROOT" \
    --defense "$d" "${attack_args[@]}" --limit "$LIMIT" --limit-expensive "$LIMIT_EXPENSIVE" \
    --seed "$SEED" -q --json "$json" > /dev/null
done
python scripts/merge_eval.py "$out"/*.json --json "results/$dataset.json" --markdown "results/$dataset.md" \
  --plot "results/$dataset.png"
