"""
Stage 2 of MOPD: RL on verifiable rewards, one domain -> one teacher. With several
domains (--domains=rev,sort,sum) the same script is the Mix-RL baseline (one run on the
pooled data, each prompt scored by its own domain's reward); run it domain after domain,
each from the previous result, and it is the Cascade-RL baseline.

GRPO "in quotes", with the simplifications stated:
- n samples per prompt from rollout.generate; advantage = the reward normalised within its
  group (mopd.group_advantages; --std_norm=false for Dr. GRPO's mean-only version).
- One optimiser step per batch by default, so the "old" policy is the sampler mu itself and
  ratio = pi_theta / mu is 1 up to sampler/trainer numerics (logged every step as
  ratio_mean / ratio_absdev; it is what the clip guards against).
- Clipped ratio with separate low/high clip (DAPO's clip-higher), token-level loss
  aggregation (DAPO) by default, optional k3 KL to the frozen initial model.
- The update itself is mopd.pg_update, the same function MOPD uses.

    python train_teacher_rl.py --preset=toy --domains=rev --out_dir=out/toy/teacher_rev
    python train_teacher_rl.py --preset=toy --domains=rev,sort,sum --out_dir=out/toy/mixrl   # Mix-RL
    torchrun --nproc_per_node=8 train_teacher_rl.py ...   (multi-GPU: see README "Scale")
Every step prints one line (checkpoint.readout: reward per domain, the fraction of groups
with no signal, loss, response length, the seconds of each phase) and appends a JSONL row to
OUT_DIR.log/metrics.jsonl; after NO_SIGNAL_STEPS steps in a row in which every group's rewards
were all equal (a zero policy gradient) it prints one warning. --resume=true continues from the
checkpoint in OUT_DIR bit for bit (what may not be lost, and the one-line errors that guard it:
checkpoint.Run).
"""

import time
from dataclasses import dataclass

import torch

import checkpoint
import distributed
from config import cli, merge_limits, parse_config, print_config
from evaluate import evaluate
from mopd import check_objective, group_advantages, pg_update, policy_logprobs, row_groups
from rollout import cache_bytes, sample_and_reward
from tasks import get_domains
from teachers import load_frozen
from train_utils import (ON_POLICY_LIMITS, OnPolicyConfig, check_start, clip_and_step, due,
                         load_for_training, make_engine, parse_weights, print0, prompt_fits, return_freed_memory,
                         set_lr, set_seed)


@dataclass
class Config(OnPolicyConfig):  # the options shared with train_mopd.py, and their defaults: train_utils.py
    # objective
    kl_coef: float = 0.0           # k3 KL to the initial model; 0 = no reference model


# SmolLM2-135M-Instruct on a laptop CPU (runs/smol.sh; README "A real model on a laptop"):
# lengths for a one-sentence answer, a small lr held constant (so a resume with more steps is
# bit-identical to one longer run), micro-batches of 4 rows (the activations of 30 layers
# dominate the peak: 16 rows x 168 tokens peak at ~3.6 GiB with 4, ~5.8 GiB with 16; README
# "A real model on a laptop"), evaluation at the end only
SMOL = dict(prompts_per_step=8, n=4, max_new_tokens=48, lr=3e-5, min_lr=3e-5, micro_batch=4,
            eval_every=1000, eval_limit=25, ckpt_every=5)
PRESETS = {
    "toy": {},                                    # one domain -> a teacher, ~35 s on one CPU core
    "toy_mix": dict(steps=300, eval_every=25),    # Mix-RL over all domains: the teachers' total samples
    "toy_cascade": dict(steps=100),               # one stage of Cascade RL
    # the worked toy (tasks.WORKED_OPS, runs/toy.sh with PRESET=worked): 20-50-token answers
    "worked": dict(max_new_tokens=64),
    # Mix-RL matched to MOPD's whole budget: 450 x 128 = 57,600 responses = the teachers' 3 x 12,800
    # + MOPD's 300 x 64 (its curve passes the teachers' total alone at step 300)
    "worked_mix": dict(max_new_tokens=64, steps=450, eval_every=25),
    "worked_cascade": dict(max_new_tokens=64, steps=100),
    "tiny": dict(steps=3, prompts_per_step=4, n=4, max_new_tokens=8, eval_every=2, eval_limit=10, ckpt_every=1),
    "smol": dict(SMOL, steps=10),           # a teacher: 10 steps x 32 responses
    "smol_mix": dict(SMOL, steps=10),       # Mix-RL with MOPD's 320 responses
    "smol_mix_all": dict(SMOL, steps=30),   # ... with MOPD's + both teachers' (320 + 2 x 320)
    # a domain teacher from Qwen3-30B-A3B on one 8xH100 node: 256 prompts x 8 samples per step
    "qwen3-30b-a3b-8xh100": dict(steps=300, prompts_per_step=256, n=8, max_new_tokens=32768, lr=1e-6, min_lr=1e-6,
                                 eval_every=20, eval_limit=256, ckpt_every=10, bf16=True,
                                 activation_checkpointing=True, optimizer_offload=True, rollout_engine="vllm",
                                 engine_tp=4, engine_memory=0.6, rollout_cache_gib=24, micro_batch=64,
                                 micro_batch_tokens=65536),
}
# refused as soon as the command line is read, before anything loads (config.check): the
# options shared with train_mopd.py (train_utils.ON_POLICY_LIMITS) and this script's own; the
# cross-field eps rules are mopd.check_objective's
LIMITS = merge_limits(ON_POLICY_LIMITS, {">= 0": "kl_coef"})


def no_signal_frac(rewards, n):
    """The fraction of GRPO groups (n consecutive rewards) whose rewards are all equal: their
    advantage r - mean is 0, so they add nothing to the policy gradient."""
    groups = [rewards[i:i + n] for i in range(0, len(rewards), n)]
    return sum(len(set(g)) == 1 for g in groups) / len(groups)


NO_SIGNAL_STEPS = 3  # warn once every group has been all-equal for this many steps in a row


def no_signal_warning(steps, n, what="the policy gradient"):
    return (f"warning: no GRPO signal for {steps} steps in a row: in every group the --n={n} samples of a prompt "
            f"got the same reward, so every advantage is 0 and {what} is 0. Try more samples per prompt (--n), "
            f"an easier task (or a stronger --init), or a higher --temperature.")


def rl_step(model, opt, tok, domains, weights, cfg, step, ref=None, engine=None):
    """Sample a batch, score it with each prompt's domain reward, one policy-gradient update.
    Under torchrun each rank does this on its own prompts; the metrics are over all ranks."""
    t0 = time.time()
    roll, rows, rewards, t_sample = sample_and_reward(model, tok, domains, weights, cfg, step, engine)
    t_reward = time.time() - t0 - t_sample  # decoding and each domain's reward function
    adv = group_advantages(rewards, cfg.n, cfg.std_norm).to(roll.tokens.device)
    # old_logp: the sampler's untruncated log-probs (top-p/top-k are not reweighted; README)
    batch = {"tokens": roll.tokens, "mask": roll.response_mask[:, 1:], "old_logp": roll.policy_logprobs[:, 1:]}
    t_ref = time.time()
    if ref is not None:
        batch["ref_logp"] = torch.zeros_like(batch["old_logp"])
        with torch.no_grad():  # forwards of the update's micro-batch size (mopd.row_groups)
            for part, ok in distributed.in_step(row_groups(batch["mask"], list(range(len(roll.tokens))), cfg)):
                lp = policy_logprobs(ref, roll.tokens[part], batch["mask"][part], cfg.temperature)
                if ok:
                    batch["ref_logp"][part] = lp
        if ref.is_sharded():  # free its root, which FSDP keeps gathered after forward
            ref.reshard()
    t_ref = time.time() - t_ref
    t_update = time.time()
    return_freed_memory()  # the rollout's freed buffers go back to the OS before the update's activations
    opt.zero_grad(set_to_none=True)
    # one advantage per sequence, broadcast over its tokens
    m = pg_update(model, batch, lambda r, logp, w: adv[r, None].expand(-1, w), cfg, cfg.micro_batch, cfg.kl_coef)
    gnorm = clip_and_step(model, opt, cfg.grad_clip)
    t_update = time.time() - t_update
    # every rank's rows, in order: the same metrics on every rank (rank 0 logs them)
    rewards = distributed.gather_list(rewards)
    doms = distributed.gather_list([e.domain for e in rows])
    n_tok = sum(distributed.gather_list(roll.response_lens.tolist()))
    per_domain = {}
    for d in domains:
        rs = [r for r, dom in zip(rewards, doms) if dom == d.name]
        if rs:
            per_domain[d.name] = sum(rs) / len(rs)
    return {**m, "reward": sum(rewards) / len(rewards), "reward_by_domain": per_domain, "grad_norm": gnorm,
            "no_signal_frac": no_signal_frac(rewards, cfg.n),  # groups all-equal: advantage 0
            "samples": (step + 1) * len(rewards),  # sampled responses so far (sample efficiency)
            "response_len": n_tok / len(rewards), "tokens_per_s": n_tok / (time.time() - t0),
            "sample_s": t_sample, "reward_s": t_reward, **({"ref_s": t_ref} if ref is not None else {}),
            **({"sync_s": engine.sync_s} if engine is not None else {}),
            "update_s": t_update, "step_s": time.time() - t0}


def main(argv=None):
    cfg = parse_config(Config, argv, PRESETS, LIMITS)
    print_config(cfg)
    check_objective(cfg)
    if cfg.n < 2:  # one sample per prompt: every group advantage is 0, nothing would be learnt
        raise ValueError(f"--n={cfg.n}: GRPO needs >= 2 samples per prompt (its advantage is r - mean of the group)")
    check_start(cfg)
    with checkpoint.Run(cfg, sources={"--init": cfg.init}) as run:  # OUT_DIR: locked, checked
        set_seed(cfg.seed)
        tok, model, opt, start, src = load_for_training(cfg, run.state)
        domains = get_domains(cfg.domains, cfg.data_dir or None, fits=prompt_fits(tok, model, cfg))
        weights = parse_weights(cfg.domain_weights, domains)
        ref = load_frozen(cfg.init, torch.float32, cfg.device) if cfg.kl_coef else None
        engine = make_engine(cfg, model)  # None: the native sampler (rollout.generate)
        run.begin(start)
        flat = 0  # consecutive steps in which every group was all-equal
        for step in range(start, cfg.steps):
            lr = set_lr(opt, cfg, step)
            row = {"step": step + 1, "lr": lr, **rl_step(model, opt, tok, domains, weights, cfg, step, ref, engine)}
            run.check_finite(row)  # NaN/Inf loss or gradient: stop, the last checkpoint stays the last good one
            if due(step, cfg.eval_every, cfg.steps):
                t_eval = time.time()
                row["eval"] = evaluate(model, tok, domains, cfg.max_new_tokens, limit=cfg.eval_limit,
                                       max_cache_bytes=cache_bytes(cfg))
                row["eval_s"] = time.time() - t_eval
            run.log(row, show=("reward", "no_signal_frac", "loss", "ratio_mean"))
            flat = flat + 1 if row["no_signal_frac"] == 1 else 0
            if flat == NO_SIGNAL_STEPS and distributed.world()[0] == 0:  # once per such stretch
                print(no_signal_warning(flat, cfg.n), flush=True)
            if due(step, cfg.ckpt_every, cfg.steps):
                checkpoint.save_checkpoint(cfg.out_dir, model, src, run.trainer_state(step + 1), opt)
            run.stop_if_interrupted()  # Ctrl-C during this step: stop now that it is logged (and saved, if due)
    print0(f"saved {cfg.out_dir}")


if __name__ == "__main__":
    cli(main)
