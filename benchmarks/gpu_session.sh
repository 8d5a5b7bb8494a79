#!/bin/bash
# One device call: set up (triton-sigmoid wheel, C++ extension if present), run GPU tests and/or benchmarks.
# usage: bash benchmarks/gpu_session.sh "<pytest args or empty>" "<benchmark args or empty>" [test_timeout] [bench_timeout]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/triton_sigmoid-*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi -L; date -u; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/header.txt"
if [ -f setup.py ] && [ -n "$SIGATTN_BUILD" ]; then
  (time python3 setup.py build_ext --inplace) > "$OUT/build.log" 2>&1 && echo "C++ extension built" || { echo "C++ build failed"; tail -5 "$OUT/build.log"; }
fi
if [ -n "$1" ]; then
  { cat "$OUT/header.txt"; timeout "${3:-360}" python3 -m pytest -p no:cacheprovider $1; } 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -25
fi
if [ -n "$2" ]; then
  timeout "${4:-200}" python3 benchmarks/attention.py $2 2>&1 | tee "$OUT/bench.log" | tail -40
fi
