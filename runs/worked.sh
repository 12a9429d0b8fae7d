#!/usr/bin/env bash
# The worked toy's comparison at matched budgets (issue 14), from a clean clone:
#   three seeds of `PRESET=worked runs/toy.sh` side by side, one thread each (S0 on noisy worked
#   demos, a teacher per domain add/mul/isort, MOPD, Mix-RL at MOPD's whole budget, Cascade RL,
#   off-policy FT, weight average, task arithmetic, evaluation), then runs/toy_report.py:
#   budgets and learning curves into docs/worked.md, docs/worked.png, docs/worked/seedN.json.
#
#   bash runs/worked.sh                      # seeds 0 1 2 -> out/worked
#   SEED_LIST="3 4" OUT=out/w2 bash runs/worked.sh
#   SMOKE=1 OUT=/tmp/w DOCS=/tmp/w-docs bash runs/worked.sh   # every stage for two steps: the plumbing only
#   DOCS=docs/worked: where the report goes (DOCS.md, DOCS.png, DOCS/seedN.json)
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
OUT=${OUT:-out/worked}
DOCS=${DOCS:-docs/worked}
SEED_LIST=${SEED_LIST:-0 1 2}
PY=${PY:-python}
mkdir -p "$OUT"
pids=()
for s in $SEED_LIST; do
  SEED_LIST=$s PRESET=worked SMOKE=${SMOKE:-0} MULTI_ROUND=0 OUT=$OUT PY=$PY OMP_NUM_THREADS=1 bash runs/toy.sh > "$OUT.seed$s.txt" 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ $fail = 0 ] || { echo "a seed failed: see $OUT.seed*.txt" >&2; exit 1; }
"$PY" runs/toy_report.py --out_dir="$OUT" --run_preset=worked --name=worked --docs="$DOCS"
