#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool): build the extension against that
# machine's torch (never a wheel built here), the CUDA tests, `pssr bench-kernels`, and a short
# GPU training check of each trainer. Everything it writes goes to $OUT (the device tool brings
# it back). torchattacks and ART, if missing there, travel as wheels in .whl/ (see the device
# tool's README); the kernel tests and bench need neither.
#   run: bash scripts/gpu-check.sh        (timeout_s ~ 540; budget ~6 min of device time)
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"; mkdir -p "$OUT"
DATA="${DATA_ROOT:-shared/data}"   # ../shared does not travel: carry a small copy under shared/ if needed
log() { echo "== $* ==" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
[ -d .whl ] && python -m pip install -q --no-deps .whl/*.whl
log build
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -c "import torch, pssr.ops; x = torch.rand(2, 3, 8, 8, device='cuda'); print('pixel_surgery on cuda:', pssr.ops.pixel_surgery(x, x)[1].sum().item())"
log cuda-tests
timeout 240 python -m pytest -q -m cuda tests/test_ops.py tests/test_bench.py 2>&1 | tee "$OUT/cuda-tests.txt" | tail -5
log bench-kernels
timeout 180 pssr bench-kernels --device cuda --dtype float32 --json "$OUT/bench-cuda.json" 2>&1 | tee "$OUT/bench.txt" | tail -30
if [ -d "$DATA/cifar10" ]; then
  log train-classifier-gpu
  timeout 120 pssr train-classifier cifar10-robust --device cuda --data-root "$DATA" --out "$OUT/cls" -q \
    --set data.train_limit=5000 --set data.test_limit=1000 --set train.epochs=1 --set adversarial.watch_every=10 \
    2>&1 | tee "$OUT/train-classifier.txt" | tail -3
fi
log done
