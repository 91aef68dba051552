#!/usr/bin/env bash
# A/B of end-to-end decode rows in one device call: the same decode.py rows for a baseline tree (BASE: a
# checkout of another commit carried to the device, e.g. `git worktree add .carry/base <commit>`) and for this
# tree, each in its own process, alternating ROUNDS times. Logs and JSON under $OUT/base_<i>/ and $OUT/this_<i>/.
#   bash benchmarks/ab_decode.sh BASE "<decode.py --only rows>" BUDGET_S [ROUNDS]
# Nothing here changes the GPU's settings.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
base=$1; rows=$2; budget=$3; rounds=${4:-1}
for i in $(seq 1 "$rounds"); do
  for side in base this; do
    dir=.; [ "$side" = base ] && dir=$base
    mkdir -p "$OUT/${side}_$i"
    (cd "$dir" && PYTHONPATH=. timeout $((budget + 120)) python3 benchmarks/decode.py --out "$OUT/${side}_$i" \
        --budget-s "$budget" --only "$rows" > "$OUT/${side}_$i/decode.log" 2>&1)
    echo "== $side round $i (rc $?)"
    grep -E "tok/s|copy" "$OUT/${side}_$i/decode.log" | tail -8
  done
done
