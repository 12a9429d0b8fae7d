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

stage() {  # stage NAME CMD...: run it once (OUT/NAME.done, holding its seconds), its output in OUT/NAME.txt
  local name=$1 t0; shift
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  [ -f "$OUT/$name.done" ] && { say "$name: ended earlier ($(cat "$OUT/$name.done") s), kept"; return 0; }
  say "$name: $*"
  t0=$(date +%s)
  "$@" > "$OUT/$name.txt" 2>&1 || { tail -20 "$OUT/$name.txt"; say "$name failed: $OUT/$name.txt"; exit 1; }
  echo $(( $(date +%s) - t0 )) > "$OUT/$name.done"
  say "$name: done in $(cat "$OUT/$name.done") s"
}

stage toy env PRESET=toy OUT="$OUT/toy_seeds" DOCS="$DOCS/toy" bash runs/worked.sh  # not out/toy: runs/toy.sh's own
stage worked env OUT="$OUT/worked" DOCS="$DOCS/worked" bash runs/worked.sh
stage estimators_worked env PRESET=worked REUSE="$OUT/worked" OUT="$OUT/estimators_worked" \
    DOCS="$DOCS/estimators_worked" PARALLEL="$PAR" bash runs/estimators.sh
stage estimators env OUT="$OUT/estimators" DOCS="$DOCS/estimators" PARALLEL="$PAR" bash runs/estimators.sh
stage mixture env EST="$OUT/estimators" OUT="$OUT/mixture" DOCS="$DOCS/mixture" PARALLEL="$PAR" bash runs/mixture.sh
stage scaling env OUT="$OUT/scaling" DOCS="$DOCS/scaling" PARALLEL="$PAR" bash runs/scaling.sh
say "done: $DOCS/{toy,worked,estimators_worked,estimators,mixture,scaling}.md"
# what each stage cost: its wall time, and the CPU time of every run it trained (each run's
# "wall user sys" seconds in its .done / .time file; a run in another stage's directory, e.g. one
# linked from it, counts there)
echo "stage | wall (min) | runs | CPU (core-min)"
for name in $STAGES; do
  [ -f "$OUT/$name.done" ] || continue
  d=$OUT/$name; [ "$name" = toy ] && d=$OUT/toy_seeds
  find "$d" -name '*.done' -o -name '*.time' | xargs cat 2>/dev/null \
    | awk -v n="$name" -v w="$(cat "$OUT/$name.done")" \
        'NF == 3 { r++; c += $2 + $3 } END { printf "%s | %.1f | %d | %.1f\n", n, w / 60, r, c / 60 }'
done
