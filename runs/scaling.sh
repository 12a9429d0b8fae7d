#!/usr/bin/env bash
# Teacher-count scaling (the paper leaves it open): MOPD with the first K toy domains and K RL
# teachers, all from one S0 trained on all sixteen digit domains (train_sft.py's toy16_base:
# sixteen skills in 0.8M parameters, so they compete), the same samples per domain at every K
# (22 K prompts per step, 300 steps), and Mix-RL on the same domains with the same samples per
# domain (11 K / 4 prompts x 8); normalised retention against K, mean +- sd over seeds
# (runs/scaling_report.py: docs/scaling.md/.png, per-seed numbers in docs/scaling/seedN.json).
#   bash runs/scaling.sh                       # seeds 0 1 2, K = 2 4 8 16, all three side by side at 1 thread
#   KS="2 3 4 6 8" SEED_LIST=0 bash runs/scaling.sh
#   STEPS=150 OUT=out/scaling_short DOCS=docs/scaling_short bash runs/scaling.sh
#                                              # MOPD and Mix-RL for half the steps (the teachers as
#                                              # before): the two-hour study's curve (runs/study.sh)
#   SMOKE=1 OUT=/tmp/sc DOCS=/tmp/sc-docs bash runs/scaling.sh   # every stage for two steps: the plumbing only
#   DOCS=docs/scaling: where the report goes (DOCS.md, DOCS.png, DOCS/seedN.json)
# A rerun skips every step already done (its .done marker), so an interrupted study resumes.
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
OUT=${OUT:-out/scaling}
DOCS=${DOCS:-docs/scaling}
KS=${KS:-"2 4 8 16"}
STEPS=${STEPS:-300}  # MOPD's and Mix-RL's steps at every K (both presets' 300 by default)
SEED_LIST=${SEED_LIST:-"0 1 2"}
PARALLEL=${PARALLEL:-3}
PY=${PY:-python}
export PYTHONUNBUFFERED=1
SFT= RL= EVAL=
if [ "${SMOKE:-0}" = 1 ]; then  # every stage for two steps (and tiny evals): the plumbing only
  SFT="--steps=2 --eval_every=1 --eval_limit=4"; RL="--steps=2 --eval_every=1 --eval_limit=4"; EVAL="--limit=4"
fi
kmax=$(echo $KS | tr ' ' '\n' | sort -n | tail -1)
. runs/seeds.sh  # step, all_seeds, say

one_seed() {
  local seed=$1 o=$OUT/seed$1
  mkdir -p "$o"
  run() { step "$@"; }
  # shellcheck disable=SC2046
  S0_PRESET=toy16_base s0_and_teachers "$o" $("$PY" -c "from tasks import TOY_DOMAINS; print(' '.join(TOY_DOMAINS[:$kmax]))")
  for k in $KS; do
    local doms teachers
    doms=$("$PY" -c "from tasks import TOY_DOMAINS; print(','.join(TOY_DOMAINS[:$k]))")
    teachers=$(echo "$doms" | tr ',' '\n' | sed "s|.*|&=$o/teacher_&|" | paste -sd,)
    run "$o" mopd_k$k train_mopd.py --preset=toy --seed=$seed --init=$o/base --domains=$doms --teacher=$teachers \
        --prompts_per_step=$((22 * k)) --steps=$STEPS --out_dir=$o/mopd_k$k --ckpt_every=1000 $RL
    # Mix-RL with the same samples per domain per step as MOPD: 22 K responses = 11 K/4 prompts x 8
    run "$o" mixrl_k$k train_teacher_rl.py --preset=toy_mix --seed=$seed --init=$o/base --domains=$doms \
        --prompts_per_step=$((11 * k / 4)) --n=8 --steps=$STEPS --out_dir=$o/mixrl_k$k --ckpt_every=1000 $RL
    run "$o" eval_both_k$k evaluate.py --domains=$doms --base=$o/base --teacher=$teachers --model=MOPD=$o/mopd_k$k \
        --model=Mix-RL=$o/mixrl_k$k --out=$o/results_k$k $EVAL
  done
}

all_seeds one_seed
"$PY" runs/scaling_report.py --out_dir=$OUT --ks="$KS" --docs="$DOCS"
say "done: $DOCS.md"
