#!/usr/bin/env bash
# Every GPU check of attnzoo in one call on a lent H200 (see BENCHMARKS.md), about 8 minutes:
#   1. the gpt2-small training step (GQA plan) beside the anchors' plain-JAX GPT-2 step: tokens/s and MFU;
#   2. the kernel benchmark: flash attention and decode against cuDNN, XLA, JAX's Pallas ops and tokamax, and the
#      block-sparse kernel against dense cuDNN / Triton at 16k-64k (110 s of the kernel budget, --block-sparse-s).
# Results land in $OUT (bench_train.json, bench_kernels.json, logs). `SMOKE=1` runs both on a CPU in tiny shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/attnzoo_gpu_checks}"; mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then   # tokamax and its dependencies, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
smoke=(); [ -n "${SMOKE:-}" ] && smoke=(--smoke)
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null
timeout 150 python3 experiments/bench_train.py "${smoke[@]}" --out "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log"
timeout 400 python3 experiments/bench_kernels.py "${smoke[@]}" --budget-s 330 --out "$OUT/bench_kernels.json" 2>&1 \
  | tee "$OUT/bench_kernels.log"
