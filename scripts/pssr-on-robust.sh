#!/usr/bin/env bash
# First look at PSSR on the robust classifier (issue 16): the robust classifier alone beside
# PSSR with the non-learned inpainting (pssr.inpainting, nothing to train, nothing to steer) at
# several α, under PGD (oblivious = transfer from f_R; bpda and mask-fixed = through the defense),
# the gradient-free Square, and the sparse and patch attacks (Sparse-RS: score-based, so through
# the defense by construction). Resumable (--state); rerun to finish.
#   DATA_ROOT=../shared/data bash scripts/pssr-on-robust.sh mnist
# Env: LIMIT (500), LIMIT_EXPENSIVE (100), ALPHAS ("1 2 4"), SEED (0).
set -euo pipefail
dataset="${1:-mnist}"
DATA_ROOT="${DATA_ROOT:-../shared/data}"
LIMIT="${LIMIT:-500}"
LIMIT_EXPENSIVE="${LIMIT_EXPENSIVE:-100}"
ALPHAS="${ALPHAS:-1 2 4}"
SEED="${SEED:-0}"
cls="pssr/weights/classifier-$dataset-robust.safetensors"
out="results/$dataset-robust"
mkdir -p "$out"
defenses=(--defense none)
for a in $ALPHAS; do
  p="$out/inpaint-a$a.safetensors"
  [ -f "$p" ] || python scripts/make_inpainting_purifier.py --classifier "$cls" --alpha "$a" --out "$p"
  defenses+=(--defense "pssr:path=$p")
done
pssr eval --classifier "$cls" --data-root "$DATA_ROOT" "${defenses[@]}" \
  --attack pgd --attack square:n_queries=1000 --attack sparse-rs --attack sparse-rs:eps=24 --attack sparse-rs-patch \
  --threat oblivious --threat bpda --threat mask-fixed --limit "$LIMIT" --limit-expensive "$LIMIT_EXPENSIVE" \
  --seed "$SEED" --state "$out/inpaint.state.safetensors" -q --json "$out/inpaint.json" --markdown "$out/inpaint.md"
