"""
The report of runs/scaling.sh: MOPD's normalised retention against the number of teachers K,
mean +- sd over seeds, as a table (docs/scaling.md) and a chart with error bars on an axis
from 0 (docs/scaling.png); each seed's numbers go to docs/scaling/seedN.json, from which
--from_docs=true rebuilds both.

    python runs/scaling_report.py --out_dir=out/scaling --ks="2 4 8 16"
"""
import json
import os
import statistics
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import cli, parse_config  # noqa: E402
from evaluate import seed_sd  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@dataclass
class Config:
    out_dir: str = "out/scaling"   # runs/scaling.sh's OUT (seedN/results_kK.json)
    ks: str = "2 4 8 16"           # the teacher counts, as runs/scaling.sh's KS
    from_docs: bool = False        # rebuild from docs/scaling/seed*.json only
    docs: str = DOCS + "/scaling"  # per-seed files: DOCS/seedN.json; the report: DOCS.md, DOCS.png


def main(argv=None):
    cfg = parse_config(Config, argv)
    ks = [int(k) for k in cfg.ks.split()]
    folder = cfg.docs
    os.makedirs(folder, exist_ok=True)
    if cfg.from_docs:
        seeds = [json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.startswith("seed")]
    else:
        seeds = []
        for name in sorted(n for n in os.listdir(cfg.out_dir) if n.startswith("seed")):
            s = {"seed": int(name[4:])}
            res = {k: json.load(open(os.path.join(cfg.out_dir, name, f"results_k{k}.json"))) for k in ks}
            for method, key in (("MOPD", "mopd"), ("Mix-RL", "mixrl")):
                per = {}
                for k, r in res.items():
                    if method in r["normalised"]:
                        per[str(k)] = {"score": r["normalised"][method]["score"],
                                       "domains": {d: r["normalised"][method][d] for d in r["domains"]}}
                if per:
                    s[key] = per
            r = res[max(ks)]
            acc = r["accuracy"]  # the largest K's accuracies: S0, each domain's own teacher, both students
            s["accuracy"] = {label: {d: acc[src][d] for d in r["domains"]} for label, src in
                             (("S0", "S0"), ("teacher", "RL teacher (own domain)"), ("MOPD", "MOPD"), ("Mix-RL", "Mix-RL"))
                             if src in acc}
            json.dump(s, open(os.path.join(folder, f"{name}.json"), "w"), indent=1)
            seeds.append(s)
    methods = [(key, label) for key, label in (("mopd", "MOPD"), ("mixrl", "Mix-RL")) if all(key in x for x in seeds)]
    rows = {}
    for key, _ in methods:
        rows[key] = []
        for k in ks:
            xs = [x[key][str(k)]["score"] for x in seeds]
            rows[key].append((k, statistics.mean(xs), seed_sd(xs), xs))
    lines = [f"Normalised retention vs number of teachers K ({len(seeds)} seeds, mean ± sd)", "",
             "| method | teachers K | normalised score | per seed |", "|---|---|---|---|"]
    lines += [f"| {label} | {k} | {m:.3f} ± {sd:.3f} | {', '.join(f'{x:.3f}' for x in xs)} |"
              for key, label in methods for k, m, sd, xs in rows[key]]
    if all("accuracy" in x for x in seeds):  # where the domains compete: accuracy per domain at the largest K
        labels = [label for label in seeds[0]["accuracy"] if all(label in x["accuracy"] for x in seeds)]
        doms = list(seeds[0]["accuracy"]["S0"])
        lines += ["", f"Accuracy per domain at K = {max(ks)} (pass@1, mean over {len(seeds)} seeds)", "",
                  "| | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        lines += [f"| {label} | " + " | ".join(f"{statistics.mean(x['accuracy'][label][d] for x in seeds):.3f}" for d in doms)
                  + " |" for label in labels]
    md = "\n".join(lines) + "\n"
    open(cfg.docs + ".md", "w").write(md)
    print(md)
    from evaluate import pyplot
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in methods:
        r = rows[key]
        ax.errorbar([x[0] for x in r], [x[1] for x in r], yerr=[x[2] for x in r], fmt="o-", capsize=4, label=label)
    ax.legend(loc="lower left")
    ax.axhline(1.0, ls="--", c="gray")
    ax.set_ylim(0, 1.15)
    ax.set_xticks(ks)
    ax.set_xlabel("number of teachers (domains) K")
    ax.set_ylabel("normalised score")
    ax.set_title(f"Retention vs teacher count (toy, {len(seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(cfg.docs + ".png", dpi=120)


if __name__ == "__main__":
    cli(main)
