"""
The report of runs/scaling.sh: MOPD's normalised retention against the number of teachers K,
mean +- sd over seeds, as a table (docs/scaling.md) and a chart with error bars on an axis
from 0 (docs/scaling.png); each seed's numbers go to docs/scaling/seedN.json, from which
--from_docs=true rebuilds both.

    python runs/scaling_report.py --out_dir=out/scaling --ks="2 4 8"
"""
import json
import os
import statistics
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import cli, parse_config  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@dataclass
class Config:
    out_dir: str = "out/scaling"   # runs/scaling.sh's OUT (seedN/results_kK.json)
    ks: str = "2 4 8"              # the teacher counts, as runs/scaling.sh's KS
    from_docs: bool = False        # rebuild from docs/scaling/seed*.json only


def main(argv=None):
    cfg = parse_config(Config, argv)
    ks = [int(k) for k in cfg.ks.split()]
    folder = os.path.join(DOCS, "scaling")
    os.makedirs(folder, exist_ok=True)
    if cfg.from_docs:
        seeds = [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.startswith("seed")]
    else:
        seeds = []
        for name in sorted(n for n in os.listdir(cfg.out_dir) if n.startswith("seed")):
            per = {}
            for k in ks:
                r = json.load(open(os.path.join(cfg.out_dir, name, f"results_k{k}.json")))
                per[str(k)] = {"score": r["normalised"]["MOPD"]["score"],
                               "domains": {d: r["normalised"]["MOPD"][d] for d in r["domains"]}}
            s = {"seed": int(name[4:]), "mopd": per}
            json.dump(s, open(os.path.join(folder, f"{name}.json"), "w"), indent=1)
            seeds.append(s)
    rows = []
    for k in ks:
        xs = [s["mopd"][str(k)]["score"] for s in seeds]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        rows.append((k, statistics.mean(xs), sd, xs))
    lines = [f"MOPD normalised retention vs number of teachers K ({len(seeds)} seeds, mean ± sd)", "",
             "| teachers K | normalised score | per seed |", "|---|---|---|"]
    lines += [f"| {k} | {m:.3f} ± {sd:.3f} | {', '.join(f'{x:.3f}' for x in xs)} |" for k, m, sd, xs in rows]
    md = "\n".join(lines) + "\n"
    open(os.path.join(DOCS, "scaling.md"), "w").write(md)
    print(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] for r in rows], fmt="o-", capsize=4)
    ax.axhline(1.0, ls="--", c="gray")
    ax.set_ylim(0, 1.15)
    ax.set_xticks(ks)
    ax.set_xlabel("number of teachers (domains) K")
    ax.set_ylabel("MOPD normalised score")
    ax.set_title(f"MOPD retention vs teacher count (toy, {len(seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "scaling.png"), dpi=120)


if __name__ == "__main__":
    cli(main)
