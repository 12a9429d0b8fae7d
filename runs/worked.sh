#!/usr/bin/env bash
# The comparison at matched budgets over three seeds (issue 14), from a clean clone:
#   three seeds of `PRESET=$PRESET runs/toy.sh` side by side, one thread each (S0 on noisy demos,
#   a teacher per domain, MOPD, Mix-RL, Cascade RL, off-policy FT, weight average, task
#   arithmetic, evaluation), then runs/toy_report.py: budgets and learning curves into DOCS.md,
#   DOCS.png and DOCS/seedN.json (the numbers, from which --from_docs=true rebuilds both).
#     PRESET=worked (default)  the worked toy, add/mul/isort: out/worked -> docs/worked*
#     PRESET=toy               the digit toy, rev/sort/inc, with MOPD's second round (MULTI_ROUND=1):
#                              out/toy_seeds -> docs/toy* (the README's first table)
#
#   bash runs/worked.sh                      # seeds 0 1 2 -> out/worked
#   PRESET=toy bash runs/worked.sh           # the digit toy's table
#   SEED_LIST="3 4" OUT=out/w2 bash runs/worked.sh
#   S0_PRESET=worked_small_base OUT=out/worked_small DOCS=docs/worked_small bash runs/worked.sh
#                                            # a smaller student (and so smaller teachers): capacity pressure
#   SMOKE=1 OUT=/tmp/w DOCS=/tmp/w-docs bash runs/worked.sh   # every stage for two steps: the plumbing only
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
P=${PRESET:-worked}
case $P in
  worked) OUT=${OUT:-out/worked}; DOCS=${DOCS:-docs/worked}; MULTI_ROUND=${MULTI_ROUND:-0} ;;
  toy) OUT=${OUT:-out/toy_seeds}; DOCS=${DOCS:-docs/toy}; MULTI_ROUND=${MULTI_ROUND:-1} ;;
  *) echo "error: PRESET=$P: runs/worked.sh knows worked and toy" >&2; exit 2 ;;
esac
SEED_LIST=${SEED_LIST:-0 1 2}
PY=${PY:-python}
mkdir -p "$OUT"
pids=()
for s in $SEED_LIST; do
  SEED_LIST=$s PRESET=$P SMOKE=${SMOKE:-0} MULTI_ROUND=$MULTI_ROUND AGGREGATE=0 OUT=$OUT PY=$PY OMP_NUM_THREADS=1 bash runs/toy.sh > "$OUT.seed$s.txt" 2>&1 &
  pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ $fail = 0 ] || { echo "a seed failed: see $OUT.seed*.txt" >&2; exit 1; }
"$PY" runs/toy_report.py --out_dir="$OUT" --run_preset="$P" --name="$P" --docs="$DOCS"
