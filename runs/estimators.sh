#!/usr/bin/env bash
# The estimator study (issue 14): the same S0 and the same RL teachers, and MOPD with each
# per-token signal the paper discusses, at the same steps, prompts and learning rate:
#   pg          the paper's default: A_t = log pi_T(y_t) - log pi(y_t) through the sampled token
#   topk4/16    Eq. 5 over the teacher's top-k tokens (the toy's vocabulary is 47, so k = 64
#               would be every token: the exact reverse KL plus (1 - sum p) terms that vanish)
#   reverse_kl  the exact full-vocabulary reverse KL (the dense limit of both)
#   forward_kl  the exact forward KL;  jsd  the generalised JSD at beta = 0.5
#   pg_other    pg with teachers of a different origin: RL'd from another S0. OTHER=1: an S0 of seed
#               + 1000 and its own teachers, trained here; OTHER=next: the next seed's teachers (of
#               SEED_LIST, cyclically: another S0 by the same recipe, nothing extra to train; needs
#               >= 2 seeds); OTHER=0: no such arm
# and the initial per-token KL of each teacher family to the student (step 1's sampled kl_est,
# before any update; the paper: ~0.04 same origin vs ~0.19 different, which hurt).
#
#   bash runs/estimators.sh                  # the digit toy: seeds 0 1 2, two side by side at one thread each
#   SEED_LIST="0" bash runs/estimators.sh    # one seed (e.g. in several shells)
#   SMOKE=1 OUT=/tmp/est bash runs/estimators.sh   # every stage for two steps: the plumbing only
#   PRESET=worked REUSE=out/worked OTHER=next bash runs/estimators.sh
#       the worked toy (out/estimators_worked, docs/estimators_worked*): S0, the teachers and the
#       pg arm linked from runs/worked.sh's seeds in REUSE (the same presets, seed and commands as
#       here, so the same runs), the other arms trained; the other-origin teachers are the next seed's
#   OUT=out/estimators; per seed OUT/seedN/{results.json,mopd_*.log}; then runs/estimators_report.py
#   writes docs/estimators.md + .png and copies each seed's numbers to docs/estimators/seedN.json
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
P=${PRESET:-toy}  # presets ${P}_base (S0; or S0_PRESET) and $P (teachers, MOPD, evaluation)
if [ "$P" = worked ]; then DOMAINS=${DOMAINS:-add,mul,isort}; OUT=${OUT:-out/estimators_worked}; DOCS=${DOCS:-docs/estimators_worked}; fi
OUT=${OUT:-out/estimators}
DOCS=${DOCS:-docs/estimators}
DOMAINS=${DOMAINS:-rev,sort,inc}
VARIANTS=${VARIANTS:-"pg topk4 topk16 reverse_kl forward_kl jsd"}
OTHER=${OTHER:-1}
REUSE=${REUSE:-}  # empty: train every stage
SEED_LIST=${SEED_LIST:-"0 1 2"}
case $OTHER in
  0|1) ;;
  next) [ "$(echo $SEED_LIST | wc -w)" -ge 2 ] \
          || { echo "error: OTHER=next takes the next seed's teachers: SEED_LIST needs >= 2 seeds" >&2; exit 2; } ;;
  *) echo "error: OTHER=$OTHER: 0, 1 or next" >&2; exit 2 ;;
esac
PARALLEL=${PARALLEL:-2}
PY=${PY:-python}
export PYTHONUNBUFFERED=1
doms=${DOMAINS//,/ }
SFT= RL= EVAL=
if [ "${SMOKE:-0}" = 1 ]; then  # every stage for a step or two: the plumbing only
  SFT="--steps=2 --eval_every=1 --eval_limit=4"; RL="--steps=2 --eval_every=1 --eval_limit=4"; EVAL="--limit=4"
fi
. runs/seeds.sh  # step, all_seeds, say

declare -A FLAGS=([pg]="" [topk4]="--loss=topk --topk=4" [topk16]="--loss=topk --topk=16" [reverse_kl]="--loss=reverse_kl"
                  [forward_kl]="--loss=forward_kl" [jsd]="--loss=jsd --beta=0.5")

reuse() {  # reuse NAME FROM: REUSE's seed run FROM (its directory and log) as this study's NAME, marked done
  local src=$REUSE/seed$seed/$2 o=$OUT/seed$seed
  [ -n "$REUSE" ] && [ -f "$src/config.json" ] && [ ! -e "$o/$1" ] || return 0
  ln -s "$(realpath "$src")" "$o/$1"
  [ -d "$src.log" ] && ln -s "$(realpath "$src.log")" "$o/$1.log"
  touch "$o/$1.done"
}

train_seed() {  # S0, the teachers (and with OTHER=1 the other-origin chain), every variant
  local seed=$1 o=$OUT/seed$1
  mkdir -p "$o"
  run() { step "$o" "$@"; }
  reuse base base
  run base train_sft.py --preset=${S0_PRESET:-${P}_base} --seed=$seed --out_dir=$o/base $SFT
  [ "$OTHER" = 1 ] && run base_other train_sft.py --preset=${S0_PRESET:-${P}_base} --seed=$((seed + 1000)) --out_dir=$o/base_other $SFT
  local same=""
  for d in $doms; do
    reuse teacher_$d teacher_$d
    run teacher_$d train_teacher_rl.py --preset=$P --seed=$seed --init=$o/base --domains=$d --out_dir=$o/teacher_$d $RL
    [ "$OTHER" = 1 ] && run other_$d train_teacher_rl.py --preset=$P --seed=$seed --init=$o/base_other --domains=$d \
        --out_dir=$o/other_$d $RL
    same+="$d=$o/teacher_$d,"
  done
  reuse mopd_pg mopd
  for name in $VARIANTS; do
    [ -n "${FLAGS[$name]+x}" ] || { echo "unknown variant $name (known: ${!FLAGS[*]})" >&2; return 2; }
    # shellcheck disable=SC2086
    run mopd_$name train_mopd.py --preset=$P --seed=$seed --init=$o/base --domains=$DOMAINS --teacher=${same%,} \
        --out_dir=$o/mopd_$name ${FLAGS[$name]} $RL
  done
}

other_dir() {  # where seed $1's other-origin teachers are: its own chain (OTHER=1) or the next seed's
  local seeds=($SEED_LIST) i
  [ "$OTHER" = 1 ] && { echo "$OUT/seed$1/other_"; return; }
  for i in "${!seeds[@]}"; do
    [ "${seeds[$i]}" = "$1" ] && { echo "$OUT/seed${seeds[$(( (i + 1) % ${#seeds[@]} ))]}/teacher_"; return; }
  done
}

finish_seed() {  # the other-origin arm (after every seed's teachers exist: OTHER=next reads another seed's) and the eval
  local seed=$1 o=$OUT/seed$1 same="" other="" d name models=()
  run() { step "$o" "$@"; }
  for d in $doms; do same+="$d=$o/teacher_$d,"; other+="$d=$(other_dir "$seed")$d,"; done
  same=${same%,}; other=${other%,}
  for name in $VARIANTS; do models+=(--model="MOPD $name=$o/mopd_$name"); done
  if [ "$OTHER" != 0 ]; then
    run mopd_pg_other train_mopd.py --preset=$P --seed=$seed --init=$o/base --domains=$DOMAINS --teacher=$other \
        --out_dir=$o/mopd_pg_other $RL
    models+=(--model="MOPD pg, other-origin teachers=$o/mopd_pg_other")
    for d in $doms; do models+=(--model="other-origin teacher[$d]=$(other_dir "$seed")$d"); done
  fi
  run eval evaluate.py --preset=$P --domains=$DOMAINS --base=$o/base --teacher=$same "${models[@]}" --out=$o/results $EVAL
}

all_seeds train_seed
all_seeds finish_seed
"$PY" runs/estimators_report.py --out_dir=$OUT --docs=$DOCS --name="$P"
say "done: $DOCS.md"
