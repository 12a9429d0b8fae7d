# What the multi-seed studies share (sourced by runs/toy.sh, estimators.sh, mixture.sh, scaling.sh, study.sh).
#   step DIR NAME CMD...   run `$PY CMD... --overwrite=true` once: DIR/NAME.done marks it done (a rerun
#                          of the study skips it) and holds its seconds "wall user sys" (what sizes a
#                          study: runs/study.sh sums them), its output goes to DIR/NAME.txt; uses $seed
#   all_seeds FN           FN SEED for each seed of $SEED_LIST, $PARALLEL at a time, each at one
#                          thread, its log in $OUT.seedSEED.txt; fails if any seed failed
t_start=$(date +%s)
say() { echo "[$(( $(date +%s) - t_start ))s] $*"; }

step() {
  local dir=$1 name=$2; shift 2
  [ -f "$dir/$name.done" ] && return 0
  say "seed $seed: $name"
  { TIMEFORMAT="%R %U %S"; time "$PY" "$@" --overwrite=true > "$dir/$name.txt" 2>&1; } 2> "$dir/$name.time" \
      || { tail -20 "$dir/$name.txt"; return 1; }
  mv "$dir/$name.time" "$dir/$name.done"
}

all_seeds() {
  local fn=$1 pids=() fail=0 p
  mkdir -p "$OUT"
  for seed in $SEED_LIST; do
    ( export OMP_NUM_THREADS=1; "$fn" "$seed" ) >> "$OUT.seed$seed.txt" 2>&1 &  # appended: a study may make two passes
    pids+=($!)
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 5; done
  done
  for p in "${pids[@]}"; do wait "$p" || fail=1; done
  [ $fail = 0 ] || { echo "a seed failed: see $OUT.seed*.txt" >&2; return 1; }
  say "all seeds done"
}

# s0_and_teachers DIR DOMAIN...: this seed's S0 (train_sft.py's $S0_PRESET, ${P}_base by default) and
# one RL teacher per domain (train_teacher_rl.py's $P: toy by default) in DIR (DIR/base, DIR/teacher_D),
# each once; $SFT / $RL: extra flags (a smoke run's)
s0_and_teachers() {
  local e=$1 d; shift
  step "$e" base train_sft.py --preset=${S0_PRESET:-${P:-toy}_base} --seed=$seed --out_dir=$e/base ${SFT:-}
  for d in "$@"; do
    step "$e" teacher_$d train_teacher_rl.py --preset=${P:-toy} --seed=$seed --init=$e/base --domains=$d \
        --out_dir=$e/teacher_$d ${RL:-}
  done
}
