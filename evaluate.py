"""
Held-out evaluation and the paper's table: evaluate() (the held-out accuracy every training
script logs, and merge.py's validation score) and the command line that scores checkpoints.

    python evaluate.py --domains=rev,sort,uniq --base=out/toy/base \
        --teacher=rev=out/toy/teacher_rev,sort=... \
        --model=MOPD=out/toy/mopd --model=Mix-RL=out/toy/mixrl ... --out=out/toy/results
    python evaluate.py --aggregate out/seed0/results.json out/seed1/results.json --out=out/toy/results

Per-domain accuracy = pass@1: the mean reward of --samples (4) samples per prompt at T = 1 on the
domain's held-out split (evaluate below).
The paper's normalised score (SFT = 0, teacher = 1):
      norm_d = (acc_d(method) - acc_d(S0)) / (acc_d(teacher_d) - acc_d(S0)),  score = mean_d norm_d
The "RL teacher" row is each domain's own teacher on its own column (1.0 by definition).
Writes OUT.md (markdown table), OUT.json and OUT.png (bar chart; needs matplotlib, skipped
with a note when it is missing), each whole or not at all; existing ones are refused before
anything loads unless --overwrite=true. With --curve=NAME=metrics.jsonl it also reports sample
efficiency: the sampled responses a run needed until each domain first reached 90% of the
teacher headroom, from the run's periodic evals.
"""

import json
import math
import os
import statistics
import time
import zlib
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import distributed
from checkpoint import refuse_held, write_text, writable_parent
from config import cli, parse_config
from rollout import decode, encode_prompt, generate, show_progress, step_seed, stop_ids


@dataclass
class Config:
    out: str = ""                  # output prefix: OUT.md, OUT.json, OUT.png
    overwrite: bool = False        # replace the results OUT.* already holds
    # the table: every checkpoint on every domain's held-out split
    domains: str = ""              # tasks.get_domains spec, e.g. rev,sort,uniq
    base: str = ""                 # S0
    teacher: str = ""              # DOMAIN=DIR,... or a JSON file
    model: list[str] = field(default_factory=list)  # LABEL=DIR, one row of the table; repeat
    curve: list[str] = field(default_factory=list)  # LABEL=metrics.jsonl: sampled responses to reach 90%; repeat
    limit: int = 0                 # eval examples per domain (0 = all)
    samples: int = 4               # samples per held-out prompt (pass@1 = their mean reward)
    max_new_tokens: int = 12
    data_dir: str = ""             # where relative JSONL paths of real domains live
    # or: mean and sd over seeds
    aggregate: list[str] = field(default_factory=list)  # results.json files of several seeds (instead of the table)


PRESETS = {
    "toy": {},                             # runs/toy.sh: the digit puzzles
    "worked": dict(max_new_tokens=64),     # PRESET=worked runs/toy.sh: 20-50-token worked answers
    # SmolLM2-135M-Instruct (runs/smol.sh): 100 prompts x 2 samples per domain and checkpoint,
    # ~35 s each on 2 cores (4 samples would double the table's time)
    "smol": dict(limit=100, samples=2, max_new_tokens=48),
}
# refused as soon as the command line is read, before anything loads (config.check)
LIMITS = {"required": "out",
          "LABEL=PATH": "model curve",
          "exists": "aggregate",
          ">= 0": "limit",
          ">= 1": "max_new_tokens samples"}


# -----------------------------------------------------------------------------
# held-out accuracy

# Held-out accuracy is pass@1 of the policy itself: the mean reward of EVAL_SAMPLES samples per
# prompt at EVAL_TEMPERATURE (what RL and distillation optimise). Greedy decoding
# (temperature 0) can score a 51%-likely answer as 100% right and hide what training changed.
EVAL_TEMPERATURE = 1.0
EVAL_SAMPLES = 4


@torch.no_grad()
def evaluate(model, tok, domains, max_new_tokens, limit=None, batch=64, temperature=EVAL_TEMPERATURE,
             samples=EVAL_SAMPLES, seed=0, max_cache_bytes=None):
    """Mean reward of `model` on each domain's held-out split (seeded, so it is repeatable).
    Under torchrun each rank scores its slice; sample j of a domain's held-out prompt i always
    draws from the stream of (a hash of (seed, the domain's name), i, j), on any number of ranks,
    in any batch, and whichever other domains are evaluated. max_cache_bytes: generate's bound
    on one batch's KV cache (the trainers pass --rollout_cache_gib).
    With rollout.show_progress() (rank 0, stderr a terminal, or MOPD_PROGRESS=1): a bar over
    this rank's prompts of every domain, and generate's own bar over each batch's tokens."""
    was_training = model.training
    model.eval()
    n = 1 if temperature == 0 else samples
    per = max(1, batch // n)
    out = {}
    sets = [d.eval_set[:limit] if limit else d.eval_set for d in domains]
    progress = show_progress()  # off: the bar's methods do nothing
    bar = tqdm(total=sum(b - a for a, b in map(distributed.rank_range, map(len, sets))), desc="eval",
               unit="prompt", leave=False, disable=not progress)
    for d, exs in zip(domains, sets):
        a, b = distributed.rank_range(len(exs))
        mine = exs[a:b]
        bar.set_postfix_str(d.name)
        total = 0.0
        dseed = step_seed(seed, zlib.crc32(d.name.encode()))  # the hash of (seed, the domain's name)
        for s in range(0, per * distributed.global_max(-(-len(mine) // per)), per):
            chunk = mine[s:s + per] or mine[:1]  # past this rank's end: a dummy batch, not counted
            res = generate(model, [encode_prompt(tok, e.prompt) for e in chunk], max_new_tokens,
                           temperature=temperature, stop_token_ids=stop_ids(tok, model), n=n,
                           seed=dseed, first_prompt=a + s, pad_id=tok.pad_token_id or 0, progress=progress,
                           max_cache_bytes=max_cache_bytes)
            if s < len(mine):
                total += sum(d.reward(decode(tok, ids), chunk[i])
                             for ids, i in zip(res.response_ids, res.prompt_index))
                bar.update(len(chunk))
        total = distributed.all_sum(torch.tensor(total, dtype=torch.float64, device=res.tokens.device))
        out[d.name] = float(total) / (len(exs) * n)
    bar.close()
    model.train(was_training)
    return out

# -----------------------------------------------------------------------------
# the paper's table

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
    from model import Transformer, load_tokenizer
    from tasks import get_domains
    from teachers import parse_registry
    domains = get_domains(args.domains, args.data_dir or None)
    names = [d.name for d in domains]
    try:
        reg = parse_registry(args.teacher)
    except ValueError as e:
        raise ValueError(f"--teacher={args.teacher}: {e}") from None
    missing = [d for d in names if d not in reg]
    if missing:
        raise ValueError(f"--teacher={args.teacher}: no teacher for domain(s) {missing}")
    tok = load_tokenizer(args.base, "--base")

    def acc_of(label, path):  # one line per checkpoint as it is done: a real model takes minutes each
        t0 = time.time()
        m = Transformer.from_pretrained(path, dtype=torch.float32)
        acc = evaluate(m, tok, domains, args.max_new_tokens, limit=args.limit, samples=args.samples)
        print(f"{label}: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()) + f" ({time.time() - t0:.0f}s)",
              flush=True)
        return acc
    base = acc_of("S0", args.base)
    teacher_acc = {d: acc_of(f"teacher[{d}]", reg[d]) for d in names}  # every teacher on every domain
    teacher = {d: teacher_acc[d][d] for d in names}
    rows = {"S0": base}
    rows.update({f"teacher[{d}]": teacher_acc[d] for d in names})
    for spec in args.model:
        label, path = spec.split("=", 1)
        rows[label] = acc_of(label, path)
    rows["RL teacher (own domain)"] = teacher
    result = {"domains": names, "samples": args.samples, "accuracy": rows, "normalised": {}}
    for label, acc in rows.items():
        per, mean = normalised(acc, base, teacher)
        result["normalised"][label] = {**per, "score": mean}
    if args.curve:
        result["samples_to_90pct"] = {c.split("=", 1)[0]: samples_to_reach(c.split("=", 1)[1], base, teacher)
                                      for c in args.curve}
    return result


def aggregate(paths):
    """mean and sd over seeds of every number in several results.json files."""
    return aggregate_runs([json.load(open(p)) for p in paths])


def seed_sd(xs):
    """Sample sd over seeds; NaN where a seed's number is NaN (a normalised score whose teacher is
    no better than S0, as in a smoke run), which statistics.stdev cannot take."""
    if len(xs) < 2:
        return 0.0
    return float("nan") if any(math.isnan(x) for x in xs) else statistics.stdev(xs)


def aggregate_runs(runs):
    """aggregate() of results already loaded (dicts as evaluate_all returns them)."""
    samples = {r.get("samples", 4) for r in runs}
    if len(samples) > 1:
        raise ValueError(f"--aggregate: the runs drew different numbers of samples per prompt ({sorted(samples)})")
    out = {"domains": runs[0]["domains"], "seeds": len(runs), "samples": runs[0].get("samples", 4),
           "accuracy": {}, "normalised": {}, "sd": {}}
    for table in ("accuracy", "normalised"):
        for label in runs[0][table]:
            out[table][label] = {k: statistics.mean(r[table][label][k] for r in runs)
                                 for k in runs[0][table][label]}
            out["sd"].setdefault(table, {})[label] = {k: seed_sd([r[table][label][k] for r in runs])
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
        text += (f"\nmean ± sd over {res['seeds']} seeds; accuracy = pass@1 at T = 1 "
                 f"({res.get('samples', 4)} samples per held-out prompt).\n")
    if "samples_to_90pct" in res:
        text += "\nSampled responses until 90% of the teacher headroom (per domain; None = not reached):\n\n"
        for m, v in res["samples_to_90pct"].items():
            text += f"- {m}: " + ", ".join(f"{d}={x}" for d, x in v.items()) + "\n"
    return text


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed), or None, said once, without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)")
        return None
    return plt


def chart(res, path):
    plt = pyplot()
    if plt is None:
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
    fig.savefig(path + ".tmp", dpi=120, format="png")
    os.replace(path + ".tmp", path)  # never half a picture


def main(argv=None):
    args = parse_config(Config, argv, PRESETS, LIMITS)
    if not args.aggregate:
        for k in ("domains", "base", "teacher"):
            if not getattr(args, k):
                raise ValueError(f"--{k}: required (or --aggregate FILE...)")
    # before anything loads: results already there are replaced only with --overwrite=true
    # (checkpoint.py's rules for every output); the parent is made if it is missing
    held = [p for p in (args.out + ".json", args.out + ".md", args.out + ".png") if os.path.exists(p)]
    refuse_held(args.out, "--out", f"results ({', '.join(held)})" if held else "", args.overwrite,
                "--overwrite=true replaces them")
    writable_parent(args.out, "--out")
    res = aggregate(args.aggregate) if args.aggregate else evaluate_all(args)
    write_text(args.out + ".json", json.dumps(res, indent=2))
    text = markdown(res)
    write_text(args.out + ".md", text)
    chart(res, args.out + ".png")
    print(text)


if __name__ == "__main__":
    cli(main)
