#!/usr/bin/env bash
# The toy reproduction of the paper's comparison, end to end on a CPU:
#   S0 (SFT on noisy demos) -> one RL teacher per domain -> MOPD -> every baseline
#   (Mix-RL, Cascade RL, off-policy finetune, weight average, task arithmetic)
#   -> multi-round MOPD -> held-out evaluation, table (OUT/results.md) and chart (OUT/results.png).
#
#   bash runs/toy.sh                    # one seed
#   SEEDS=3 bash runs/toy.sh            # three seeds, one after another, mean ± sd
#   SEED_LIST="1 2" bash runs/toy.sh    # just these seeds (e.g. in parallel shells); the table
#                                       # aggregates every OUT/seed*/results.json present
#   DOMAINS=rev,sort,odd MULTI_ROUND=0 OUT=out/toy bash runs/toy.sh
#   OVERWRITE=1 bash runs/toy.sh        # replace an earlier run's OUT/seedN (by default a rerun
#                                       # stops before touching it: the trainers never overwrite)
#   SMOKE=1 OUT=/tmp/toy bash runs/toy.sh   # every stage for two steps: the plumbing only
#   S0_PRESET=worked_small_base PRESET=worked OUT=out/worked_small bash runs/toy.sh
#                                       # S0 from another train_sft.py preset (here a smaller model:
#                                       # every later model starts from S0, so all are that size)
#   PRESET=worked bash runs/toy.sh      # the worked toy (tasks.WORKED_OPS: add,mul,isort, answers of
#                                       # 20-50 tokens whose steps compound) in out/worked: every
#                                       # script runs its worked* presets instead of toy*
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1}
P=${PRESET:-toy}  # presets $P_base, $P, $P_mix, $P_cascade, $P_offpolicy
if [ "$P" = worked ]; then DOMAINS=${DOMAINS:-add,mul,isort}; OUT=${OUT:-out/worked}; fi
DOMAINS=${DOMAINS:-rev,sort,inc}
OUT=${OUT:-out/toy}
MULTI_ROUND=${MULTI_ROUND:-1}
PY=${PY:-python}
export PYTHONUNBUFFERED=1
doms=${DOMAINS//,/ }
SFT= RL= EVAL= MERGE=
if [ "${SMOKE:-0}" = 1 ]; then  # every stage for two steps (and tiny evals): the plumbing only
  SFT="--steps=2 --eval_every=1 --eval_limit=4 --offpolicy_per_domain=4 --keep_incorrect=true"
  RL="--steps=2 --eval_every=1 --eval_limit=4"
  EVAL="--limit=4"; MERGE="--val_n=4 --lambdas=1.0"
fi
. runs/seeds.sh  # say, step

SEED_LIST=${SEED_LIST:-$(seq 0 $((SEEDS - 1)))}
for seed in $SEED_LIST; do
  o=$OUT/seed$seed
  if [ -n "$(ls -A "$o" 2>/dev/null)" ]; then
    [ "${OVERWRITE:-0}" = 1 ] || { echo "error: $o holds an earlier run: OVERWRITE=1 replaces it" >&2; exit 2; }
    rm -rf "$o"
  fi
  mkdir -p "$o"
  # each run's output in $o/NAME.txt, and when it ended $o/NAME.done with its seconds "wall user sys"
  # (runs/seeds.sh's step: runs/mixture.sh PRESET=worked finds this seed's S0 and teachers done by it,
  # runs/study.sh sums the seconds). $o was emptied above, so nothing is skipped and --overwrite=true,
  # which step adds, replaces nothing
  run() { step "$o" "$@"; }

  run base train_sft.py --preset=${S0_PRESET:-${P}_base} --seed=$seed --out_dir=$o/base $SFT
  teachers=""
  for d in $doms; do
    run teacher_$d train_teacher_rl.py --preset=$P --seed=$seed --init=$o/base --domains=$d --out_dir=$o/teacher_$d $RL
    teachers+="$d=$o/teacher_$d,"
  done
  teachers=${teachers%,}
  run mopd train_mopd.py --preset=$P --seed=$seed --init=$o/base --domains=$DOMAINS --teacher=$teachers --out_dir=$o/mopd $RL
  run mixrl train_teacher_rl.py --preset=${P}_mix --seed=$seed --init=$o/base --domains=$DOMAINS --out_dir=$o/mixrl $RL
  prev=$o/base  # Cascade RL: one domain after another, each from the previous result
  for d in $doms; do
    run cascade_$d train_teacher_rl.py --preset=${P}_cascade --seed=$seed --init=$prev --domains=$d --out_dir=$o/cascade_$d $RL
    prev=$o/cascade_$d
  done
  run offpolicy train_sft.py --preset=${P}_offpolicy --seed=$seed --init=$o/base --domains=$DOMAINS --teacher=$teachers --out_dir=$o/offpolicy $SFT
  run merge_avg merge.py --mode=average --base=$o/base --teacher=$teachers --out=$o/merge_avg $MERGE
  run merge_ta merge.py --mode=task_arithmetic --base=$o/base --teacher=$teachers --out=$o/merge_ta $MERGE
  models=(--model=MOPD=$o/mopd --model=Mix-RL=$o/mixrl --model="Cascade RL=$prev" --model="Off-policy FT=$o/offpolicy"
          --model="Weight average=$o/merge_avg" --model="Task arithmetic=$o/merge_ta")
  if [ "$MULTI_ROUND" = 1 ]; then  # round 2: teachers re-trained from the MOPD student, then distil again
    teachers2=""
    for d in $doms; do
      run teacher2_$d train_teacher_rl.py --preset=$P --seed=$seed --init=$o/mopd --domains=$d --out_dir=$o/teacher2_$d $RL
      teachers2+="$d=$o/teacher2_$d,"
    done
    run mopd2 train_mopd.py --preset=$P --seed=$seed --init=$o/mopd --domains=$DOMAINS --teacher=${teachers2%,} --out_dir=$o/mopd2 $RL
    models+=(--model="MOPD round 2=$o/mopd2")
  fi
  run eval evaluate.py --preset=$P --domains=$DOMAINS --base=$o/base --teacher=$teachers "${models[@]}" \
      --curve=MOPD=$o/mopd.log/metrics.jsonl --curve=Mix-RL=$o/mixrl.log/metrics.jsonl --out=$o/results $EVAL
  cat "$o/results.md"
done
# the table over every seed present: derived from the seeds' own results.json, so it is rewritten
# each time (a second seed, a rerun). runs/worked.sh runs seeds side by side and makes its own
# report: AGGREGATE=0 there, so parallel seeds do not each write it
[ "${AGGREGATE:-1}" = 1 ] || { say "done: $OUT/seed*/results.md"; exit 0; }
"$PY" evaluate.py --aggregate $OUT/seed*/results.json --out=$OUT/results --overwrite=true > /dev/null
say "done: $OUT/results.md, $OUT/results.png"
cat "$OUT/results.md"
