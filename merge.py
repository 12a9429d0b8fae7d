"""
The parameter-merging baselines: combine teachers without any training.

- Weight average:   theta = (1/D) sum_d T_d
- Task arithmetic:  theta = S0 + lambda * sum_d (T_d - S0),  lambda picked on a validation
  split (fresh training-distribution prompts, never the held-out eval split).

    python merge.py --mode=average --base=out/toy/base --teacher=rev=DIR,sort=DIR --out=out/toy/merge_avg
    python merge.py --mode=task_arithmetic --lambdas=0.3,0.5,0.7,1.0 --base=... --teacher=... --out=...
    python merge.py --preset=smol --mode=task_arithmetic --domains=arith=math:A.jsonl,if=if:I.jsonl ...  # real domains

--out is written beside its final name and swapped in when complete (checkpoint.replace_dir);
a non-empty --out is refused unless --overwrite=true.
"""

import os
import random
from dataclasses import dataclass

import torch

from checkpoint import check_out_dir, files_in, load_tokenizer, refuse_held
from config import cli, parse_config
from model import Transformer
from tasks import Domain, get_domains
from teachers import parse_registry, validate


@dataclass
class Config:
    mode: str = ""                 # average | task_arithmetic
    base: str = ""                 # S0, the checkpoint every teacher started from
    teacher: str = ""              # DOMAIN=DIR,... or a JSON file {"rev": "DIR", ...}
    out: str = ""                  # the merged checkpoint (an HF directory, with the base's tokenizer)
    overwrite: bool = False        # --out may replace a non-empty directory (once the merge is complete)
    # task arithmetic: lambda chosen on a validation split of fresh training prompts
    lambdas: str = "0.2,0.4,0.6,0.8,1.0"  # the candidates
    val_n: int = 200               # validation prompts per domain
    domains: str = ""              # their domains (tasks.get_domains spec, one per teacher, by name);
                                   # default: the teachers' names, which must then be toy domains
    max_new_tokens: int = 12
    data_dir: str = ""             # where relative JSONL paths of real domains live


PRESETS = {
    # SmolLM2-135M-Instruct (runs/smol.sh): two candidates, each scored on 25 prompts per domain
    "smol": dict(lambdas="0.5,1.0", val_n=25, max_new_tokens=48),
}
# refused as soon as the command line is read, before anything loads (config.check)
LIMITS = {"required": "mode base teacher out lambdas",
          "one of average task_arithmetic": "mode",
          "numbers": "lambdas",
          ">= 1": "val_n max_new_tokens"}


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
    from evaluate import evaluate
    from train_utils import prompt_fits
    cfg = parse_config(Config, argv, PRESETS, LIMITS)
    try:
        reg = parse_registry(cfg.teacher)
    except ValueError as e:
        raise ValueError(f"--teacher={cfg.teacher}: {e}") from None
    for d, path in reg.items():
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--teacher={d}={path}: no such checkpoint directory")
    # --out must not be a checkpoint this merge reads (the save would replace it), nor a directory
    # holding anything else, unless --overwrite=true: checkpoint.py's rules for every output
    check_out_dir(cfg.out, "--out", {"--base": cfg.base, **{f"--teacher={d}": path for d, path in reg.items()}})
    refuse_held(cfg.out, "--out", files_in(cfg.out), cfg.overwrite)
    tok = load_tokenizer(cfg.base, "--base")  # before any model loads; the merged checkpoint gets it
    base = Transformer.from_pretrained(cfg.base, dtype=torch.float32)
    for d, path in reg.items():  # whole files, the base's tokenizer: else the average is of unrelated tokens
        validate(tok, base, path, d)
    teachers = [Transformer.from_pretrained(reg[d], dtype=torch.float32) for d in reg]
    shapes = {k: v.shape for k, v in base.state_dict().items()}
    for d, t in zip(reg, teachers):  # merging needs same-origin teachers: identical parameter shapes
        if {k: v.shape for k, v in t.state_dict().items()} != shapes:
            raise ValueError(f"--teacher={d}={reg[d]}: other parameters than the base {cfg.base}")
    merged = Transformer.from_pretrained(cfg.base, dtype=torch.float32)
    if cfg.mode == "average":
        merged.load_state_dict(average(teachers))
    else:
        domains = get_domains(cfg.domains or list(reg), cfg.data_dir or None, fits=prompt_fits(tok, base, cfg))
        if sorted(d.name for d in domains) != sorted(reg):
            raise ValueError(f"--domains={cfg.domains}: domains {sorted(d.name for d in domains)} do not match "
                             f"the teachers {sorted(reg)}")
        val = validation_domains(domains, cfg.val_n)
        best = None
        for lam in [float(x) for x in cfg.lambdas.split(",")]:
            merged.load_state_dict(task_arithmetic(base, teachers, lam))
            acc = evaluate(merged, tok, val, cfg.max_new_tokens)
            score = sum(acc.values()) / len(acc)
            print(f"lambda={lam}: validation " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()) + f" mean={score:.3f}")
            if best is None or score > best[0]:
                best = (score, lam)
        print(f"chosen lambda={best[1]}")
        merged.load_state_dict(task_arithmetic(base, teachers, best[1]))
        merged.config.extra["merge_lambda"] = best[1]
    merged.save_pretrained(cfg.out, tokenizer_dir=cfg.base)
    print(f"saved {cfg.out}")


if __name__ == "__main__":
    cli(main)
