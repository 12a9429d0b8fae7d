"""
The report of runs/mixture.sh: headroom-adaptive vs fixed domain mixture in MOPD.

Per seed: S0's and each teacher's held-out accuracy on its own domain, measured exactly as the
training runs' evals are (evaluate.evaluate, the same limit, samples and max_new_tokens), then
from each MOPD run's eval curve (every 10 steps) the samples until *every* domain is at
>= 90% of its headroom at once (S0 + 0.9 (T - S0)), and each domain's own first crossing.
Writes docs/mixture/seedN.json (the numbers) and docs/mixture.md (mean +- sd over seeds);
--from_docs=true rebuilds the table from those committed files alone.

    python runs/mixture_report.py --out_dir=out/mixture --est_dir=out/estimators
    python runs/mixture_report.py --out_dir=out/mixture_worked --est_dir=out/worked --run_preset=worked \
        --domains=add,mul,isort --docs=docs/mixture_worked
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
FRAC = 0.9


@dataclass
class Config:
    out_dir: str = "out/mixture"     # runs/mixture.sh's OUT (seedN/mopd_{fixed,adaptive})
    est_dir: str = "out/estimators"  # where S0 and the teachers are (seedN/base, seedN/teacher_D)
    domains: str = "rev,sort,inc"
    run_preset: str = "toy"          # train_mopd.py's preset the runs used (its eval limit and max_new_tokens)
    from_docs: bool = False          # rebuild docs/mixture.md from docs/mixture/seed*.json only
    docs: str = DOCS + "/mixture"    # per-seed files: DOCS/seedN.json; the table: DOCS.md
    eval_limit: int = 0              # the runs' --eval_limit, if not train_mopd's default (a smoke run's)


def curve(log):
    return [json.loads(line) for line in open(log) if '"eval"' in line]


def first_all(rows, need):
    """Samples at the first eval where every domain is at or above its need; None if never."""
    for r in rows:
        if all(r["eval"].get(d, -1) >= v for d, v in need.items()):
            return r["samples"]
    return None


def first_each(rows, need):
    return {d: next((r["samples"] for r in rows if r["eval"].get(d, -1) >= v), None) for d, v in need.items()}


def measure_seed(cfg, seed):
    from toy_report import s0_and_teachers  # runs/: the same measurement as the comparison's report
    base, teacher = s0_and_teachers(os.path.join(cfg.est_dir, f"seed{seed}"), cfg.domains.split(","), cfg.run_preset,
                                    cfg.eval_limit)
    need = {d: base[d] + FRAC * (teacher[d] - base[d]) for d in teacher}
    out = {"seed": seed, "S0": base, "teacher": teacher, "need": need, "runs": {}}
    for mix in ("fixed", "adaptive"):
        log = os.path.join(cfg.out_dir, f"seed{seed}", f"mopd_{mix}.log", "metrics.jsonl")
        rows = curve(log)
        out["runs"][mix] = {"samples_all": first_all(rows, need), "samples_each": first_each(rows, need),
                            "final": rows[-1]["eval"], "steps": rows[-1]["step"],
                            "curve": [(r["samples"], r["eval"]) for r in rows]}
    return out


def fmt(xs):
    """Mean ± sd of the seeds that got there; where some never did, how many did (a mean over the
    fast seeds alone would flatter the mixture)."""
    got = [x for x in xs if x is not None]
    if not got:
        return "never"
    s = f"{statistics.mean(got):,.0f} ± {seed_sd(got):,.0f}" if len(got) > 1 else f"{got[0]:,}"
    return s if len(got) == len(xs) else f"{s} ({len(got)} of {len(xs)} seeds)"


def write_md(seeds, domains, title="the digit toy"):
    c = seeds[0]["runs"]["fixed"]["curve"]
    every = f"{c[1][0] - c[0][0]:,} samples" if len(c) > 1 else "one eval"
    lines = [f"# Adaptive vs fixed domain mixture on {title} (runs/mixture.sh)", "",
             f"Samples (sampled responses) until every domain is at >= {FRAC:.0%} of its headroom at once "
             f"(S0 + {FRAC} (teacher - S0), held-out evals every {every}); mean ± sd over "
             f"{len(seeds)} seeds; 'never' if not within the run.", "",
             "| mixture | samples to 90% (all domains) | per seed | " + " | ".join(f"{d} first" for d in domains)
             + " |", "|---|---|---|" + "---|" * len(domains)]
    for mix in ("fixed", "adaptive"):
        per = [s["runs"][mix]["samples_all"] for s in seeds]
        each = [fmt([s["runs"][mix]["samples_each"][d] for s in seeds]) for d in domains]
        lines.append(f"| {mix} | {fmt(per)} | {', '.join('never' if x is None else f'{x:,}' for x in per)} | "
                     + " | ".join(each) + " |")
    lines += ["", "| seed | " + " | ".join(f"S0 / teacher {d}" for d in domains) + " |",
              "|---|" + "---|" * len(domains)]
    for s in seeds:
        lines.append(f"| {s['seed']} | " + " | ".join(f"{s['S0'][d]:.3f} / {s['teacher'][d]:.3f}" for d in domains)
                     + " |")
    lines += ["", "Final held-out accuracy (last eval):", "", "| mixture | seed | " + " | ".join(domains) + " |",
              "|---|---|" + "---|" * len(domains)]
    for mix in ("fixed", "adaptive"):
        for s in seeds:
            lines.append(f"| {mix} | {s['seed']} | " + " | ".join(f"{s['runs'][mix]['final'][d]:.3f}" for d in domains)
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = parse_config(Config, argv)
    domains = cfg.domains.split(",")
    os.makedirs(cfg.docs, exist_ok=True)
    if cfg.from_docs:
        files = sorted(f for f in os.listdir(cfg.docs) if f.startswith("seed"))
        seeds = [json.load(open(os.path.join(cfg.docs, f))) for f in files]
    else:
        seeds = []
        for name in sorted(os.listdir(cfg.out_dir)):
            if name.startswith("seed") and os.path.isdir(os.path.join(cfg.out_dir, name)):
                s = measure_seed(cfg, int(name[4:]))
                with open(os.path.join(cfg.docs, f"{name}.json"), "w") as f:
                    json.dump(s, f, indent=1)
                seeds.append(s)
    md = write_md(seeds, domains, {"toy": "the digit toy", "worked": "the worked toy"}.get(cfg.run_preset, cfg.run_preset))
    with open(cfg.docs + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    cli(main)
