#!/usr/bin/env bash
# The robustness tables of docs/results.md (summed up in the README's table): every defense
# (baselines and PSSR) under every attack and threat model, on the shipped classifier of a data
# set. Two `pssr eval` runs, each resumable with --state (rerun this script after an
# interruption: finished attack runs are skipped):
# the baselines together (the oblivious attacks on the undefended classifier are made once for
# all of them), then PSSR where a purifier for the data set ships. scripts/merge_eval.py joins
# them (a defense's worst case only involves its own runs, and the oblivious attacks are seeded
# by name, so both runs make the same ones).
#   DATA_ROOT=../shared/data bash scripts/eval-tables.sh mnist
# The tvm baseline: ART's TotalVarMin defaults leave ~25-35% clean accuracy (a baseline nobody would
# deploy), so each data set also gets the strongest setting that keeps clean accuracy within a point
# on training images (python scripts/tune_tvm.py --dataset D). MNIST's baselines run was made with
# the defaults before that, so its tuned tvm is a run of its own (TUNED_TVM); CIFAR-10's baselines
# use the tuned one directly, and leave out 1-bit squeezing (it destroys colour images).
# Env: LIMIT (1000), LIMIT_EXPENSIVE (200), SEED (0), BASELINES, TUNED_TVM and ATTACKS (space-separated),
# FOLD_BN (1: pssr eval --fold-batchnorm, ~1.6x faster; 0 for MNIST, whose resumable states were
# started without it and stay valid only without it).
set -euo pipefail
dataset="${1:-mnist}"
DATA_ROOT="${DATA_ROOT:-../shared/data}"
LIMIT="${LIMIT:-1000}"
LIMIT_EXPENSIVE="${LIMIT_EXPENSIVE:-200}"
SEED="${SEED:-0}"
if [ "$dataset" = mnist ]; then
  BASELINES="${BASELINES:-none jpeg bit-depth:bits=4 bit-depth:bits=1 median tvm}"
  TUNED_TVM="${TUNED_TVM-tvm:prob=0.7,lamb=0.1}"
  ATTACKS="${ATTACKS:-fgsm pgd mifgsm cw deepfool autoattack square}"
  FOLD_BN="${FOLD_BN:-0}"
else
  BASELINES="${BASELINES:-none jpeg bit-depth:bits=4 median tvm:prob=0.7,lamb=0.05}"
  TUNED_TVM="${TUNED_TVM-}"
  ATTACKS="${ATTACKS:-fgsm pgd pgd100 pgd-l2 mifgsm cw deepfool autoattack square}"
  FOLD_BN="${FOLD_BN:-1}"
fi
fold=(); [ "$FOLD_BN" = 1 ] && fold=(--fold-batchnorm)
out="results/$dataset"
mkdir -p "$out"
attack_args=(); for a in $ATTACKS; do attack_args+=(--attack "$a"); done

evaluate() {  # evaluate NAME DEFENSE...
  local name="$1"; shift
  local json="$out/$name.json" defense_args=()
  [ -f "$json" ] && { echo "$name: done ($json)" >&2; return; }
  for d in "$@"; do defense_args+=(--defense "$d"); done
  echo "$name: evaluating ($*)" >&2
  pssr eval --classifier "pssr/weights/classifier-$dataset.safetensors" --data-root "$DATA_ROOT" \
    "${defense_args[@]}" "${attack_args[@]}" --limit "$LIMIT" --limit-expensive "$LIMIT_EXPENSIVE" \
    --seed "$SEED" "${fold[@]}" --state "$out/$name.state.safetensors" -q --json "$json" > /dev/null
}

# shellcheck disable=SC2086
evaluate baselines $BASELINES
reports=("$out/baselines.json")
if [ -n "$TUNED_TVM" ]; then
  evaluate tvm-tuned "$TUNED_TVM"
  reports+=("$out/tvm-tuned.json")
fi
if [ -f "pssr/weights/purifier-$dataset.safetensors" ]; then
  evaluate pssr pssr
  reports+=("$out/pssr.json")
else
  echo "pssr: no pssr/weights/purifier-$dataset.safetensors yet; the table holds the baselines only" >&2
fi
python scripts/merge_eval.py "${reports[@]}" --json "results/$dataset.json" --markdown "results/$dataset.md" \
  --plot "results/$dataset.png"
