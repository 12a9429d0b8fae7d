"""
The parameter-merging baselines: combine teachers without any training.

- Weight average:   theta = (1/D) sum_d T_d
- Task arithmetic:  theta = S0 + lambda * sum_d (T_d - S0),  lambda picked on a validation
  split (fresh training-distribution prompts, never the held-out eval split).

    python merge.py --mode=average --base=out/toy/base --teacher=rev=DIR,sort=DIR --out=out/toy/merge_avg
    python merge.py --mode=task_arithmetic --lambdas=0.3,0.5,0.7,1.0 --base=... --teacher=... --out=...
"""

import argparse
import random

import torch

from model import Transformer
from tasks import Domain, get_domains
from teachers import parse_registry


def average(models):
    """theta = (1/D) sum_d theta_d, parameter by parameter."""
    sds = [m.state_dict() for m in models]
    return {k: torch.stack([sd[k].float() for sd in sds]).mean(0) for k in sds[0]}


def task_arithmetic(base, models, lam):
    """theta = S0 + lambda * sum_d (T_d - S0)."""
    b = base.state_dict()
    sds = [m.state_dict() for m in models]
    return {k: b[k].float() + lam * sum(sd[k].float() - b[k].float() for sd in sds) for k in b}


def validation_domains(domains, n=200, seed=12345):
    """Each domain with eval_set replaced by n fresh *training* prompts (for choosing lambda)."""
    out = []
    for d in domains:
        rng = random.Random(seed)
        out.append(Domain(d.name, d.sample, [d.sample(rng) for _ in range(n)], d.reward, d.demo))
    return out


def main(argv=None):
    from transformers import AutoTokenizer

    from train_utils import evaluate
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["average", "task_arithmetic"], required=True)
    ap.add_argument("--base", required=True, help="S0, the checkpoint every teacher started from")
    ap.add_argument("--teacher", required=True, help="DOMAIN=DIR,... or a JSON file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lambdas", default="0.2,0.4,0.6,0.8,1.0", help="task arithmetic: candidates")
    ap.add_argument("--val_n", type=int, default=200, help="validation prompts per domain")
    ap.add_argument("--max_new_tokens", type=int, default=12)
    ap.add_argument("--data_dir", default=None)
    args = ap.parse_args(argv)
    reg = parse_registry(args.teacher)
    base = Transformer.from_pretrained(args.base, dtype=torch.float32)
    teachers = [Transformer.from_pretrained(reg[d], dtype=torch.float32) for d in reg]
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    for d, t in zip(reg, teachers):  # merging needs same-origin teachers: identical parameter shapes
        if {k: v.shape for k, v in t.state_dict().items()} != shapes:
            raise SystemExit(f"error: teacher {d!r} ({reg[d]}) has other parameters than the base {args.base}")
    merged = Transformer.from_pretrained(args.base, dtype=torch.float32)
    if args.mode == "average":
        merged.load_state_dict(average(teachers))
    else:
        tok = AutoTokenizer.from_pretrained(args.base)
        val = validation_domains(get_domains(list(reg), args.data_dir), args.val_n)
        best = None
        for lam in [float(x) for x in args.lambdas.split(",")]:
            merged.load_state_dict(task_arithmetic(base, teachers, lam))
            acc = evaluate(merged, tok, val, args.max_new_tokens)
            score = sum(acc.values()) / len(acc)
            print(f"lambda={lam}: validation " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()) + f" mean={score:.3f}")
            if best is None or score > best[0]:
                best = (score, lam)
        print(f"chosen lambda={best[1]}")
        merged.load_state_dict(task_arithmetic(base, teachers, best[1]))
        merged.config.extra["merge_lambda"] = best[1]
    merged.save_pretrained(args.out, tokenizer_dir=args.base)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
