#!/usr/bin/env bash
# Every GPU check of attnzoo in one call on a lent H200 (see BENCHMARKS.md), about 8 minutes (hard limits: 150 s +
# 425 s; give the run call timeout_s 600):
#   1. the gpt2-small training step (GQA plan) beside the peers' plain-JAX GPT-2 step (BENCHMARKS.md): tokens/s and MFU;
#   2. the kernel benchmark (--budget-s 385, enforced per row; each part keeps back the shares of the parts after
#      it): flash attention (~123 s) and decode (85 s) against cuDNN, XLA, JAX's Pallas ops and tokamax, the
#      block-sparse kernel against dense cuDNN / Triton at 16k-64k (105 s), and chunked linear attention against
#      associative_scan at the peers' SSM shape and against dense flash attention over a 1k-64k length sweep (70 s).
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
timeout 425 python3 experiments/bench_kernels "${smoke[@]}" --budget-s 385 --out "$OUT/bench_kernels.json" 2>&1 \
  | tee "$OUT/bench_kernels.log"
