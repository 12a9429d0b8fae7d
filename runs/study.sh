#!/usr/bin/env bash
# Issue 14's whole study in one command, from a clean clone: every table and chart of the
# README's toy sections regenerated into docs/ from runs of this checkout. Stages, in order,
# each sharing what it soundly can with the ones before it:
#   worked            runs/worked.sh: the worked toy's S0, one RL teacher per domain, MOPD and
#                     every baseline, learning curves at matched budgets -> docs/worked*
#   estimators_worked runs/estimators.sh PRESET=worked: every MOPD signal on the worked toy from
#                     the same S0, teachers and pg arm as `worked` (linked, not retrained: the
#                     same commands); the other-origin teachers are the next seed's (OTHER=next:
#                     another S0, nothing more to train) -> docs/estimators_worked*
#   mixture_worked    runs/mixture.sh PRESET=worked: adaptive vs fixed mixture from `worked`'s S0
#                     and teachers (found done, not retrained) -> docs/mixture_worked*
#   worked_small      S0_PRESET=worked_small_base runs/worked.sh: the same comparison with a 4x
#                     smaller S0, so a smaller student and smaller teachers (capacity pressure)
#                     -> docs/worked_small*
#   scaling           runs/scaling.sh: the 2..16 teacher-count curve (the digit toy's sixteen
#                     domains) -> docs/scaling*
# and, on the digit toy (the fast CI toy), run when named (STAGES=all runs every one):
#   toy               PRESET=toy runs/worked.sh: the comparison with MOPD's second round, the
#                     README's first table -> docs/toy*
#   estimators        runs/estimators.sh: every signal -> docs/estimators*
#   mixture           runs/mixture.sh, from `estimators`' S0 and teachers -> docs/mixture*
# Seeds run side by side at one thread each (PARALLEL at a time). A stage that ended is marked
# OUT/STAGE.done and skipped on a rerun; the stages' own steps resume the same way (but
# runs/toy.sh's seeds, which restart: OVERWRITE=1).
#
#   bash runs/study.sh                                  # the worked toy's study + scaling: out/*, docs/*
#   STAGES=all bash runs/study.sh                       # every stage, the digit toy's too
#   STAGES="estimators mixture" bash runs/study.sh      # some stages
#   SMOKE=1 OUT=/tmp/study DOCS=/tmp/study/docs SEED_LIST="0 1" STAGES=all bash runs/study.sh
#                                                       # the plumbing only: every step of every stage for two steps
# How long it takes, stage by stage, on a 2-core CPU: README "The whole toy study in one command".
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
DOCS=${DOCS:-docs}
ALL="worked estimators_worked mixture_worked worked_small scaling toy estimators mixture"
STAGES=${STAGES:-"worked estimators_worked mixture_worked worked_small scaling"}
[ "$STAGES" = all ] && STAGES=$ALL
for name in $STAGES; do
  case " $ALL " in *" $name "*) ;;
    *) echo "error: STAGES: no stage $name ($ALL, or all)" >&2
       exit 2 ;; esac
done
export SEED_LIST=${SEED_LIST:-"0 1 2"} SMOKE=${SMOKE:-0} PY=${PY:-python} PYTHONUNBUFFERED=1
PAR=${PARALLEL:-3}
. runs/seeds.sh  # say
mkdir -p "$OUT" "$DOCS"

stage() {  # stage NAME DIR CMD...: run it once, its output in OUT/NAME.txt; OUT/NAME.done marks it
  # done and holds "wall runs cpu": its seconds, and the runs it trained into DIR with their CPU
  # seconds (each run's "wall user sys" in its .done file; a run linked from another stage's
  # directory counts there)
  local name=$1 dir=$2 t0; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  [ -f "$OUT/$name.done" ] && { say "$name: ended earlier, kept"; return 0; }
  say "$name: $*"
  t0=$(date +%s)
  "$@" > "$OUT/$name.txt" 2>&1 || { tail -20 "$OUT/$name.txt"; say "$name failed: $OUT/$name.txt"; exit 1; }
  echo "$(( $(date +%s) - t0 )) $(find "$dir" -name '*.done' | xargs cat 2>/dev/null \
      | awk 'NF == 3 { r++; c += $2 + $3 } END { printf "%d %.0f", r, c }')" > "$OUT/$name.done"
  say "$name: done in $(cut -d' ' -f1 "$OUT/$name.done") s"
}

# the other-origin teachers: the next seed's (OTHER=next) where there are two seeds or more
other=1; [ "$(echo $SEED_LIST | wc -w)" -ge 2 ] && other=next
stage worked "$OUT/worked" env OUT="$OUT/worked" DOCS="$DOCS/worked" bash runs/worked.sh
stage estimators_worked "$OUT/estimators_worked" env PRESET=worked REUSE="$OUT/worked" OTHER=$other \
    OUT="$OUT/estimators_worked" DOCS="$DOCS/estimators_worked" PARALLEL="$PAR" bash runs/estimators.sh
stage mixture_worked "$OUT/mixture_worked" env PRESET=worked EST="$OUT/worked" OUT="$OUT/mixture_worked" \
    DOCS="$DOCS/mixture_worked" PARALLEL="$PAR" bash runs/mixture.sh
stage worked_small "$OUT/worked_small" env S0_PRESET=worked_small_base OUT="$OUT/worked_small" \
    DOCS="$DOCS/worked_small" bash runs/worked.sh
stage scaling "$OUT/scaling" env OUT="$OUT/scaling" DOCS="$DOCS/scaling" PARALLEL="$PAR" bash runs/scaling.sh
stage toy "$OUT/toy_seeds" env PRESET=toy OUT="$OUT/toy_seeds" DOCS="$DOCS/toy" bash runs/worked.sh  # not out/toy: runs/toy.sh's own
stage estimators "$OUT/estimators" env OUT="$OUT/estimators" DOCS="$DOCS/estimators" PARALLEL="$PAR" bash runs/estimators.sh
stage mixture "$OUT/mixture" env EST="$OUT/estimators" OUT="$OUT/mixture" DOCS="$DOCS/mixture" PARALLEL="$PAR" bash runs/mixture.sh
say "done: $(for name in $STAGES; do printf '%s ' "$DOCS/$name.md"; done)"
# what each stage cost (from its .done: wall seconds, runs trained, their CPU seconds)
echo "stage | wall (min) | runs | CPU (core-min)"
for name in $STAGES; do
  awk -v n="$name" '{ printf "%s | %.1f | %d | %.1f\n", n, $1 / 60, $2, $3 / 60 }' "$OUT/$name.done"  # each ended above
done
