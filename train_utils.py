"""
What every training script shares, so that each of them reads as its own loop (the command
line, --help and the error convention are config.py's; the rollout half of a step and the
prompt/response glue are rollout.py's; held-out evaluation is evaluate.py's):
- OnPolicyConfig: the options train_teacher_rl.py and train_mopd.py share (rollouts, the
  objective's common part, optimisation, bookkeeping, scale), declared once; each script's
  Config adds its own options and redeclares the defaults it changes; ON_POLICY_LIMITS, the
  limits of those shared options (each script adds its own with config.merge_limits).
- the domain mixture (parse_weights) and the learning-rate schedule (lr_at).
- the pieces of every loop: check_start (what can be refused before OUT_DIR is touched),
  load_for_training (the model, sharded under torchrun, and AdamW; resumed from the
  checkpoint checkpoint.Run found), set_lr, due, clip_and_step (which also frees the
  gradients and gives the heap's free pages back to the OS: return_freed_memory),
  prompt_fits (every prompt of a JSONL domain must leave room for max_new_tokens in the
  model's context).
Checkpoints, the metrics log and the rules that nothing already written is lost are
checkpoint.py's; resume is bit-identical because every step's randomness is derived from
(seed, step) (rollout.step_seed). Under torchrun every rank runs all of this: each takes its
own slice of a step's prompts (distributed.rank_range), the sharded model and checkpoints are
collective, rank 0 alone prints and writes the log.
"""

import functools
import math
import os
import random
from dataclasses import dataclass

import torch

import checkpoint
import distributed
from mopd import LOSS_AGGS, RATIO_MODES
from rollout import encode_prompt

# -----------------------------------------------------------------------------
# the options of the two on-policy trainers, declared once

@dataclass
class OnPolicyConfig:
    """The options train_teacher_rl.py and train_mopd.py share, with teacher RL's defaults
    (train_mopd.Config redeclares those it changes). --help shows the comments beside them,
    grouped under the headers (config.source_notes walks a Config's bases)."""
    init: str = "out/toy/base"     # the starting checkpoint (S0), an HF directory
    out_dir: str = "out/toy/teacher"
    domains: str = "rev"           # one domain -> a teacher; several -> Mix-RL (tasks.get_domains spec)
    domain_weights: str = ""       # mixing weights, e.g. "0.35,0.35,0.3" (the paper's mix); default uniform
    data_dir: str = ""             # where relative JSONL paths of real domains live
    # rollouts
    steps: int = 100
    prompts_per_step: int = 16
    n: int = 8                     # samples per prompt (the GRPO group)
    max_new_tokens: int = 12
    temperature: float = 1.0
    top_p: float = 1.0
    # objective
    ratio_mode: str = "clip"       # clip (PPO/GRPO) | band (MiMo's masked importance weight)
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_agg: str = "token-mean"   # token-mean | seq-mean-token-mean | seq-mean-token-sum
    std_norm: bool = True          # GRPO advantages divided by the group's std (false: Dr. GRPO, mean only)
    # optimisation
    lr: float = 3e-4               # 1e-3 wrecks the toy S0 in one Adam step (every weight moves by lr)
    min_lr: float = 3e-5           # cosine decay from lr to min_lr over the run
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 256
    micro_batch_tokens: int = 0    # pack rows by length into micro-batches of <= this many padded tokens
                                   #   (at most micro_batch rows each; 0 = micro_batch rows each)
    # bookkeeping
    eval_every: int = 25
    eval_limit: int = 200
    ckpt_every: int = 25
    resume: bool = False           # continue the run in out_dir (bit for bit) from its checkpoint
    overwrite: bool = False        # a fresh run may replace the run out_dir already holds
    resume_override: str = ""      # with --resume: config keys that may differ from the checkpoint's
                                   # (e.g. steps,lr; checkpoint.RESUMABLE lists those that always may)
    seed: int = 0
    # scale: under torchrun the model is sharded with FSDP2 (distributed.py); see README "Scale"
    bf16: bool = False             # bf16 compute, fp32 master weights and gradient reduction
    activation_checkpointing: bool = False  # recompute each layer's activations in backward
    optimizer_offload: bool = False  # sharded params, grads and AdamW state in host memory
    rollout_gather: bool = False   # keep layers gathered for a whole rollout (distributed.gathered)
    rollout_cache_gib: float = 0.0 # the KV cache of one rollout batch, GiB: more prompts are sampled in chunks
                                   #   that fit (rollout.cache_chunks; 0 = all of a rank's rows at once)
    rollout_engine: str = "native" # native (rollout.py) | vllm (engine.py: vLLM in-process, weights synced each step)
    engine_memory: float = 0.3     # --rollout_engine=vllm: fraction of GPU memory each engine may take
    engine_tp: int = 1             # ... its tensor-parallel size (under torchrun: ranks per engine)
    device: str = "auto"           # auto: this rank's GPU if there is one, else cpu


# the shared options' limits (config.check: refused as soon as the command line is read);
# each script adds its own with config.merge_limits
ON_POLICY_LIMITS = {">= 1": "n steps prompts_per_step max_new_tokens micro_batch eval_every ckpt_every engine_tp",
                    ">= 0": "min_lr warmup weight_decay eval_limit rollout_cache_gib micro_batch_tokens",
                    "> 0": "lr grad_clip temperature",
                    "one of " + " ".join(RATIO_MODES): "ratio_mode",
                    "one of " + " ".join(LOSS_AGGS): "loss_agg",
                    "numbers": "domain_weights",
                    "device": "device",
                    "one of native vllm": "rollout_engine",
                    "in (0, 1]": "top_p engine_memory"}

# -----------------------------------------------------------------------------
# the domain mixture and the learning-rate schedule

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

# -----------------------------------------------------------------------------
# the pieces of every training loop (train_sft.py, train_teacher_rl.py, train_mopd.py)

def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def check_start(cfg):
    """What is refused before the output directory is even looked at: FSDP's options without
    torchrun, a missing --init for a fresh run (a resumed one starts from OUT_DIR), and what
    the vLLM engine cannot do (--rollout_engine / --teacher_engine=vllm, engine.check)."""
    if not distributed.active() and (getattr(cfg, "bf16", False) or getattr(cfg, "optimizer_offload", False)):
        raise SystemExit("error: --bf16 / --optimizer_offload are FSDP options: run under torchrun "
                         "(torchrun --nproc_per_node=1 for one GPU)")
    if not cfg.resume and cfg.init != "scratch" and not os.path.isdir(cfg.init):
        raise SystemExit(f"error: --init={cfg.init}: no such checkpoint directory")
    for flag in ("rollout_engine", "teacher_engine"):  # what the vLLM engine cannot do (engine.check)
        if getattr(cfg, flag, "native") == "vllm":
            import engine
            from model import ModelConfig
            why = engine.check(cfg, ModelConfig.from_hf(cfg.init) if os.path.isdir(cfg.init) else None, f"--{flag}=vllm")
            if why:
                raise SystemExit(f"error: {why}")


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
    opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.99))
    start = checkpoint.resume_optimizer(state, cfg.out_dir, model, opt)
    return tok, model, opt, start, src


def adamw(model, lr, weight_decay, betas):
    """Every trainer's AdamW. fused=True (one kernel over all parameters) where the model is one
    process's, on a CPU or CUDA: on a CPU it took 0.03 s a step against foreach's 0.15 s for a
    43M-parameter model (README "Benchmarks: RL and MOPD steps"). FSDP2's sharded DTensor
    parameters, and other devices, keep torch's default (foreach), the path tested under
    torchrun. The same update up to fp32 rounding."""
    fused = not model.is_sharded() and model.lm_head_weight.device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas,
                             fused=True if fused else None)


def make_engine(cfg, model):
    """The rollout engine of --rollout_engine=vllm (engine.py), or None for the native sampler.
    It starts from the checkpoint the model was read from; every step syncs the current weights."""
    if cfg.rollout_engine != "vllm":
        return None
    import engine  # what it cannot do was refused by check_start
    return engine.Engine(model.source_dir, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, seed=cfg.seed,
                         memory=cfg.engine_memory, tp=cfg.engine_tp)


def return_freed_memory():
    """
    Give the free pages of the C heap back to the OS (glibc's malloc_trim; elsewhere a no-op
    returning False). glibc serves blocks under M_MMAP_THRESHOLD from its heap, and raises
    that threshold to the size of each large block freed (up to 32 MiB), so after the first
    micro-batch an update's activations live in the heap, whose free space it seldom returns:
    measured on SmolLM2-135M (32 rows x 48 tokens, micro_batch 4, CPU), the RSS after a step
    grew 2.45 -> 3.19 GiB over three steps, and at micro_batch 16 the heap kept ~4 GiB after
    an update that the eval's KV cache (one large mapping) could not reuse. Trimmed after
    every optimizer step (clip_and_step), it stays at the live tensors (1.96 GiB), at no
    measured cost (update 23-26 s either way). A fixed M_MMAP_THRESHOLD of 256 KiB, tried
    first, also held 1.96 GiB but slowed the update by ~45% (33-35 s: fresh zeroed pages for
    every large tensor). No value changes.
    """
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True


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
    """Clip the gradient's global norm (over all ranks' shards) to max_norm, step, and free the
    gradients; returns the norm. Nothing reads a gradient after the step (every loop zeroes them
    before its next backward), so the next rollout, the eval and the checkpoint save run without
    a model-sized buffer of dead gradients (0.54 GB for SmolLM2-135M in fp32), and the heap's
    free pages go back to the OS (return_freed_memory)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return_freed_memory()  # the update's freed activations and gradients, back to the OS
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def print0(*args):
    if distributed.world()[0] == 0:
        print(*args)
