#!/usr/bin/env bash
# Headroom-adaptive vs fixed domain mixture (issue 14) on the digit toy: the same S0 and RL
# teachers (runs/estimators.sh's, trained here if missing), MOPD (pg) with the uniform mixture
# and with --domain_mix=adaptive, held-out evals every 10 steps (640 samples); measured as the
# samples until every domain is at >= 90% of its headroom at once (runs/mixture_report.py).
#
#   bash runs/mixture.sh                     # seeds 0 1 2, two side by side at one thread each
#   EST=out/estimators: where S0 and teachers live (seedN/base, seedN/teacher_D)
#   OUT=out/mixture; then DOCS.md and DOCS/seedN.json (DOCS=docs/mixture)
#   SMOKE=1 EST=/tmp/est OUT=/tmp/mix DOCS=/tmp/mix-docs bash runs/mixture.sh   # two steps a stage: the plumbing
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
EST=${EST:-out/estimators}
OUT=${OUT:-out/mixture}
DOCS=${DOCS:-docs/mixture}
DOMAINS=${DOMAINS:-rev,sort,inc}
SEED_LIST=${SEED_LIST:-"0 1 2"}
PARALLEL=${PARALLEL:-2}
STEPS=${STEPS:-200}
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
    run "$o" mopd_$mix train_mopd.py --preset=toy --seed=$seed --init=$e/base --domains=$DOMAINS --teacher=$same \
        --out_dir=$o/mopd_$mix --domain_mix=$mix --steps=$STEPS --eval_every=10 --ckpt_every=1000 $RL
  done
}

all_seeds one_seed
"$PY" runs/mixture_report.py --out_dir=$OUT --est_dir=$EST --domains=$DOMAINS --docs="$DOCS" ${LIMIT:+--eval_limit=$LIMIT}
say "done: $DOCS.md"
