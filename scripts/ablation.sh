#!/usr/bin/env bash
# The loss ablation behind the purifier presets: each loss term off in turn, same budget, same
# seed, then the same evaluation. Resumable (a finished arm is skipped, a stopped one resumed).
#   DATA_ROOT=../shared/data STEPS=100 LIMIT=500 bash scripts/ablation.sh mnist
# Writes $ROOT/<arm>/{purifier.safetensors,log.jsonl,eval.json} (ROOT defaults to
# training-runs/ablation-<preset>, tracked so that an unfinished ablation survives into the next
# session) and prints the table (python scripts/ablation_table.py $ROOT).
# SETS: extra space-separated key=value overrides for every arm, e.g. SETS="data.train_limit=10000"
# (DESIGN §9: ablations may run on a stated subset with the same budget per arm).
set -euo pipefail
preset="${1:-mnist}"
DATA_ROOT="${DATA_ROOT:-../shared/data}"
STEPS="${STEPS:-100}"     # training steps per arm (batch 128 as in the preset)
LIMIT="${LIMIT:-500}"     # test images per evaluation
SEED="${SEED:-0}"
SETS="${SETS:-}"
root="${ROOT:-training-runs/ablation-$preset}"
declare -A arms=(
  [full]=""
  [no-pixel]="loss.pixel=0"
  [no-semantic]="loss.semantic=0"
  [no-feature]="loss.feature_beta=0"
  [no-rdrop]="loss.rdrop=0"
  [no-clean-path]="loss.clean_path=false"
)
for arm in full no-pixel no-semantic no-feature no-rdrop no-clean-path; do
  out="$root/$arm"
  sets=(--set "train.max_steps=$STEPS" --set "train.seed=$SEED" --set train.eval_every=0)
  for kv in $SETS; do sets+=(--set "$kv"); done
  [ -n "${arms[$arm]}" ] && sets+=(--set "${arms[$arm]}")
  if [ ! -f "$out/purifier.safetensors" ]; then
    resume=(); [ -f "$out/state.safetensors" ] && resume=(--resume)
    # every arm attacks the same images with the same seed: share one attack cache (a hard link;
    # pssr train checks its key and makes its own if it does not match)
    mkdir -p "$out"
    for cache in "training-runs/purifier-$preset/attack-cache.safetensors" "$root/full/attack-cache.safetensors"; do
      if [ ! -f "$out/attack-cache.safetensors" ] && [ -f "$cache" ]; then ln -f "$cache" "$out/" 2>/dev/null || true; fi
    done
    pssr train "$preset" --data-root "$DATA_ROOT" --out "$out" -q "${sets[@]}" "${resume[@]}"
  fi
  if [ ! -f "$out/eval.json" ]; then
    pssr eval --classifier "pssr/weights/classifier-$preset.safetensors" --data-root "$DATA_ROOT" \
      --defense "pssr:path=$out/purifier.safetensors" --attack pgd --threat oblivious --threat bpda \
      --threat mask-fixed --limit "$LIMIT" --seed "$SEED" -q --json "$out/eval.json" > /dev/null
  fi
done
python scripts/ablation_table.py "$root"
