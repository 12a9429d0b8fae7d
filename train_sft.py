"""
Supervised fine-tuning, two uses:
1. Stage 1 of MOPD on the toy: train the shared base S0 from scratch on *noisy*
   demonstrations of every toy domain (preset toy_base). The noise is interference: with
   probability `noise` a demo answers with a *different* domain's answer for the same
   digits, so S0 ends up partly competent and confused between domains, which leaves RL
   headroom, as an SFT checkpoint does before domain RL.
2. The off-policy finetune baseline ("RL-then-distill"): SFT of S0 on responses the teachers
   sampled (--data=teachers: each teacher answers `offpolicy_per_domain` training prompts of
   its domain at temperature 1; only correct ones are kept unless --keep_incorrect=true;
   the samples are written to OUT_DIR.log/teacher_samples.jsonl), or on a JSONL of
   {"domain", "prompt", "response"} lines (--data=FILE).

    python train_sft.py --preset=toy_base                   # S0 -> out/toy/base
    python train_sft.py --preset=toy_offpolicy --init=out/toy/base --teacher=rev=DIR,... --out_dir=out/toy/offpolicy

Loss: -mean over response tokens of log pi_theta(y_t | x, y_<t) (prompt tokens masked).
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from model import ModelConfig, Transformer, num_params
from mopd import policy_logprobs
from tasks import TOY_OPS, get_domains, save_toy_tokenizer, toy_tokenizer
from train_utils import (cli, MetricsLog, lr_at, encode_prompt, evaluate, parse_config, print_config, sample_examples,
                         save_checkpoint, set_seed, step_seed)


@dataclass
class Config:
    out_dir: str = "out/toy/base"
    init: str = "scratch"          # "scratch" (a new toy model) or an HF checkpoint directory
    data: str = "demos"            # "demos" (the domains' own demos), "teachers", or a JSONL of samples
    teacher: str = ""              # data=teachers: DOMAIN=DIR,... (teachers.parse_registry)
    offpolicy_per_domain: int = 1000  # data=teachers: prompts each teacher answers
    keep_incorrect: bool = False   # data=teachers: keep wrong teacher responses too
    domains: str = "toy:8"         # domains for demos and eval (tasks.get_domains spec)
    noise: float = 0.3             # demos: probability of another domain's answer (toy only)
    # model (init=scratch): a tiny Qwen3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    # optimisation
    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # misc
    eval_every: int = 200
    eval_limit: int = 200          # eval examples per domain
    max_new_tokens: int = 12
    seed: int = 0
    device: str = "cpu"


PRESETS = {
    "toy_base": {},
    "toy_offpolicy": dict(out_dir="out/toy/offpolicy", data="teachers", domains="rev,sort,inc", steps=150,
                          lr=3e-4, min_lr=3e-5, warmup=10, eval_every=50),
    "tiny": dict(out_dir="out/tiny/base", steps=20, batch_size=32, hidden_size=32, num_layers=2,
                 head_dim=16, intermediate_size=64, eval_every=10, eval_limit=20),
}


def toy_model(cfg, vocab_size, bos, eos, pad):
    mc = ModelConfig(arch="qwen3", vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     max_position_embeddings=64, tie_word_embeddings=True,
                     bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return Transformer(mc).init_weights(seed=cfg.seed)


def noisy_answer(ex, rng, noise):
    """With probability `noise`, a different toy domain's answer for the same digits."""
    if ex.domain in TOY_OPS and rng.random() < noise:
        other = rng.choice([d for d in TOY_OPS if d != ex.domain])
        return TOY_OPS[other][1](ex.meta["digits"])
    return ex.answer


def pack(tok, pairs, device):
    """(prompt text, response text) pairs -> tokens [B, L] and response mask [B, L-1]."""
    seqs, starts = [], []
    for prompt, response in pairs:
        p = encode_prompt(tok, prompt)
        seqs.append(p + tok.encode(response, add_special_tokens=False) + [tok.eos_token_id])
        starts.append(len(p))
    L = max(map(len, seqs))
    tokens = torch.full((len(seqs), L), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 1, dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, starts)):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, p - 1:len(s) - 1] = True  # positions that predict the response tokens
    return tokens.to(device), mask.to(device)


def load_samples(path, domain_names):
    """Off-policy data: JSONL lines {"domain", "prompt", "response"}."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{i}: invalid JSON ({e.msg})")
            for k in ("domain", "prompt", "response"):
                if k not in r:
                    raise SystemExit(f"error: {path}:{i}: missing field {k!r}")
            if r["domain"] not in domain_names:
                raise SystemExit(f"error: {path}:{i}: domain {r['domain']!r} not in {sorted(domain_names)}")
            rows.append((r["prompt"], r["response"]))
    if not rows:
        raise SystemExit(f"error: {path}: no samples")
    return rows


@torch.no_grad()
def teacher_samples(cfg, tok, domains, path):
    """Each domain's teacher answers fresh training prompts of its domain (T = 1)."""
    from rollout import generate
    from teachers import parse_registry
    from train_utils import decode, stop_ids
    reg = parse_registry(cfg.teacher)
    rows, kept = [], []
    for d in domains:
        if d.name not in reg:
            raise SystemExit(f"error: --teacher: no teacher for domain {d.name!r}; given: {sorted(reg)}")
        t = Transformer.from_pretrained(reg[d.name], dtype=torch.float32, device=cfg.device)
        rng = random.Random(step_seed(cfg.seed, 10**6 + len(rows)))
        exs = [d.sample(rng) for _ in range(cfg.offpolicy_per_domain)]
        res = generate(t, [encode_prompt(tok, e.prompt) for e in exs], cfg.max_new_tokens, temperature=1.0,
                       stop_token_ids=stop_ids(tok, t), seed=cfg.seed, pad_id=tok.pad_token_id or 0)
        for e, ids in zip(exs, res.response_ids):
            text = decode(tok, ids)
            r = d.reward(text, e)
            rows.append({"domain": d.name, "prompt": e.prompt, "response": text, "reward": r})
            if r > 0 or cfg.keep_incorrect:
                kept.append((e.prompt, text))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"teacher samples: kept {len(kept)} of {len(rows)} ({path})")
    if not kept:
        raise SystemExit("error: no teacher sample was correct; nothing to finetune on")
    return kept


def main(argv=None):
    cfg = parse_config(Config, argv, PRESETS)
    print_config(cfg)
    set_seed(cfg.seed)
    domains = get_domains(cfg.domains)
    if cfg.init == "scratch":
        tok = toy_tokenizer()
        model = toy_model(cfg, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        tok_dir = save_toy_tokenizer(cfg.out_dir + ".tokenizer")
    else:
        from transformers import AutoTokenizer
        tok, tok_dir = AutoTokenizer.from_pretrained(cfg.init), cfg.init
        model = Transformer.from_pretrained(cfg.init, dtype=torch.float32)
    model.to(cfg.device).train()
    print(f"model: {num_params(model):,} parameters")
    samples = None
    if cfg.data == "teachers":
        samples = teacher_samples(cfg, tok, domains, os.path.join(cfg.out_dir + ".log", "teacher_samples.jsonl"))
    elif cfg.data != "demos":
        samples = load_samples(cfg.data, {d.name for d in domains})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    log = MetricsLog(os.path.join(cfg.out_dir + ".log", "metrics.jsonl"))
    t0 = time.time()
    for step in range(cfg.steps):
        rng = random.Random(step_seed(cfg.seed, step))
        if samples is None:
            exs = sample_examples(domains, [1.0] * len(domains), cfg.batch_size, rng)
            pairs = [(e.prompt, noisy_answer(e, rng, cfg.noise)) for e in exs]
        else:
            pairs = rng.choices(samples, k=cfg.batch_size)
        tokens, mask = pack(tok, pairs, cfg.device)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        logp = policy_logprobs(model, tokens, mask)
        loss = -logp[mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        row = {"step": step + 1, "loss": round(loss.item(), 4), "lr": lr_at(cfg, step)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc = evaluate(model, tok, domains, cfg.max_new_tokens, limit=cfg.eval_limit)
            row["eval"] = acc
            print(f"step {step + 1}: loss {loss.item():.3f}  eval " +
                  " ".join(f"{k}={v:.2f}" for k, v in acc.items()) + f"  ({time.time() - t0:.0f}s)")
        log.log(row)
    save_checkpoint(cfg.out_dir, model, tok_dir, {"step": cfg.steps, "config": asdict(cfg)})
    if cfg.init == "scratch":
        import shutil
        shutil.rmtree(tok_dir, ignore_errors=True)
    print(f"saved {cfg.out_dir} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    cli(main)
