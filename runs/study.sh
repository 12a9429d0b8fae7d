#!/usr/bin/env bash
# Issue 14's whole study in one command, from a clean clone: every table and chart of the
# README's toy sections regenerated into docs/ from runs of this checkout. Stages, in order,
# each sharing what it soundly can with the ones before it:
#   toy               PRESET=toy runs/worked.sh: the digit toy's comparison (the README's first
#                     table, with MOPD's second round) -> docs/toy*
#   worked            runs/worked.sh: the worked toy's S0, one RL teacher per domain, MOPD and
#                     every baseline, learning curves at matched budgets -> docs/worked*
#   estimators_worked runs/estimators.sh PRESET=worked: every MOPD signal on the worked toy from
#                     the same S0, teachers and pg arm as `worked` (linked, not retrained: the
#                     same commands), the other-origin chain -> docs/estimators_worked*
#   estimators        runs/estimators.sh: every signal on the digit toy -> docs/estimators*
#   mixture           runs/mixture.sh: adaptive vs fixed mixture from `estimators`' S0 and
#                     teachers (reused) -> docs/mixture*
#   scaling           runs/scaling.sh: the 2..16 teacher-count curve -> docs/scaling*
# Seeds run side by side at one thread each (PARALLEL at a time). A stage that ended is marked
# OUT/STAGE.done and skipped on a rerun; the stages' own steps resume the same way (but
# runs/toy.sh's seeds, which restart: OVERWRITE=1).
#
#   bash runs/study.sh                                  # everything: out/*, docs/*
#   STAGES="estimators mixture" bash runs/study.sh      # some stages
#   SMOKE=1 OUT=/tmp/study DOCS=/tmp/study/docs SEED_LIST=0 bash runs/study.sh   # the plumbing only:
#                                                       # every step of every stage for two steps
# How long it takes, stage by stage, on a 2-core CPU: README "The whole toy study in one command".
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
DOCS=${DOCS:-docs}
STAGES=${STAGES:-"toy worked estimators_worked estimators mixture scaling"}
export SEED_LIST=${SEED_LIST:-"0 1 2"} SMOKE=${SMOKE:-0} PY=${PY:-python} PYTHONUNBUFFERED=1
PAR=${PARALLEL:-3}
. runs/seeds.sh  # say
mkdir -p "$OUT" "$DOCS"

stage() {  # stage NAME DIR CMD...: run it once, its output in OUT/NAME.txt; OUT/NAME.done marks it
  # done and holds "wall runs cpu": its seconds, and the runs it trained into DIR with their CPU
  # seconds (each run's "wall user sys" in its .done / .time file; a run linked from another
  # stage's directory counts there)
  local name=$1 dir=$2 t0; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  [ -f "$OUT/$name.done" ] && { say "$name: ended earlier, kept"; return 0; }
  say "$name: $*"
  t0=$(date +%s)
  "$@" > "$OUT/$name.txt" 2>&1 || { tail -20 "$OUT/$name.txt"; say "$name failed: $OUT/$name.txt"; exit 1; }
  echo "$(( $(date +%s) - t0 )) $(find "$dir" -name '*.done' -o -name '*.time' | xargs cat 2>/dev/null \
      | awk 'NF == 3 { r++; c += $2 + $3 } END { printf "%d %.0f", r, c }')" > "$OUT/$name.done"
  say "$name: done in $(cut -d' ' -f1 "$OUT/$name.done") s"
}

stage toy "$OUT/toy_seeds" env PRESET=toy OUT="$OUT/toy_seeds" DOCS="$DOCS/toy" bash runs/worked.sh  # not out/toy: runs/toy.sh's own
stage worked "$OUT/worked" env OUT="$OUT/worked" DOCS="$DOCS/worked" bash runs/worked.sh
stage estimators_worked "$OUT/estimators_worked" env PRESET=worked REUSE="$OUT/worked" OUT="$OUT/estimators_worked" \
    DOCS="$DOCS/estimators_worked" PARALLEL="$PAR" bash runs/estimators.sh
stage estimators "$OUT/estimators" env OUT="$OUT/estimators" DOCS="$DOCS/estimators" PARALLEL="$PAR" bash runs/estimators.sh
stage mixture "$OUT/mixture" env EST="$OUT/estimators" OUT="$OUT/mixture" DOCS="$DOCS/mixture" PARALLEL="$PAR" bash runs/mixture.sh
stage scaling "$OUT/scaling" env OUT="$OUT/scaling" DOCS="$DOCS/scaling" PARALLEL="$PAR" bash runs/scaling.sh
say "done: $DOCS/{toy,worked,estimators_worked,estimators,mixture,scaling}.md"
# what each stage cost (from its .done: wall seconds, runs trained, their CPU seconds)
echo "stage | wall (min) | runs | CPU (core-min)"
for name in $STAGES; do
  awk -v n="$name" '{ printf "%s | %.1f | %d | %.1f\n", n, $1 / 60, $2, $3 / 60 }' "$OUT/$name.done"  # each ended above
done
