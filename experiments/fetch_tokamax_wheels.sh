#!/usr/bin/env bash
# Download tokamax 0.0.17 and the dependencies the H200 image lacks into .whl/ (git-ignored, ~37 MB), for
# experiments/bench_kernels' (flash_attention.py) tokamax rows. Run here, where pip reaches the registry; the GPU machine cannot.
#
# On the GPU machine (carry .whl), before the benchmark:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
# The image has jax 0.11.2, absl-py, jaxtyping, tqdm, protobuf, numpy: only these are missing (see BENCHMARKS.md).
PACKAGES=(tokamax==0.0.17 einshape pydantic annotated-types typing-inspection qwix immutabledict tensorboardx xprof
          fire termcolor)

download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$@"
}

mkdir -p "$DEST"
download "${PACKAGES[@]}"
# pydantic pins its compiled core exactly: fetch the version this pydantic asks for.
core=$(unzip -p "$DEST"/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core *(\?==\([^ ;)]*\).*/\1/p')
download "pydantic-core==$core"
ls -l "$DEST"
du -sh "$DEST"
