"""
The estimator study's report (runs/estimators.sh): reads each seed's results.json and the MOPD
runs' metrics.jsonl under --out_dir, copies the numbers each table needs into
docs/estimators/seedN.json (so the tables regenerate from committed data: --from_docs=true),
and writes docs/estimators.md (mean ± sd over seeds) and docs/estimators.png:
- the held-out table (evaluate.aggregate): every estimator's normalised score;
- per-token KL: step 1's sampled estimate E_mu[log mu - log pi_T] per token, before any update
  (same-origin vs other-origin teachers: how far each teacher family starts from the student),
  and the last 10 steps' mean; the exact full-vocabulary KL on the steps that logged it;
- learning curves: normalised score at each periodic eval, against sampled responses.

    python runs/estimators_report.py --out_dir=out/estimators
    python runs/estimators_report.py --from_docs=true    # the committed per-seed files only
    python runs/estimators_report.py --out_dir=out/estimators_worked --docs=docs/estimators_worked --name=worked
    python runs/estimators_report.py --out_dir=out/more_arms --docs=docs/estimators_worked --name=worked --merge=true
"""

import glob
import json
import os
import statistics
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from checkpoint import write_text  # noqa: E402
from config import cli, parse_config  # noqa: E402
from evaluate import aggregate_runs, markdown, normalised, seed_sd  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out/estimators"  # runs/estimators.sh's OUT: seedN/results.json, seedN/mopd_*.log
    docs: str = "docs/estimators"    # per-seed files: DOCS/seedN.json; the report: DOCS.md, DOCS.png
    from_docs: bool = False          # rebuild the report from DOCS/seed*.json alone
    name: str = "toy"                # the preset studied, for the title: toy (the digit toy) or worked
    merge: bool = False              # add --out_dir's arms to the per-seed files in --docs: arms trained later
                                     #   from the same S0 and teachers (their evaluations must be equal)


VARIANTS = ["pg", "topk4", "topk16", "reverse_kl", "forward_kl", "jsd", "pg_other"]


def read_seed(d):
    """One seed's numbers: results.json, and per variant its per-step KL and periodic evals."""
    res = json.load(open(os.path.join(d, "results.json")))
    curves = {}
    for v in VARIANTS:
        path = os.path.join(d, f"mopd_{v}.log", "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [json.loads(line) for line in open(path)]
        curves[v] = [{"step": r["step"], "samples": r["samples"], "kl_est": r["kl_est"],
                      "kl_exact": _mean([b["kl_exact"] for b in r["by_domain"].values() if "kl_exact" in b]),
                      **({"eval": r["eval"]} if "eval" in r else {})} for r in rows]
    return {"results": res, "curves": curves}


LABELS = {v: f"MOPD {v}" for v in VARIANTS} | {"pg_other": "MOPD pg, other-origin teachers"}
OTHER_TEACHER = "other-origin teacher["  # runs/estimators.sh evaluates them beside the pg_other arm: they belong to it


def merge_seed(old, new):
    """old's numbers with new's arms added (or replaced), the arms in VARIANTS order (a new pg_other
    arm brings its other-origin teachers' rows, which replace old's). new must
    come from the same S0 and teachers: their held-out accuracies, evaluated again in new's run
    (every sample seeded), must equal old's exactly, else the two cannot share a table."""
    a, b = old["results"], new["results"]
    owned = lambda k: k in LABELS.values() or (k.startswith(OTHER_TEACHER) and "pg_other" in new["curves"])  # noqa: E731
    for label, acc in b["accuracy"].items():
        if not owned(label) and label in a["accuracy"] and acc != a["accuracy"][label]:
            raise ValueError(f"--merge: {label} differs from the committed run ({acc} vs {a['accuracy'][label]}): "
                             "not the same S0 and teachers")
    if (a["domains"], a["samples"]) != (b["domains"], b["samples"]):
        raise ValueError(f"--merge: domains/samples {b['domains']}/{b['samples']} vs {a['domains']}/{a['samples']}")
    keys = list(dict.fromkeys([*a["accuracy"], *b["accuracy"]]))
    arms = [LABELS[v] for v in VARIANTS if LABELS[v] in keys]
    first = min(keys.index(k) for k in arms)
    rest = [k for k in keys if k not in arms]
    keys = rest[:first] + arms + rest[first:]
    pick = lambda part, k: b[part][k] if k in b[part] else a[part][k]  # noqa: E731
    res = dict(a, accuracy={k: pick("accuracy", k) for k in keys}, normalised={k: pick("normalised", k) for k in keys})
    curves = {**old["curves"], **new["curves"]}
    return {"results": res, "curves": {v: curves[v] for v in VARIANTS if v in curves}}


def _mean(xs):
    return statistics.mean(xs) if xs else None


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f}" + (f" ± {seed_sd(xs):.3f}" if len(xs) > 1 else "")


def report(seeds, docs, name="toy"):
    names = sorted(seeds)
    agg = aggregate_runs([seeds[s]["results"] for s in names])
    toy = {"toy": "the digit toy", "worked": "the worked toy"}.get(name, name)
    text = (f"# Estimator study on {toy} ({len(names)} seeds: {', '.join(map(str, names))})\n\n"
            "## Held-out accuracy and normalised score\n\n" + markdown(agg))
    text += ("\n## Per-token KL to the routed teacher\n\n"
             "| variant | sampled KL at step 1 | sampled KL, last 10 steps | exact KL, first log | exact KL, last log |\n"
             "|---|---|---|---|---|\n")
    for v in VARIANTS:
        cs = [seeds[s]["curves"][v] for s in names if v in seeds[s]["curves"]]
        if not cs:
            continue
        ex = [[r["kl_exact"] for r in c if r["kl_exact"] is not None] for c in cs]
        text += (f"| {v} | {_ms([c[0]['kl_est'] for c in cs])} | "
                 f"{_ms([statistics.mean(r['kl_est'] for r in c[-10:]) for c in cs])} | "
                 f"{_ms([e[0] if e else None for e in ex])} | {_ms([e[-1] if e else None for e in ex])} |\n")
    text += "\n## Learning curves: normalised score at each periodic eval\n\n"
    steps = sorted({r["step"] for s in names for c in seeds[s]["curves"].values() for r in c if "eval" in r})
    text += "| variant | " + " | ".join(f"step {t}" for t in steps) + " |\n|---|" + "---|" * len(steps) + "\n"
    curves = {}
    for v in VARIANTS:
        per_step = {}
        for s in names:
            acc = seeds[s]["results"]["accuracy"]
            for r in seeds[s]["curves"].get(v, []):
                if "eval" in r:
                    score = normalised(r["eval"], acc["S0"], acc["RL teacher (own domain)"])[1]
                    per_step.setdefault(r["step"], []).append((r["samples"], score))
        if per_step:
            curves[v] = per_step
            text += f"| {v} | " + " | ".join(_ms([x[1] for x in per_step.get(t, [])]) for t in steps) + " |\n"
    write_text(docs + ".md", text)
    _chart(curves, seeds, names, docs + ".png")
    print(text)


def _chart(curves, seeds, names, path):
    from evaluate import pyplot
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for v in VARIANTS:
        cs = [seeds[s]["curves"][v] for s in names if v in seeds[s]["curves"]]
        if cs:  # the exact KL (every exact_kl_every steps): the sampled estimate is too noisy to read
            pts = {}
            for c in cs:
                for r in c:
                    if r["kl_exact"] is not None:
                        pts.setdefault(r["step"], []).append(r["kl_exact"])
            ts = sorted(pts)
            a.plot(ts, [statistics.mean(pts[t]) for t in ts], label=v, lw=1.2)
        if v in curves:
            ts = sorted(curves[v])
            m = [statistics.mean(x[1] for x in curves[v][t]) for t in ts]
            sd = [seed_sd([x[1] for x in curves[v][t]]) for t in ts]
            b.errorbar([curves[v][t][0][0] for t in ts], m, yerr=sd, label=v, capsize=2)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("exact per-token KL(student || teacher), mean of seeds")
    b.set_xlabel("sampled student responses")
    b.set_ylabel("normalised score (S0 = 0, teacher = 1)")
    b.set_ylim(bottom=0)
    b.axhline(1.0, ls="--", c="gray")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=110, format="png")
    os.replace(path + ".tmp", path)


def main(argv=None):
    cfg = parse_config(Config, argv)
    seeds = {}
    os.makedirs(cfg.docs, exist_ok=True)
    if cfg.from_docs:
        for p in sorted(glob.glob(f"{cfg.docs}/seed*.json")):
            seeds[int(os.path.basename(p)[4:-5])] = json.load(open(p))
    else:
        for d in sorted(glob.glob(f"{cfg.out_dir}/seed*/")):
            if os.path.exists(os.path.join(d, "results.json")):
                s = int(os.path.basename(d.rstrip("/"))[4:])
                seeds[s] = read_seed(d)
                if cfg.merge:
                    seeds[s] = merge_seed(json.load(open(f"{cfg.docs}/seed{s}.json")), seeds[s])
                write_text(f"{cfg.docs}/seed{s}.json", json.dumps(seeds[s]))
    if not seeds:
        raise ValueError(f"no seed*/results.json under {cfg.docs if cfg.from_docs else cfg.out_dir}")
    report(seeds, cfg.docs, cfg.name)


if __name__ == "__main__":
    cli(main)
