"""
The matched-budget report of runs/toy.sh (issue 14): what each method cost, and its learning
curve on the budget axis the paper argues on.

Budgets, per seed, read from the runs' own logs (metrics.jsonl: cumulative `samples` and each
step's mean `response_len`): sampled responses and generated tokens of the method itself, and
the same with what it stands on. MOPD and the merges stand on the teachers' RL; off-policy FT
stands on the teachers' RL and on the teachers' answers it was trained on (OUT_DIR.log/
teacher_samples.jsonl, every answer generated, kept or not). MOPD's second round (the digit
toy's runs/toy.sh) stands on the first round's whole budget and its own new teachers' RL.
Mix-RL and Cascade RL stand on nothing but S0, which every method shares (not counted).

Learning curves: the normalised score (S0 = 0, teacher = 1, mean over domains) at every
in-training eval of MOPD and Mix-RL, against the total sampled responses so far (MOPD's
x starts at the teachers' total). S0 and the teachers are measured for it exactly as those
evals are (evaluate.evaluate, the trainers' eval_limit and max_new_tokens, T = 1), so a curve
and its normaliser are one measurement. The end-of-run table is evaluate.py's (results.json).

Writes docs/NAME/seedN.json (the numbers), docs/NAME.md and docs/NAME.png;
--from_docs=true rebuilds both from the committed seed files alone.

    python runs/toy_report.py --out_dir=out/worked --run_preset=worked --name=worked
    python runs/toy_report.py --out_dir=out/toy_seeds --run_preset=toy --name=toy
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
    out_dir: str = "out/worked"   # runs/toy.sh's OUT (seedN/...)
    run_preset: str = "worked"    # the runs' preset: the in-training evals' settings come from it
    name: str = "worked"          # docs/NAME.md, docs/NAME.png, docs/NAME/seedN.json
    from_docs: bool = False       # rebuild from docs/NAME/seed*.json only
    docs: str = ""                # where: DOCS.md, DOCS.png, DOCS/seedN.json ("" = docs/NAME)


def rows(log):
    return [json.loads(line) for line in open(os.path.join(log + ".log", "metrics.jsonl"))]


def spend(log):
    """(sampled responses, generated tokens) of one RL or MOPD run, from its metrics."""
    rs, prev, tokens = rows(log), 0, 0.0
    for r in rs:
        tokens += (r["samples"] - prev) * r["response_len"]
        prev = r["samples"]
    return prev, round(tokens)


def add(*xs):
    return tuple(map(sum, zip(*xs)))


def eval_settings(run_preset, limit=0):
    """What the in-training evals of train_mopd.py --preset=RUN_PRESET use (max_new_tokens and
    the eval limit; limit > 0 overrides it, as a smoke run's --eval_limit does)."""
    import train_mopd
    mc = parse_config(train_mopd.Config, [f"--preset={run_preset}"], train_mopd.PRESETS)
    return dict(max_new_tokens=mc.max_new_tokens, limit=limit or mc.eval_limit)


def s0_and_teachers(d, domains, run_preset, limit=0):
    """S0's accuracy on every domain and each teacher's on its own (d/base, d/teacher_D), measured
    as the in-training evals are, so that the runs' eval curves normalise against them."""
    import evaluate
    from model import Transformer, load_tokenizer
    from tasks import get_domains
    kw, doms = eval_settings(run_preset, limit), get_domains(",".join(domains))
    tok = load_tokenizer(os.path.join(d, "base"))
    base = evaluate.evaluate(Transformer.from_pretrained(os.path.join(d, "base")), tok, doms, **kw)
    teacher = {t.name: evaluate.evaluate(Transformer.from_pretrained(os.path.join(d, f"teacher_{t.name}")), tok,
                                         [t], **kw)[t.name] for t in doms}
    return base, teacher


def measure_seed(cfg, seed, domains):
    import evaluate
    from model import load_tokenizer
    o = os.path.join(cfg.out_dir, f"seed{seed}")
    res = json.load(open(os.path.join(o, "results.json")))
    teachers = add(*[spend(os.path.join(o, f"teacher_{d}")) for d in domains])
    answers = [json.loads(line) for line in open(os.path.join(o, "offpolicy.log", "teacher_samples.jsonl"))]
    tok = load_tokenizer(os.path.join(o, "base"))
    gen = (len(answers), sum(len(tok.encode(a["response"], add_special_tokens=False)) + 1 for a in answers))
    budget = {  # (own responses, own tokens, responses with what it stands on, tokens with it)
        "MOPD": spend(os.path.join(o, "mopd")) + add(spend(os.path.join(o, "mopd")), teachers),
        "Mix-RL": spend(os.path.join(o, "mixrl")) * 2,
        "Cascade RL": add(*[spend(os.path.join(o, f"cascade_{d}")) for d in domains]) * 2,
        "Off-policy FT": gen + add(gen, teachers),
        "Weight average": (0, 0) + teachers,
        "Task arithmetic": (0, 0) + teachers,
        "RL teacher (own domain)": teachers * 2,
    }
    if os.path.isdir(os.path.join(o, "mopd2")):  # round 2: the MOPD student's new teachers, then MOPD again
        teachers2 = add(*[spend(os.path.join(o, f"teacher2_{d}")) for d in domains])
        budget["MOPD round 2"] = spend(os.path.join(o, "mopd2")) + add(spend(os.path.join(o, "mopd2")),
                                                                         budget["MOPD"][2:], teachers2)
    base, teacher = s0_and_teachers(o, domains, cfg.run_preset)
    curves = {}
    for label, log, x0 in (("MOPD", "mopd", teachers[0]), ("Mix-RL", "mixrl", 0)):
        curves[label] = [(x0 + r["samples"], evaluate.normalised(r["eval"], base, teacher)[1])
                         for r in rows(os.path.join(o, log)) if "eval" in r]
    return {"seed": seed, "results": res, "budget": budget, "curve_S0": base, "curve_teacher": teacher,
            "curves": curves}


def mean_sd(xs):
    from evaluate import seed_sd  # NaN-safe (a smoke run's scores)
    return statistics.mean(xs), seed_sd(list(xs))


def write_md(seeds, domains):
    import evaluate
    agg = evaluate.aggregate_runs([s["results"] for s in seeds])
    n = len(seeds)
    lines = [f"# The paper's comparison at matched budgets ({n} seed{'s' * (n > 1)}: "
             f"{', '.join(str(s['seed']) for s in seeds)})", "",
             "Accuracy = pass@1 at T = 1 on 200 held-out prompts per domain (evaluate.py, 4 samples each); "
             "normalised = (x - S0) / (teacher - S0), mean over domains; mean ± sd over seeds. "
             "Budgets: sampled responses and generated tokens, the method's own and with what it stands on "
             "(the teachers' RL for MOPD, the merges and off-policy FT; the teachers' answers for off-policy FT).", "",
             "| method | " + " | ".join(domains) + " | normalised | own responses | own tokens | "
             "responses incl. teachers | tokens incl. teachers |", "|---|" + "---|" * (len(domains) + 5)]
    sd = agg["sd"]
    for label in agg["accuracy"]:
        if label.startswith("teacher["):
            continue
        cells = [f"{agg['accuracy'][label][d]:.3f} ± {sd['accuracy'][label][d]:.3f}" for d in domains]
        score = f"{agg['normalised'][label]['score']:.3f} ± {sd['normalised'][label]['score']:.3f}"
        b = seeds[0]["budget"].get(label)
        if b is None:
            spent = ["-"] * 4
        else:
            spent = [f"{mean_sd([s['budget'][label][i] for s in seeds])[0]:,.0f}" for i in range(4)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {score} | " + " | ".join(spent) + " |")
    lines += ["", "Per seed, normalised: " + "; ".join(
        f"{label} " + " / ".join(f"{s['results']['normalised'][label]['score']:.3f}" for s in seeds)
        for label in agg["accuracy"] if not label.startswith("teacher[") and label not in ("S0",))]
    lines += ["", "Learning curves (normalised score at each in-training eval vs all sampled responses so far, "
              "MOPD's x starting at the teachers' total; S0 and teachers re-measured as those evals are):", "",
              "| responses incl. teachers | MOPD | Mix-RL |", "|---:|---|---|"]
    pts = {}
    for label in ("MOPD", "Mix-RL"):
        for i, (x, _) in enumerate(seeds[0]["curves"][label]):
            ys = [s["curves"][label][i][1] for s in seeds if i < len(s["curves"][label])]
            m, d = mean_sd(ys)
            pts.setdefault(x, {})[label] = f"{m:.3f} ± {d:.3f}"
    for x in sorted(pts):
        lines.append(f"| {x:,} | {pts[x].get('MOPD', '')} | {pts[x].get('Mix-RL', '')} |")
    return "\n".join(lines) + "\n"


def chart(seeds, path):
    from evaluate import pyplot
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, c in (("MOPD", "C1"), ("Mix-RL", "C0")):
        xs = [x for x, _ in seeds[0]["curves"][label]]
        k = min(len(s["curves"][label]) for s in seeds)
        ms = [mean_sd([s["curves"][label][i][1] for s in seeds]) for i in range(k)]
        ax.errorbar(xs[:k], [m for m, _ in ms], yerr=[d for _, d in ms], color=c, label=label, capsize=2)
    for label, mk, c in (("Off-policy FT", "s", "C2"), ("Cascade RL", "^", "C3"), ("Weight average", "v", "C4"),
                         ("Task arithmetic", "D", "C5")):
        x = statistics.mean(s["budget"][label][2] for s in seeds)
        m, d = mean_sd([s["results"]["normalised"][label]["score"] for s in seeds])
        ax.errorbar([x], [m], yerr=[d], fmt=mk, color=c, label=label, capsize=2)
    ax.axhline(1.0, ls="--", c="gray", lw=0.8)
    ax.axhline(0.0, ls=":", c="gray", lw=0.8)
    ax.set_xlabel("sampled responses, incl. the teachers' RL")
    ax.set_ylabel("normalised score (S0 = 0, teacher = 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    cfg = parse_config(Config, argv)
    d = cfg.docs or os.path.join(DOCS, cfg.name)
    os.makedirs(d, exist_ok=True)
    if cfg.from_docs:
        seeds = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f.startswith("seed")]
    else:
        seeds = []
        for name in sorted(os.listdir(cfg.out_dir)):
            if name.startswith("seed") and os.path.isfile(os.path.join(cfg.out_dir, name, "results.json")):
                domains = json.load(open(os.path.join(cfg.out_dir, name, "results.json")))["domains"]
                s = measure_seed(cfg, int(name[4:]), domains)
                with open(os.path.join(d, f"{name}.json"), "w") as f:
                    json.dump(s, f, indent=1)
                seeds.append(s)
    if not seeds:
        raise ValueError(f"--out_dir={cfg.out_dir}: no seedN/results.json (run runs/toy.sh first)")
    md = write_md(seeds, seeds[0]["results"]["domains"])
    with open(d + ".md", "w") as f:
        f.write(md)
    chart(seeds, d + ".png")
    print(md)


if __name__ == "__main__":
    cli(main)
