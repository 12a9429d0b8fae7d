#!/usr/bin/env bash
# Headroom-adaptive vs fixed domain mixture (issue 14): the same S0 and RL teachers, MOPD (pg)
# with the uniform mixture and with --domain_mix=adaptive, held-out evals every 10 steps; measured
# as the samples until every domain is at >= 90% of its headroom at once (runs/mixture_report.py).
#     PRESET=toy (default)  the digit toy, rev/sort/inc, S0 and teachers from runs/estimators.sh's
#                           seeds (EST=out/estimators; trained here if missing) -> docs/mixture*
#     PRESET=worked         the worked toy, add/mul/isort, S0 and teachers from runs/worked.sh's
#                           seeds (EST=out/worked; trained here if missing, by the same commands)
#                           -> out/mixture_worked, docs/mixture_worked*
#
#   bash runs/mixture.sh                     # seeds 0 1 2, two side by side at one thread each
#   PRESET=worked bash runs/mixture.sh
#   EST=DIR: where S0 and teachers live (seedN/base, seedN/teacher_D)
#   OUT=out/mixture; then DOCS.md and DOCS/seedN.json (DOCS=docs/mixture)
#   SMOKE=1 EST=/tmp/est OUT=/tmp/mix DOCS=/tmp/mix-docs bash runs/mixture.sh   # two steps a stage: the plumbing
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
P=${PRESET:-toy}  # presets ${P}_base (S0) and $P (teachers, MOPD)
case $P in
  toy) EST=${EST:-out/estimators}; OUT=${OUT:-out/mixture}; DOCS=${DOCS:-docs/mixture}; DOMAINS=${DOMAINS:-rev,sort,inc}
       STEPS=${STEPS:-200} ;;
  worked) EST=${EST:-out/worked}; OUT=${OUT:-out/mixture_worked}; DOCS=${DOCS:-docs/mixture_worked}
          DOMAINS=${DOMAINS:-add,mul,isort}; STEPS=${STEPS:-300} ;;  # the worked toy's MOPD steps
  *) echo "error: PRESET=$P: runs/mixture.sh knows toy and worked" >&2; exit 2 ;;
esac
SEED_LIST=${SEED_LIST:-"0 1 2"}
PARALLEL=${PARALLEL:-2}
PY=${PY:-python}
export PYTHONUNBUFFERED=1
doms=${DOMAINS//,/ }
SFT= RL= LIMIT=
if [ "${SMOKE:-0}" = 1 ]; then  # every stage for two steps (and tiny evals): the plumbing only
  SFT="--steps=2 --eval_every=1 --eval_limit=4"; RL="--steps=2 --eval_every=1 --eval_limit=4"; STEPS=2; LIMIT=4
fi
. runs/seeds.sh  # step, all_seeds, say

one_seed() {
  local seed=$1 e=$EST/seed$1 o=$OUT/seed$1
  mkdir -p "$o" "$e"
  run() { step "$@"; }
  # shellcheck disable=SC2086
  s0_and_teachers "$e" $doms
  local same
  same=$(for d in $doms; do printf '%s=%s,' "$d" "$e/teacher_$d"; done)
  same=${same%,}
  for mix in fixed adaptive; do
    run "$o" mopd_$mix train_mopd.py --preset=$P --seed=$seed --init=$e/base --domains=$DOMAINS --teacher=$same \
        --out_dir=$o/mopd_$mix --domain_mix=$mix --steps=$STEPS --eval_every=10 --ckpt_every=1000 $RL
  done
}

all_seeds one_seed
"$PY" runs/mixture_report.py --out_dir=$OUT --est_dir=$EST --run_preset=$P --domains=$DOMAINS --docs="$DOCS" ${LIMIT:+--eval_limit=$LIMIT}
say "done: $DOCS.md"
