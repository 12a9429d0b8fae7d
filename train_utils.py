"""
What every training script shares, so that each of them reads as its own loop (the command
line, --help and the error convention are config.py's):
- prompt/response glue: encode_prompt, stop_ids, decode.
- evaluate: greedy accuracy on each domain's held-out split.
- the pieces of every loop: check_start (what can be refused before OUT_DIR is touched),
  load_for_training (the model, sharded under torchrun, and AdamW; resumed from the
  checkpoint checkpoint.Run found), set_lr, due, clip_and_step, prompt_fits (every prompt of
  a JSONL domain must leave room for max_new_tokens in the model's context).
Checkpoints, the metrics log and the rules that nothing already written is lost are
checkpoint.py's; resume is bit-identical because every step's randomness is derived from
(seed, step). Under torchrun every rank runs all of this: each takes its own slice of a
step's prompts (distributed.rank_range), the sharded model and checkpoints are collective,
rank 0 alone prints and writes the log.
"""

import functools
import math
import os
import random
import time

import torch

import checkpoint
import distributed
from rollout import generate

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
    try:
        w = [float(x) for x in spec.split(",")]
    except ValueError:
        w = []
    if len(w) != len(domains) or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"--domain_weights={spec}: need {len(domains)} non-negative weights "
                         f"for domains {[d.name for d in domains]}")
    return w


def lr_at(cfg, step):
    """Linear warmup over cfg.warmup steps, then cosine from cfg.lr down to cfg.min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def step_seed(seed, step):
    """Every step's randomness (prompts, sampling) comes from here, so resume is exact: a 64-bit
    hash of (seed, step), so that no two (seed, step) pairs share a stream (seed * K + step,
    the old formula, made seed 0 at step K the same as seed 1 at step 0)."""
    from rollout import mix_seed
    return mix_seed(seed, step)


@torch.no_grad()
def sample_and_reward(model, tok, domains, weights, cfg, step):
    """
    The on-policy half of an RL or MOPD step: cfg.prompts_per_step prompts by the domain
    mixture, cfg.n rollouts each from `model`, each scored by its own domain's reward.
    Under torchrun this rank's contiguous slice [a, b) of the prompts (whole GRPO groups),
    sampled from the same random streams as one process would use: sample j of prompt a + i
    draws from the stream of (step_seed(seed, step), a + i, j) (rollout.row_uniforms).
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
                        n=cfg.n, seed=step_seed(cfg.seed, step), first_prompt=a, pad_id=tok.pad_token_id or 0)
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
    Under torchrun each rank scores its slice; sample j of a domain's held-out prompt i always
    draws from the stream of (a hash of (seed, the domain's name), i, j), on any number of ranks,
    in any batch, and whichever other domains are evaluated."""
    import zlib
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
        dseed = step_seed(seed, zlib.crc32(d.name.encode()))  # the hash of (seed, the domain's name)
        for s in range(0, per * distributed.global_max(-(-len(mine) // per)), per):
            chunk = mine[s:s + per] or mine[:1]  # past this rank's end: a dummy batch, not counted
            res = generate(model, [encode_prompt(tok, e.prompt) for e in chunk], max_new_tokens,
                           temperature=temperature, stop_token_ids=stop_ids(tok, model), n=n,
                           seed=dseed, first_prompt=a + s, pad_id=tok.pad_token_id or 0)
            if s < len(mine):
                total += sum(d.reward(decode(tok, ids), chunk[i])
                             for ids, i in zip(res.response_ids, res.prompt_index))
        total = distributed.all_sum(torch.tensor(total, dtype=torch.float64, device=res.tokens.device))
        out[d.name] = float(total) / (len(exs) * n)
    model.train(was_training)
    return out

# -----------------------------------------------------------------------------
# the pieces of every training loop (train_sft.py, train_teacher_rl.py, train_mopd.py)

def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def check_start(cfg):
    """What is refused before the output directory is even looked at: FSDP's options without
    torchrun, and a missing --init for a fresh run (a resumed one starts from OUT_DIR)."""
    if not distributed.active() and (getattr(cfg, "bf16", False) or getattr(cfg, "optimizer_offload", False)):
        raise SystemExit("error: --bf16 / --optimizer_offload are FSDP options: run under torchrun "
                         "(torchrun --nproc_per_node=1 for one GPU)")
    if not cfg.resume and cfg.init != "scratch" and not os.path.isdir(cfg.init):
        raise SystemExit(f"error: --init={cfg.init}: no such checkpoint directory")


def load_for_training(cfg, state=None):
    """
    (tokenizer, fp32 model, AdamW, start step, source dir): from cfg.init, or from cfg.out_dir
    when `state` (the trainer_state.pt checkpoint.Run found to resume) is given, in which case
    AdamW's state is restored too and start is the checkpoint's step.
    Under torchrun the model is sharded with FSDP2 as it is loaded (each rank reads only its
    shard): cfg.bf16 = bf16 compute with fp32 master weights and gradient reduction,
    cfg.optimizer_offload = sharded params, grads and AdamW state in host memory,
    cfg.activation_checkpointing = recompute each layer in backward.
    """
    from model import Transformer
    check_start(cfg)
    if cfg.device == "auto":  # under torchrun on GPUs: this rank's own GPU
        cfg.device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    src = cfg.out_dir if state else cfg.init
    if not os.path.isdir(src):
        raise SystemExit(f"error: --init={src}: no such checkpoint directory")
    tok = checkpoint.load_tokenizer(src, "--out_dir" if state else "--init")
    shard_fn = functools.partial(distributed.shard, mp_policy=distributed.BF16_MIXED if cfg.bf16 else None,
                                 offload=cfg.optimizer_offload, activation_checkpointing=cfg.activation_checkpointing)
    sharded = distributed.active()
    model = Transformer.from_pretrained(src, dtype=torch.float32, device="cpu" if cfg.optimizer_offload else cfg.device,
                                        shard_fn=shard_fn if sharded else None).train()
    if not sharded and cfg.activation_checkpointing:
        shard_fn(model)  # one process: nothing to shard, activation checkpointing only
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    start = checkpoint.resume_optimizer(state, cfg.out_dir, model, opt)
    return tok, model, opt, start, src


def prompt_fits(tok, model, cfg):
    """For tasks.get_domains(fits=...): why a prompt (as encode_prompt tokenises it) leaves no
    room for cfg.max_new_tokens in the model's context, or None when it fits. Checked when a
    JSONL domain is loaded, so a long line is refused at start-up (`FILE:LINE: ...`), not at
    the step that first draws it."""
    ctx = model.config.max_position_embeddings
    room = ctx - cfg.max_new_tokens

    def why(text):
        n = len(encode_prompt(tok, text))
        return None if n <= room else (f"prompt is {n} tokens; the context leaves room for {room} "
                                       f"(max_position_embeddings {ctx} - --max_new_tokens={cfg.max_new_tokens})")
    return why


def set_lr(opt, cfg, step):
    """The learning rate of `step` (lr_at) into every param group; returns it."""
    lr = lr_at(cfg, step)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def due(step, every, steps):
    """Whether 0-based `step` ends a period of `every` steps, or is the last one."""
    return (step + 1) % every == 0 or step + 1 == steps


def clip_and_step(model, opt, max_norm):
    """Clip the gradient's global norm (over all ranks' shards) to max_norm, step; returns the norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def print0(*args):
    if distributed.world()[0] == 0:
        print(*args)
