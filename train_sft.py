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
   the samples are written to OUT_DIR.log/teacher_samples.jsonl; every teacher is first
   checked against the student like MOPD's: whole files, the same tokenizer), or on a JSONL of
   {"domain", "prompt", "response"} lines (--data=FILE).

    python train_sft.py --preset=toy_base                   # S0 -> out/toy/base
    python train_sft.py --preset=toy_offpolicy --init=out/toy/base --teacher=rev=DIR,... --out_dir=out/toy/offpolicy

Loss: -mean over response tokens of log pi_theta(y_t | x, y_<t) (prompt tokens masked).
Checkpoints, --resume (bit for bit) and the rules that nothing written is lost are those of
the RL and MOPD scripts (checkpoint.Run); the loop below is the same loop.
"""

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

import checkpoint
from config import cli, parse_config, print_config
from evaluate import evaluate
from model import ModelConfig, Transformer, num_params
from mopd import policy_logprobs
from rollout import decode, encode_prompt, generate, sample_examples, show_progress, step_seed, stop_ids
from tasks import TOY_OPS, WORKED_OPS, get_domains, save_toy_tokenizer, toy_tokenizer, worked_solution, worked_steps
from teachers import parse_registry, validate
from train_utils import adamw, check_start, clip_and_step, due, prompt_fits, set_lr, set_seed


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
    max_positions: int = 64        # the context (max_position_embeddings): prompt + answer + <eos>
    # optimisation
    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # bookkeeping
    eval_every: int = 200
    eval_limit: int = 200          # eval examples per domain
    max_new_tokens: int = 12
    ckpt_every: int = 200          # a checkpoint (weights + AdamW's state) every this many steps, and at the end
    resume: bool = False           # continue the run in out_dir (bit for bit) from its checkpoint
    overwrite: bool = False        # a fresh run may replace the run out_dir already holds
    resume_override: str = ""      # with --resume: config keys that may differ from the checkpoint's
    seed: int = 0
    device: str = "cpu"


PRESETS = {
    "toy_base": {},
    # the teacher-count study's S0 (runs/scaling.sh): all sixteen learnable digit domains
    "toy16_base": dict(out_dir="out/scaling/base", domains="toy:16"),
    "toy_offpolicy": dict(out_dir="out/toy/offpolicy", data="teachers", domains="rev,sort,inc", steps=150,
                          lr=3e-4, min_lr=3e-5, warmup=10, eval_every=50),
    # SmolLM2-135M-Instruct (runs/smol.sh): each teacher answers 64 prompts of its domain, the
    # correct answers are finetuned on for 8 steps of 16
    "smol_offpolicy": dict(data="teachers", offpolicy_per_domain=64, steps=8, batch_size=16, lr=3e-5, min_lr=3e-5,
                           warmup=0, max_new_tokens=48, eval_every=1000, eval_limit=25, ckpt_every=4),
    # the worked toy (tasks.WORKED_OPS: 20-50-token answers whose steps compound; runs/toy.sh
    # with PRESET=worked): the same model, a longer context and answer budget
    "worked_base": dict(out_dir="out/worked/base", domains="add,mul,isort", max_positions=128, max_new_tokens=64),
    # the same with a smaller student (issue 14's capacity pressure: S0 and so every model trained
    # from it, teachers included, ~4x fewer parameters): S0_PRESET=worked_small_base runs/worked.sh
    "worked_small_base": dict(out_dir="out/worked_small/base", domains="add,mul,isort", max_positions=128,
                              max_new_tokens=64, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=192),
    "worked_offpolicy": dict(out_dir="out/worked/offpolicy", data="teachers", domains="add,mul,isort", steps=150,
                             lr=3e-4, min_lr=3e-5, warmup=10, eval_every=50, max_new_tokens=64),
    "tiny": dict(out_dir="out/tiny/base", steps=20, batch_size=32, hidden_size=32, num_layers=2,
                 head_dim=16, intermediate_size=64, eval_every=10, eval_limit=20),
}
# refused as soon as the command line is read, before anything loads (config.check)
LIMITS = {">= 1": "offpolicy_per_domain hidden_size num_layers num_heads num_kv_heads head_dim intermediate_size max_positions "
                  "steps batch_size eval_every max_new_tokens ckpt_every",
          ">= 0": "min_lr warmup weight_decay eval_limit",
          "> 0": "lr grad_clip",
          "in [0, 1]": "noise",
          "device": "device"}


def toy_model(cfg, vocab_size, bos, eos, pad):
    mc = ModelConfig(arch="qwen3", vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     max_position_embeddings=cfg.max_positions, tie_word_embeddings=True,
                     bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return Transformer(mc).init_weights(seed=cfg.seed)


def noisy_answer(ex, rng, noise, trained=()):
    """The demo's response. With probability `noise` it is wrong: a digit puzzle gets another
    trained toy domain's answer for the same digits (interference between the skills S0 learns;
    any other toy domain's when it is the only one); a worked domain gets a slip at one random
    step, every later step built on it (an error that compounds)."""
    if ex.domain in WORKED_OPS:
        slip = rng.randrange(worked_steps(ex)) if rng.random() < noise else -1
        return worked_solution(ex.domain, ex.meta["input"], ex.meta["style"], slip, rng)[0]
    if ex.domain in TOY_OPS and rng.random() < noise:
        others = [d for d in trained if d in TOY_OPS and d != ex.domain] or [d for d in TOY_OPS if d != ex.domain]
        return TOY_OPS[rng.choice(others)][1](ex.meta["digits"])
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


def load_model(cfg, state, tmp):
    """(tokenizer, fp32 model on cfg.device in train mode, the directory whose tokenizer files
    every checkpoint copies): resumed from cfg.out_dir, a new toy model (init=scratch; its
    tokenizer written into `tmp`), or cfg.init."""
    if not state and cfg.init == "scratch":
        tok = toy_tokenizer()
        model = toy_model(cfg, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        src = save_toy_tokenizer(tmp)
    else:
        src = cfg.out_dir if state else cfg.init
        tok = checkpoint.load_tokenizer(src, "--out_dir" if state else "--init")
        model = Transformer.from_pretrained(src, dtype=torch.float32)
    print(f"model: {num_params(model):,} parameters")
    return tok, model.to(cfg.device).train(), src


@torch.no_grad()
def teacher_samples(cfg, tok, model, domains, registry, path):
    """Each domain's teacher answers fresh training prompts of its domain (T = 1). Every teacher
    is checked first (teachers.validate: whole files, the student's tokenizer)."""
    for d in domains:
        if d.name not in registry:
            raise SystemExit(f"error: --teacher: no teacher for domain {d.name!r}; given: {sorted(registry)}")
        validate(tok, model, registry[d.name], d.name)
    rows, kept = [], []
    for d in domains:
        t = Transformer.from_pretrained(registry[d.name], dtype=torch.float32, device=cfg.device)
        rng = random.Random(step_seed(cfg.seed, 10**6 + len(rows)))
        exs = [d.sample(rng) for _ in range(cfg.offpolicy_per_domain)]
        res = generate(t, [encode_prompt(tok, e.prompt) for e in exs], cfg.max_new_tokens, temperature=1.0,
                       stop_token_ids=stop_ids(tok, t), seed=cfg.seed, pad_id=tok.pad_token_id or 0,
                       progress=show_progress())
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


def batch(cfg, domains, samples, step):
    """The step's (prompt, response) pairs, from its own seed: noisy demos, or drawn from samples."""
    rng = random.Random(step_seed(cfg.seed, step))
    if samples is None:
        exs = sample_examples(domains, [1.0] * len(domains), cfg.batch_size, rng)
        names = [d.name for d in domains]
        return [(e.prompt, noisy_answer(e, rng, cfg.noise, names)) for e in exs]
    return rng.choices(samples, k=cfg.batch_size)


def sft_step(model, opt, tokens, mask, cfg):
    """One supervised update: -mean log pi_theta of the response tokens, clipped, AdamW."""
    t0 = time.time()
    logp = policy_logprobs(model, tokens, mask)
    loss = -logp[mask].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = clip_and_step(model, opt, cfg.grad_clip)
    return {"loss": round(loss.item(), 4), "grad_norm": gnorm, "update_s": time.time() - t0}


def main(argv=None):
    cfg = parse_config(Config, argv, PRESETS, LIMITS)
    print_config(cfg)
    check_start(cfg)
    registry = {}
    if cfg.data == "teachers":
        try:
            registry = parse_registry(cfg.teacher)
        except ValueError as e:
            raise ValueError(f"--teacher={cfg.teacher}: {e}") from None
    sources = {"--init": "" if cfg.init == "scratch" else cfg.init,
               **{f"--teacher={d}": path for d, path in registry.items()}}
    t0 = time.time()
    with checkpoint.Run(cfg, sources) as run, tempfile.TemporaryDirectory() as tmp:  # OUT_DIR: locked, checked
        set_seed(cfg.seed)
        tok, model, src = load_model(cfg, run.state, tmp)
        domains = get_domains(cfg.domains, fits=prompt_fits(tok, model, cfg))
        samples = None
        if cfg.data == "teachers":
            samples = teacher_samples(cfg, tok, model, domains, registry,
                                      os.path.join(cfg.out_dir + ".log", "teacher_samples.jsonl"))
        elif cfg.data != "demos":
            samples = load_samples(cfg.data, {d.name for d in domains})
        opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
        start = checkpoint.resume_optimizer(run.state, cfg.out_dir, model, opt)
        run.begin(start)
        for step in range(start, cfg.steps):
            lr = set_lr(opt, cfg, step)
            tokens, mask = pack(tok, batch(cfg, domains, samples, step), cfg.device)
            row = {"step": step + 1, "lr": lr, **sft_step(model, opt, tokens, mask, cfg)}
            run.check_finite(row)  # NaN/Inf loss or gradient: stop, the last checkpoint stays the last good one
            if due(step, cfg.eval_every, cfg.steps):
                t_eval = time.time()
                row["eval"] = evaluate(model, tok, domains, cfg.max_new_tokens, limit=cfg.eval_limit)
                row["eval_s"] = time.time() - t_eval
            run.log(row)  # one line: loss, the update's and the eval's seconds (checkpoint.readout)
            if due(step, cfg.ckpt_every, cfg.steps):
                checkpoint.save_checkpoint(cfg.out_dir, model, src, run.trainer_state(step + 1), opt)
            run.stop_if_interrupted()  # Ctrl-C during this step: stop now that it is logged (and saved, if due)
    print(f"saved {cfg.out_dir} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    cli(main)
