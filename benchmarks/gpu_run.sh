#!/usr/bin/env bash
# One device call: GPU tests of the given files, then decode benchmark rows, logs under $OUT.
#   bash benchmarks/gpu_run.sh "<test files>" <test timeout s> "<decode.py --only rows>" <bench budget s> [extra decode.py args]
# (the device tool gives $OUT; nothing here changes the GPU's settings)
# Kernel settings: per row through decode.py's row variants ("fxspec int4 no-pdl", "... no-table", ...), or for
# the whole run through the [kernels] section of a TOML file named by $FXSPEC_CONFIG. $FXSPEC_COMMIT names the
# commit where the copied tree has no (or a stale) .git; benchmarks/harness.py records it.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
tests=$1; t_tests=$2; rows=$3; budget=$4; shift 4
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import sys
sys.path.insert(0, "benchmarks")
import harness
print(harness.versions())
print("commit", harness.commit())
print("kernels", harness.kernel_settings())
EOF
if [ -n "$tests" ]; then
  timeout "$t_tests" python3 -m pytest -q -m gpu -p no:cacheprovider $tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ -n "$rows" ]; then
  timeout $((budget + 90)) python3 benchmarks/decode.py --out "$OUT" --budget-s "$budget" --only "$rows" "$@" \
    > "$OUT/decode.log" 2>&1
  tail -45 "$OUT/decode.log"
fi
