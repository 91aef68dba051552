#!/usr/bin/env bash
# One device call: GPU tests of the given files, then decode benchmark rows, logs under $OUT.
#   bash benchmarks/gpu_run.sh "<test files>" <test timeout s> "<decode.py --only rows>" <bench budget s> [extra decode.py args]
# (the device tool gives $OUT; nothing here changes the GPU's settings)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
tests=$1; t_tests=$2; rows=$3; budget=$4; shift 4
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
if [ -n "$tests" ]; then
  timeout "$t_tests" python3 -m pytest -q -m gpu -p no:cacheprovider $tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ -n "$rows" ]; then
  timeout $((budget + 90)) python3 benchmarks/decode.py --out "$OUT" --budget-s "$budget" --only "$rows" "$@" \
    > "$OUT/decode.log" 2>&1
  tail -45 "$OUT/decode.log"
fi
