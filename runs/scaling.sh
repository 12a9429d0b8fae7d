#!/usr/bin/env bash
# Teacher-count scaling (the paper leaves it open): MOPD with K = 2, 3, 4, 6, 8 toy domains,
# one RL teacher each, all from one S0; plots normalised retention against K.
#   bash runs/scaling.sh            (OUT=out/scaling; reuses OUT/base and OUT/teacher_* if present;
#                                    the MOPD runs of an earlier call are replaced: --overwrite=true)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/scaling}
KS=${KS:-"2 3 4 6 8"}
PY=${PY:-python}
SEED=${SEED:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
run() { local name=$1; shift; echo "== $name"; "$PY" "$@" > "$OUT/$name.txt" 2>&1 || { tail -20 "$OUT/$name.txt"; exit 1; }; }
kmax=$(echo $KS | tr ' ' '\n' | sort -n | tail -1)
all=$("$PY" -c "from tasks import TOY_DOMAINS; print(' '.join(TOY_DOMAINS[:$kmax]))")
[ -d "$OUT/base" ] || run base train_sft.py --preset=toy_base --seed=$SEED --out_dir=$OUT/base
for d in $all; do
  [ -d "$OUT/teacher_$d" ] || run teacher_$d train_teacher_rl.py --preset=toy --seed=$SEED --init=$OUT/base \
      --domains=$d --out_dir=$OUT/teacher_$d
done
results=()
for k in $KS; do
  doms=$("$PY" -c "from tasks import TOY_DOMAINS; print(','.join(TOY_DOMAINS[:$k]))")
  teachers=$(echo "$doms" | tr ',' '\n' | sed "s|.*|&=$OUT/teacher_&|" | paste -sd,)
  # same number of samples per domain at every K: prompts per step grow with K
  run mopd_k$k train_mopd.py --preset=toy --seed=$SEED --init=$OUT/base --domains=$doms --teacher=$teachers \
      --prompts_per_step=$((22 * k)) --out_dir=$OUT/mopd_k$k --overwrite=true
  run eval_k$k evaluate.py --domains=$doms --base=$OUT/base --teacher=$teachers --model=MOPD=$OUT/mopd_k$k \
      --out=$OUT/results_k$k
  results+=("$k=$OUT/results_k$k.json")
done
"$PY" - "$OUT" "${results[@]}" <<'PY'
import json, sys
out, items = sys.argv[1], sys.argv[2:]
rows = []
for it in items:
    k, path = it.split("=", 1)
    r = json.load(open(path))
    rows.append((int(k), r["normalised"]["MOPD"]["score"],
                 {d: r["normalised"]["MOPD"][d] for d in r["domains"]}))
lines = ["| teachers K | normalised retention (mean) | per domain |", "|---|---|---|"]
lines += [f"| {k} | {s:.3f} | " + ", ".join(f"{d} {v:.2f}" for d, v in per.items()) + " |" for k, s, per in rows]
open(f"{out}/scaling.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-")
    ax.axhline(1.0, ls="--", c="gray")
    ax.set_xlabel("number of teachers (domains)")
    ax.set_ylabel("MOPD normalised score")
    ax.set_title("MOPD retention vs teacher count (toy)")
    fig.tight_layout()
    fig.savefig(f"{out}/scaling.png", dpi=120)
except ImportError:
    print("matplotlib not installed: no plot")
PY
