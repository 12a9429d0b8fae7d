"""
Held-out evaluation and the paper's table.

    python evaluate.py --domains=rev,sort,uniq --base=out/toy/base \
        --teacher=rev=out/toy/teacher_rev,sort=... \
        --model=MOPD=out/toy/mopd --model=Mix-RL=out/toy/mixrl ... --out=out/toy/results
    python evaluate.py --aggregate out/seed0/results.json out/seed1/results.json --out=out/toy/results

Per-domain accuracy = pass@1: the mean reward of 4 samples per prompt at T = 1 on the
domain's held-out split (train_utils.evaluate).
The paper's normalised score (SFT = 0, teacher = 1):
      norm_d = (acc_d(method) - acc_d(S0)) / (acc_d(teacher_d) - acc_d(S0)),  score = mean_d norm_d
The "RL teacher" row is each domain's own teacher on its own column (1.0 by definition).
Writes OUT.md (markdown table), OUT.json and OUT.png (bar chart; needs matplotlib, skipped
with a note when it is missing). With --curve=NAME=metrics.jsonl it also reports sample
efficiency: the sampled responses a run needed until each domain first reached 90% of the
teacher headroom, from the run's periodic evals.
"""

import argparse
import json
import os
import statistics

import torch


def normalised(acc, base, teacher):
    """(x - S0) / (teacher - S0) per domain, and their mean."""
    per = {d: (acc[d] - base[d]) / (teacher[d] - base[d]) if teacher[d] != base[d] else float("nan")
           for d in teacher}
    return per, sum(per.values()) / len(per)


def samples_to_reach(curve_path, base, teacher, frac=0.9):
    """First `samples` count at which each domain's eval reached S0 + frac * (T - S0), else None."""
    need = {d: base[d] + frac * (teacher[d] - base[d]) for d in teacher}
    out = {d: None for d in teacher}
    for line in open(curve_path):
        row = json.loads(line)
        for d, acc in row.get("eval", {}).items():
            if d in out and out[d] is None and acc >= need[d]:
                out[d] = row.get("samples")
    return out


def evaluate_all(args):
    from transformers import AutoTokenizer

    from model import Transformer
    from tasks import get_domains
    from teachers import parse_registry
    from train_utils import evaluate
    domains = get_domains(args.domains, args.data_dir)
    names = [d.name for d in domains]
    reg = parse_registry(args.teacher)
    tok = AutoTokenizer.from_pretrained(args.base)

    def acc_of(path):
        m = Transformer.from_pretrained(path, dtype=torch.float32)
        return evaluate(m, tok, domains, args.max_new_tokens, limit=args.limit)
    base = acc_of(args.base)
    teacher_acc = {d: acc_of(reg[d]) for d in names}  # every teacher on every domain (for the table)
    teacher = {d: teacher_acc[d][d] for d in names}
    rows = {"S0": base}
    rows.update({f"teacher[{d}]": teacher_acc[d] for d in names})
    for spec in args.model:
        label, path = spec.split("=", 1)
        rows[label] = acc_of(path)
        print(f"{label}: " + " ".join(f"{k}={v:.3f}" for k, v in rows[label].items()))
    rows["RL teacher (own domain)"] = teacher
    result = {"domains": names, "accuracy": rows, "normalised": {}}
    for label, acc in rows.items():
        per, mean = normalised(acc, base, teacher)
        result["normalised"][label] = {**per, "score": mean}
    if args.curve:
        result["samples_to_90pct"] = {c.split("=", 1)[0]: samples_to_reach(c.split("=", 1)[1], base, teacher)
                                      for c in args.curve}
    return result


def aggregate(paths):
    """mean and sd over seeds of every number in several results.json files."""
    runs = [json.load(open(p)) for p in paths]
    out = {"domains": runs[0]["domains"], "seeds": len(runs), "accuracy": {}, "normalised": {}, "sd": {}}
    for table in ("accuracy", "normalised"):
        for label in runs[0][table]:
            out[table][label] = {k: statistics.mean(r[table][label][k] for r in runs)
                                 for k in runs[0][table][label]}
            out["sd"].setdefault(table, {})[label] = {
                k: statistics.stdev(r[table][label][k] for r in runs) if len(runs) > 1 else 0.0
                for k in runs[0][table][label]}
    if "samples_to_90pct" in runs[0]:
        out["samples_to_90pct"] = {m: {d: [r["samples_to_90pct"][m][d] for r in runs] for d in v}
                                   for m, v in runs[0]["samples_to_90pct"].items()}
    return out


def markdown(res):
    names = res["domains"]
    sd = res.get("sd", {})

    def cell(table, label, k):
        v = res[table][label][k]
        s = sd.get(table, {}).get(label, {}).get(k)
        return f"{v:.3f}" + (f" ± {s:.3f}" if s is not None and res.get("seeds", 1) > 1 else "")
    head = "| method | " + " | ".join(names) + " | normalised |\n|---|" + "---|" * (len(names) + 1) + "\n"
    lines = []
    for label in res["accuracy"]:
        lines.append(f"| {label} | " + " | ".join(cell("accuracy", label, d) for d in names)
                     + f" | {cell('normalised', label, 'score')} |")
    text = head + "\n".join(lines) + "\n"
    if res.get("seeds", 1) > 1:
        text += f"\nmean ± sd over {res['seeds']} seeds; accuracy = pass@1 at T = 1 (4 samples per held-out prompt).\n"
    if "samples_to_90pct" in res:
        text += "\nSampled responses until 90% of the teacher headroom (per domain; None = not reached):\n\n"
        for m, v in res["samples_to_90pct"].items():
            text += f"- {m}: " + ", ".join(f"{d}={x}" for d, x in v.items()) + "\n"
    return text


def chart(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)")
        return
    labels = [l for l in res["normalised"] if not l.startswith("teacher[")]
    vals = [res["normalised"][l]["score"] for l in labels]
    errs = [res.get("sd", {}).get("normalised", {}).get(l, {}).get("score", 0.0) for l in labels]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(labels)), vals, yerr=errs, color=["C1" if l == "MOPD" else "C0" for l in labels])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.axhline(1.0, ls="--", c="gray")
    ax.set_ylabel("normalised score (S0 = 0, teacher = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Per-domain held-out accuracy and the normalised score.")
    ap.add_argument("--domains", help="tasks.get_domains spec")
    ap.add_argument("--base", help="S0")
    ap.add_argument("--teacher", help="DOMAIN=DIR,... or a JSON file")
    ap.add_argument("--model", action="append", default=[], help="LABEL=DIR; repeat")
    ap.add_argument("--curve", action="append", default=[], help="LABEL=metrics.jsonl for sample efficiency")
    ap.add_argument("--aggregate", nargs="+", help="results.json files of several seeds")
    ap.add_argument("--out", required=True, help="output prefix: OUT.md, OUT.json, OUT.png")
    ap.add_argument("--limit", type=int, default=None, help="eval examples per domain (default: all)")
    ap.add_argument("--max_new_tokens", type=int, default=12)
    ap.add_argument("--data_dir", default=None)
    args = ap.parse_args(argv)
    if args.aggregate:
        res = aggregate(args.aggregate)
    else:
        if not (args.domains and args.base and args.teacher):
            raise SystemExit("error: --domains, --base and --teacher are required (or --aggregate)")
        res = evaluate_all(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    text = markdown(res)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    chart(res, args.out + ".png")
    print(text)


if __name__ == "__main__":
    main()
