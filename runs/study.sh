#!/usr/bin/env bash
# Issue 14's whole study in one command, from a clean clone: every table and chart of the
# README's toy sections regenerated into docs/ from runs of this checkout. By default the
# two-hour study (97 min measured on 2 cores at commit 9dab622: README "The whole toy study in one command"),
# built on the worked toy's 0.2M-parameter student:
#   worked_small      S0_PRESET=worked_small_base runs/worked.sh: S0, one RL teacher per domain,
#                     MOPD and every baseline, learning curves at matched budgets -> docs/worked_small*
#   estimators_small  runs/estimators.sh on worked_small's S0, teachers and pg arm (linked, not
#                     retrained: the same commands); the other-origin teachers are the next seed's
#                     (OTHER=next: another S0, nothing more to train) -> docs/estimators_small*
#   mixture_small     runs/mixture.sh: adaptive vs fixed mixture from worked_small's S0 and
#                     teachers (found done, not retrained) -> docs/mixture_small*
#   scaling_short     runs/scaling.sh with STEPS=150: the 2..16 teacher-count curve (the digit
#                     toy's sixteen domains), MOPD and Mix-RL at half the full curve's steps
#                     -> docs/scaling_short*
# and, run when named (STAGES=all runs every one), the longer studies of the README:
#   worked, estimators_worked, mixture_worked   the same three on the 0.8M student (runs/worked.sh,
#                     estimators.sh PRESET=worked, mixture.sh PRESET=worked) -> docs/worked* ...
#   scaling           the teacher-count curve at 300 steps -> docs/scaling*
#   toy, estimators, mixture   the digit toy (the fast CI toy): the comparison with MOPD's second
#                     round (the README's first table; out/toy_seeds, not runs/toy.sh's out/toy),
#                     every signal, the mixture from `estimators`' S0 and teachers -> docs/toy* ...
# Stages that share nothing run side by side as lanes (each lane's stages in order: small,
# worked, digit; each scaling stage a lane of its own), so the cores do not wait on one seed's
# tail; inside a stage the seeds run side by side at one thread each (PARALLEL at a time). A
# stage that ended is marked OUT/STAGE.done and skipped on a rerun; the stages' own steps resume
# the same way (but runs/toy.sh's seeds, which restart: OVERWRITE=1).
#
#   bash runs/study.sh                                  # the two-hour study: out/*, docs/*
#   STAGES=all bash runs/study.sh                       # every stage
#   STAGES="estimators mixture" bash runs/study.sh      # some stages
#   SMOKE=1 OUT=/tmp/study DOCS=/tmp/study/docs SEED_LIST="0 1" STAGES=all bash runs/study.sh
#                                                       # the plumbing only: every step of every stage for two steps
set -euo pipefail
. "$(dirname "$0")/args.sh"
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
DOCS=${DOCS:-docs}
DEFAULT="worked_small estimators_small mixture_small scaling_short"
ALL="$DEFAULT worked estimators_worked mixture_worked scaling toy estimators mixture"
STAGES=${STAGES:-$DEFAULT}
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
small() {  # the 0.2M student's lane: its comparison, then the estimators and mixture on its S0 and teachers
  stage worked_small "$OUT/worked_small" env S0_PRESET=worked_small_base OUT="$OUT/worked_small" \
      DOCS="$DOCS/worked_small" bash runs/worked.sh
  stage estimators_small "$OUT/estimators_small" env PRESET=worked S0_PRESET=worked_small_base \
      REUSE="$OUT/worked_small" OTHER=$other OUT="$OUT/estimators_small" DOCS="$DOCS/estimators_small" \
      PARALLEL="$PAR" bash runs/estimators.sh
  stage mixture_small "$OUT/mixture_small" env PRESET=worked S0_PRESET=worked_small_base EST="$OUT/worked_small" \
      OUT="$OUT/mixture_small" DOCS="$DOCS/mixture_small" PARALLEL="$PAR" bash runs/mixture.sh
}
worked() {  # the 0.8M student's lane
  stage worked "$OUT/worked" env OUT="$OUT/worked" DOCS="$DOCS/worked" bash runs/worked.sh
  stage estimators_worked "$OUT/estimators_worked" env PRESET=worked REUSE="$OUT/worked" OTHER=$other \
      OUT="$OUT/estimators_worked" DOCS="$DOCS/estimators_worked" PARALLEL="$PAR" bash runs/estimators.sh
  stage mixture_worked "$OUT/mixture_worked" env PRESET=worked EST="$OUT/worked" OUT="$OUT/mixture_worked" \
      DOCS="$DOCS/mixture_worked" PARALLEL="$PAR" bash runs/mixture.sh
}
digit() {  # the digit toy's lane (not out/toy for `toy`: runs/toy.sh's own)
  stage toy "$OUT/toy_seeds" env PRESET=toy OUT="$OUT/toy_seeds" DOCS="$DOCS/toy" bash runs/worked.sh
  stage estimators "$OUT/estimators" env OUT="$OUT/estimators" DOCS="$DOCS/estimators" PARALLEL="$PAR" bash runs/estimators.sh
  stage mixture "$OUT/mixture" env EST="$OUT/estimators" OUT="$OUT/mixture" DOCS="$DOCS/mixture" PARALLEL="$PAR" \
      bash runs/mixture.sh
}
scaling_short() {
  stage scaling_short "$OUT/scaling_short" env STEPS=150 OUT="$OUT/scaling_short" DOCS="$DOCS/scaling_short" \
      PARALLEL="$PAR" bash runs/scaling.sh
}
scaling() { stage scaling "$OUT/scaling" env OUT="$OUT/scaling" DOCS="$DOCS/scaling" PARALLEL="$PAR" bash runs/scaling.sh; }
lanes=() fail=0
for lane in scaling_short small scaling worked digit; do  # a lane with no stage selected returns at once
  "$lane" & lanes+=($!)
done
for p in "${lanes[@]}"; do wait "$p" || fail=1; done
[ $fail = 0 ] || { say "a stage failed (above)"; exit 1; }
say "done: $(for name in $STAGES; do printf '%s ' "$DOCS/$name.md"; done)"
# what each stage cost (from its .done: wall seconds, runs trained, their CPU seconds)
echo "stage | wall (min) | runs | CPU (core-min)"
for name in $STAGES; do
  awk -v n="$name" '{ printf "%s | %.1f | %d | %.1f\n", n, $1 / 60, $2, $3 / 60 }' "$OUT/$name.done"  # each ended above
done
