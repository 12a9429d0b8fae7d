"""
What every training script shares, so that each of them reads as its own loop:
- parse_config: one dataclass per script, overridden by --preset=NAME then --key=value.
- prompt/response glue: encode_prompt, stop_ids, decode.
- evaluate: greedy accuracy on each domain's held-out split.
- checkpoints: one format for every script, an HF model directory (transformers loads it)
  plus trainer_state.pt (optimiser, step, config), written atomically; resume from it is
  bit-identical because every step's randomness is derived from (seed, step).
- MetricsLog: JSONL metrics, truncated back to the resumed step on --resume.
"""

import dataclasses
import json
import math
import os
import random
import sys
import time

import torch

from model import replace_dir
from rollout import generate

# -----------------------------------------------------------------------------
# config: a dataclass, presets, --key=value

def parse_config(cls, argv=None, presets=None):
    """Build cls() and apply --preset=NAME (from `presets`), then --key=value overrides."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = cls()
    names = {f.name: f for f in dataclasses.fields(cls)}
    pairs = []
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: argument {arg!r}: expected --key=value (keys: {', '.join(names)})")
        pairs.append(arg[2:].split("=", 1))
    for key, val in [p for p in pairs if p[0] == "preset"]:
        if not presets or val not in presets:
            raise SystemExit(f"error: --preset={val}: unknown preset; presets: {', '.join(presets or [])}")
        for k, v in presets[val].items():
            setattr(cfg, k, v)
    for key, val in pairs:
        if key == "preset":
            continue
        if key not in names:
            raise SystemExit(f"error: --{key}: unknown config key; keys: {', '.join(names)}")
        setattr(cfg, key, _convert(key, val, type(getattr(cfg, key))))
    return cfg


def _convert(key, val, typ):
    try:
        if typ is bool:
            if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return val.lower() in ("1", "true", "yes")
        return typ(val)
    except ValueError:
        raise SystemExit(f"error: --{key}={val}: expected a value of type {typ.__name__}") from None


def print_config(cfg):
    print("config:", json.dumps(dataclasses.asdict(cfg), indent=None))

# -----------------------------------------------------------------------------
# prompts and responses

def encode_prompt(tok, text):
    """Token ids of a prompt: the chat template when the tokenizer has one, else <bos> + text."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    ids = tok.encode(text, add_special_tokens=False)
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids


def stop_ids(tok, model):
    eos = model.config.eos_token_id
    ids = {tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def sample_examples(domains, weights, num, rng):
    """`num` fresh training examples, each from a domain drawn by the mixing weights."""
    picks = rng.choices(range(len(domains)), weights=weights, k=num)
    return [domains[i].sample(rng) for i in picks]


def parse_weights(spec, domains):
    """'0.35,0.35,0.3' -> one weight per domain; '' -> uniform."""
    if not spec:
        return [1.0] * len(domains)
    w = [float(x) for x in spec.split(",")]
    if len(w) != len(domains) or any(x < 0 for x in w) or sum(w) <= 0:
        raise SystemExit(f"error: --domain_weights={spec}: need {len(domains)} non-negative weights "
                         f"for domains {[d.name for d in domains]}")
    return w


def lr_at(cfg, step):
    """Linear warmup over cfg.warmup steps, then cosine from cfg.lr down to cfg.min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def step_seed(seed, step):
    """Every step's randomness (prompts, sampling) comes from here, so resume is exact."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


@torch.no_grad()
def sample_and_reward(model, tok, domains, weights, cfg, step):
    """
    The on-policy half of an RL or MOPD step: cfg.prompts_per_step prompts by the domain
    mixture, cfg.n rollouts each from `model`, each scored by its own domain's reward.
    Returns (rollout, the Example of each row, rewards, seconds spent sampling).
    """
    rng = random.Random(step_seed(cfg.seed, step))
    exs = sample_examples(domains, weights, cfg.prompts_per_step, rng)
    model.eval()
    t0 = time.time()
    roll = generate(model, [encode_prompt(tok, e.prompt) for e in exs], cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, stop_token_ids=stop_ids(tok, model),
                    n=cfg.n, seed=step_seed(cfg.seed, step), pad_id=tok.pad_token_id or 0)
    t_sample = time.time() - t0
    by_name = {d.name: d for d in domains}
    rows = [exs[i] for i in roll.prompt_index]
    rewards = [by_name[e.domain].reward(decode(tok, ids), e) for ids, e in zip(roll.response_ids, rows)]
    model.train()
    return roll, rows, rewards, t_sample

# -----------------------------------------------------------------------------
# evaluation

# Held-out accuracy is pass@1 of the policy itself: the mean reward of EVAL_SAMPLES samples per
# prompt at EVAL_TEMPERATURE (what RL and distillation optimise). Greedy decoding
# (temperature 0) can score a 51%-likely answer as 100% right and hide what training changed.
EVAL_TEMPERATURE = 1.0
EVAL_SAMPLES = 4


@torch.no_grad()
def evaluate(model, tok, domains, max_new_tokens, limit=None, batch=512, temperature=EVAL_TEMPERATURE,
             samples=EVAL_SAMPLES, seed=0):
    """Mean reward of `model` on each domain's held-out split (seeded, so it is repeatable)."""
    was_training = model.training
    model.eval()
    n = 1 if temperature == 0 else samples
    out = {}
    for d in domains:
        exs = d.eval_set[:limit] if limit else d.eval_set
        total = 0.0
        for s in range(0, len(exs), max(1, batch // n)):
            chunk = exs[s:s + max(1, batch // n)]
            res = generate(model, [encode_prompt(tok, e.prompt) for e in chunk], max_new_tokens,
                           temperature=temperature, stop_token_ids=stop_ids(tok, model), n=n,
                           seed=seed + s, pad_id=tok.pad_token_id or 0)
            total += sum(d.reward(decode(tok, ids), chunk[i])
                         for ids, i in zip(res.response_ids, res.prompt_index))
        out[d.name] = total / (len(exs) * n)
    model.train(was_training)
    return out

# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, model, tokenizer_dir, state):
    """HF directory + trainer_state.pt, swapped in atomically (the old one survives a crash)."""
    staging = model.save_pretrained(path + ".staging", tokenizer_dir=tokenizer_dir)
    torch.save(state, os.path.join(staging, "trainer_state.pt"))
    replace_dir(staging, path)


def load_trainer_state(path):
    f = os.path.join(path, "trainer_state.pt")
    return torch.load(f, weights_only=False) if os.path.exists(f) else None


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """Append-only JSONL; on resume, lines past the resumed step are dropped first."""
    def __init__(self, path, resume_step=None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            keep = [l for l in open(path) if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        self.t0 = time.time()

    def log(self, row):
        row = {**row, "time": round(time.time() - self.t0, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

# -----------------------------------------------------------------------------
# the loop every RL-style script runs (train_teacher_rl.py, train_mopd.py)

def load_for_training(cfg):
    """(tokenizer, fp32 model, AdamW, start step, source dir), resuming from cfg.out_dir if asked."""
    from transformers import AutoTokenizer

    from model import Transformer
    state = load_trainer_state(cfg.out_dir) if cfg.resume else None
    src = cfg.out_dir if state else cfg.init
    if not os.path.isdir(src):
        raise SystemExit(f"error: --init={src}: no such checkpoint directory")
    tok = AutoTokenizer.from_pretrained(src)
    model = Transformer.from_pretrained(src, dtype=torch.float32, device=cfg.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    start = 0
    if state:
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resumed {cfg.out_dir} at step {start}")
    return tok, model, opt, start, src


def train_loop(cfg, model, opt, tok, domains, step_fn, start, src, desc, postfix=("reward",)):
    """
    For step in [start, cfg.steps): metrics = step_fn(step) (which samples, scores and
    updates), held-out eval every cfg.eval_every steps, a JSONL row per step, and an atomic
    checkpoint every cfg.ckpt_every steps and at the end.
    """
    from tqdm import tqdm
    log = MetricsLog(cfg.out_dir + ".log/metrics.jsonl", resume_step=start if start else None)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        row = {"step": step + 1, "lr": lr_at(cfg, step), **step_fn(step)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row["eval"] = evaluate(model, tok, domains, cfg.max_new_tokens, limit=cfg.eval_limit)
            bar.write(f"step {step + 1}: eval " + " ".join(f"{k}={v:.3f}" for k, v in row["eval"].items()))
        log.log(row)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in postfix if k in row}, refresh=False)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(cfg.out_dir, model, src, {"step": step + 1, "optimizer": opt.state_dict(),
                                                      "config": dataclasses.asdict(cfg)})
    print(f"saved {cfg.out_dir}")


def cli(main):
    """Run a script's main(); bad input (a ValueError, KeyError or missing file) becomes one
    line on stderr and exit status 2, not a traceback."""
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"error: {msg}")
