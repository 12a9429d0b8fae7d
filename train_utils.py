"""
What every training script shares, so that each of them reads as its own loop:
- parse_config: one dataclass per script, overridden by --preset=NAME then --key=value.
- prompt/response glue: encode_prompt, stop_ids, decode.
- evaluate: greedy accuracy on each domain's held-out split.
- checkpoints: one format for every script, an HF model directory (transformers loads it)
  plus trainer_state.pt (step, config) plus optimizer/ (a torch.distributed.checkpoint of
  AdamW's state, one file per rank that wrote it; it loads at any world size), written
  atomically; resume from it is bit-identical because every step's randomness is derived
  from (seed, step).
- MetricsLog: JSONL metrics, truncated back to the resumed step on --resume.
Under torchrun every rank runs all of this: each takes its own slice of a step's prompts
(distributed.rank_range), the sharded model and checkpoints are collective, rank 0 alone
prints and writes the log.
"""

import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
import warnings

import torch

import distributed
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
    print0("config:", json.dumps(dataclasses.asdict(cfg), indent=None))

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
    Under torchrun this rank's contiguous slice of the prompts (whole GRPO groups), sampled
    from the same per-prompt random streams as one process would use.
    Returns (rollout, the Example of each row, rewards, seconds spent sampling).
    """
    rng = random.Random(step_seed(cfg.seed, step))
    exs = sample_examples(domains, weights, cfg.prompts_per_step, rng)
    a, b = distributed.rank_range(len(exs))
    exs = exs[a:b]
    model.eval()
    t0 = time.time()
    with distributed.gathered(model, cfg.rollout_gather):
        roll = generate(model, [encode_prompt(tok, e.prompt) for e in exs], cfg.max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, stop_token_ids=stop_ids(tok, model),
                        n=cfg.n, seed=step_seed(cfg.seed, step) + a, pad_id=tok.pad_token_id or 0)
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
    """Mean reward of `model` on each domain's held-out split (seeded, so it is repeatable).
    Under torchrun each rank scores its slice; prompt i always gets the random stream seed + i."""
    was_training = model.training
    model.eval()
    n = 1 if temperature == 0 else samples
    per = max(1, batch // n)
    out = {}
    for d in domains:
        exs = d.eval_set[:limit] if limit else d.eval_set
        a, b = distributed.rank_range(len(exs))
        mine = exs[a:b]
        total = 0.0
        for s in range(0, per * distributed.global_max(-(-len(mine) // per)), per):
            chunk = mine[s:s + per] or mine[:1]  # past this rank's end: a dummy batch, not counted
            res = generate(model, [encode_prompt(tok, e.prompt) for e in chunk], max_new_tokens,
                           temperature=temperature, stop_token_ids=stop_ids(tok, model), n=n,
                           seed=seed + a + s, pad_id=tok.pad_token_id or 0)
            if s < len(mine):
                total += sum(d.reward(decode(tok, ids), chunk[i])
                             for ids, i in zip(res.response_ids, res.prompt_index))
        total = distributed.all_sum(torch.tensor(total, dtype=torch.float64, device=res.tokens.device))
        out[d.name] = float(total) / (len(exs) * n)
    model.train(was_training)
    return out

# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, model, tokenizer_dir, state, opt=None):
    """
    HF directory + trainer_state.pt (+ optimizer/ when training continues), swapped in
    atomically: written under PATH.staging, renamed over PATH last, so a crash at any point
    leaves the previous checkpoint whole, or the new one complete in PATH.staging (which
    --resume then puts in place: recover_checkpoint). Collective under torchrun: every rank calls it,
    save_pretrained gathers one file's tensors at a time to rank 0, and each rank writes
    its own shard of the optimizer state (all ranks must see one filesystem).
    """
    rank = distributed.world()[0]
    staging = model.save_pretrained(path + ".staging", tokenizer_dir=tokenizer_dir)
    if opt is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        with warnings.catch_warnings():  # "no process group: assuming a single process" is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp().save(get_optimizer_state_dict(model, opt), checkpoint_id=os.path.join(staging, "optimizer"))
    distributed.barrier()
    if rank == 0:
        torch.save(state, os.path.join(staging, "trainer_state.pt"))
        replace_dir(staging, path)
    distributed.barrier()


def recover_checkpoint(path):
    """A crash inside replace_dir, between moving the old checkpoint aside and renaming the new
    one into place, leaves no PATH but a complete PATH.staging (trainer_state.pt is written
    last): put it in place, so that --resume continues from it instead of starting over."""
    staging = path + ".staging"
    if not os.path.exists(path) and os.path.exists(os.path.join(staging, "trainer_state.pt")):
        os.rename(staging, path)
        print(f"recovered {path} from {staging}")


def load_optimizer(path, model, opt):
    """Fill `opt` from PATH/optimizer (written by save_checkpoint at any world size)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    if not os.path.isdir(os.path.join(path, "optimizer")):
        raise FileNotFoundError(f"{path}/optimizer: missing; cannot resume the optimizer state")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        osd = get_optimizer_state_dict(model, opt)  # a template: AdamW's state at step 0, our layout
        dcp().load(osd, checkpoint_id=os.path.join(path, "optimizer"))
        set_optimizer_state_dict(model, opt, osd)


def dcp():
    import torch.distributed.checkpoint as dcp
    return dcp


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
    """
    (tokenizer, fp32 model, AdamW, start step, source dir), resuming from cfg.out_dir if asked.
    Under torchrun the model is sharded with FSDP2 as it is loaded (each rank reads only its
    shard): cfg.bf16 = bf16 compute with fp32 master weights and gradient reduction,
    cfg.optimizer_offload = sharded params, grads and AdamW state in host memory,
    cfg.activation_checkpointing = recompute each layer in backward.
    """
    from transformers import AutoTokenizer

    from model import Transformer
    if cfg.device == "auto":  # under torchrun on GPUs: this rank's own GPU
        cfg.device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if cfg.resume and distributed.world()[0] == 0:
        recover_checkpoint(cfg.out_dir)
    distributed.barrier()
    state = load_trainer_state(cfg.out_dir) if cfg.resume else None
    src = cfg.out_dir if state else cfg.init
    if not os.path.isdir(src):
        raise SystemExit(f"error: --init={src}: no such checkpoint directory")
    tok = AutoTokenizer.from_pretrained(src)
    shard_fn = functools.partial(distributed.shard, mp_policy=distributed.BF16_MIXED if cfg.bf16 else None,
                                 offload=cfg.optimizer_offload, activation_checkpointing=cfg.activation_checkpointing)
    sharded = distributed.active()
    if not sharded and (cfg.bf16 or cfg.optimizer_offload):
        raise SystemExit("error: --bf16 / --optimizer_offload are FSDP options: run under torchrun "
                         "(torchrun --nproc_per_node=1 for one GPU)")
    model = Transformer.from_pretrained(src, dtype=torch.float32, device="cpu" if cfg.optimizer_offload else cfg.device,
                                        shard_fn=shard_fn if sharded else None).train()
    if not sharded and cfg.activation_checkpointing:
        shard_fn(model)  # one process: nothing to shard, activation checkpointing only
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    start = 0
    if state and "optimizer" in state:  # a checkpoint from before optimizer/ existed
        opt.load_state_dict(state["optimizer"])
    elif state:
        load_optimizer(cfg.out_dir, model, opt)
        start = state["step"]
        print0(f"resumed {cfg.out_dir} at step {start}")
    return tok, model, opt, start, src


def clip_and_step(model, opt, max_norm):
    """Clip the gradient's global norm (over all ranks' shards) to max_norm, step; returns the norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def print0(*args):
    if distributed.world()[0] == 0:
        print(*args)


def train_loop(cfg, model, opt, tok, domains, step_fn, start, src, desc, postfix=("reward",)):
    """
    For step in [start, cfg.steps): metrics = step_fn(step) (which samples, scores and
    updates), held-out eval every cfg.eval_every steps, a JSONL row per step, and an atomic
    checkpoint every cfg.ckpt_every steps and at the end. Every rank runs it; rank 0 logs.
    """
    from tqdm import tqdm
    main = distributed.world()[0] == 0
    log = MetricsLog(cfg.out_dir + ".log/metrics.jsonl", resume_step=start if start else None) if main else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=desc, mininterval=2, disable=not main)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        row = {"step": step + 1, "lr": lr_at(cfg, step), **step_fn(step)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            row["eval"] = evaluate(model, tok, domains, cfg.max_new_tokens, limit=cfg.eval_limit)
            if main:
                bar.write(f"step {step + 1}: eval " + " ".join(f"{k}={v:.3f}" for k, v in row["eval"].items()))
        if main:
            log.log(row)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in postfix if k in row}, refresh=False)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(cfg.out_dir, model, src, {"step": step + 1, "config": dataclasses.asdict(cfg),
                                                      "world_size": distributed.world()[1]}, opt)
    print0(f"saved {cfg.out_dir}")


def cli(main):
    """Run a script's main() (under torchrun too: it joins the process group first and leaves
    it last); bad input (a ValueError, KeyError or missing file) becomes one line on stderr
    and exit status 2, not a traceback."""
    try:
        distributed.init_distributed()
        main()
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.teardown()
