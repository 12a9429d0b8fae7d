"""
Stage 3: MOPD, Multi-Teacher On-Policy Distillation. The main script of this project.

Each step:
  1. sample prompts by the domain mixture; each carries its domain label d(x)
  2. the student samples its own responses y ~ pi_theta(.|x)   (on-policy: rollout.generate)
  3. route each response to the teacher of d(x), and only to it   (teachers.route)
  4. that teacher scores the student's tokens, a prefill, never generation (teachers.score)
  5. update the student with the dense per-token signal           (mopd.py)
The default objective is the paper's policy-gradient form of the reverse KL:
      A_t  = clip( sg[ log pi_T(y_t) - log pi_theta(y_t) ], -5, 5 )  (+ alpha * A_ORM)
      loss = - mean_seq (1/|y|) sum_t w_t A_t log pi_theta(y_t)
through the same update as RL (mopd.pg_update); --loss=topk|reverse_kl|forward_kl|jsd give
Eq. 5 and the exact full-vocabulary divergences (mopd.distill_update) for ablations.
Each step prints one line (checkpoint.readout): reward and kl_est per domain, the exact KL
on the steps that compute it, loss, response length, and the seconds of each phase; score_s
is the teachers' time for every loss (Teachers.seconds), update_s the update's other time.

    python train_mopd.py --preset=toy --teacher=rev=out/toy/teacher_rev,sort=out/toy/teacher_sort,...
    torchrun --nproc_per_node=8 train_mopd.py ...   (multi-GPU: see the scale notes in README)
"""

import time
from dataclasses import dataclass

import torch

import checkpoint
import distributed
import vocab_kernels as kernels
import mopd
from config import cli, merge_limits, parse_config, print_config
from evaluate import evaluate
from rollout import cache_bytes, sample_and_reward
from tasks import get_domains
from teachers import Teachers, each_domain, parse_registry, route, validate
from train_teacher_rl import NO_SIGNAL_STEPS, no_signal_frac, no_signal_warning
from train_utils import (ON_POLICY_LIMITS, OnPolicyConfig, check_start, clip_and_step, due,
                         load_for_training, make_engine, parse_weights, print0, prompt_fits, return_freed_memory,
                         set_lr, set_seed)


@dataclass
class Config(OnPolicyConfig):  # the options shared with train_teacher_rl.py: train_utils.py
    teacher: str = ""              # "rev=DIR,sort=DIR,..." or a JSON file {"rev": "DIR", ...}
    teacher_offload: bool = False  # keep teachers in CPU memory, on the device only while scoring
    teacher_dtype: str = "float32" # frozen teachers compute in this dtype (bfloat16 at scale)
    teacher_engine: str = "native" # native (a sharded prefill) | vllm (prompt log-probs on a vLLM engine per teacher;
                                   #   --loss=pg or topk, temperature 1; the exact-KL log stays native)
    # objective
    loss: str = "pg"               # pg | topk | reverse_kl | forward_kl | jsd
    adv_clip: float = 5.0          # |A_t| <= adv_clip (PG form)
    orm_alpha: float = 0.0         # A_t += alpha * A_ORM (GRPO outcome advantage; needs n > 1)
    topk: int = 64                 # k of Eq. 5
    beta: float = 0.5              # jsd mixture (0 = forward KL, 1 = reverse KL)
    exact_kl_rows: int = 8         # rows per domain on which the exact full-vocab KL is logged (0 = off)
    exact_kl_every: int = 10       # ... every this many steps (it costs two extra forwards)
    # the domain mixture
    domain_mix: str = "fixed"      # fixed: --domain_weights; adaptive: each domain in proportion to its remaining gap
                                   #   to its teacher (an average of its recent kl_est), see adaptive_mixture
    mix_floor: float = 0.25        # adaptive: every domain keeps at least this fraction of the uniform share
    # MOPD's defaults of shared options (each keeps its place in --help)
    out_dir: str = "out/toy/mopd"
    domains: str = "rev,sort,inc"  # tasks.get_domains spec, each domain with its teacher in --teacher
    steps: int = 300
    prompts_per_step: int = 64
    n: int = 1                     # rollouts per prompt (the paper: 1; ORM mixing needs > 1)
    ratio_mode: str = "band"       # band: MiMo's w_t = sg[pi/mu] inside [eps_low, eps_high], else 0
    eps_low: float = 0.5
    eps_high: float = 2.0
    loss_agg: str = "seq-mean-token-mean"  # the paper's per-sequence then batch mean; or token-mean


PRESETS = {
    "toy": {},
    "worked": dict(max_new_tokens=64, domains="add,mul,isort", out_dir="out/worked/mopd"),  # PRESET=worked runs/toy.sh
    "tiny": dict(steps=3, prompts_per_step=8, max_new_tokens=8, eval_every=2, eval_limit=10, ckpt_every=1,
                 exact_kl_rows=4, exact_kl_every=1),
    # SmolLM2-135M-Instruct on a laptop CPU (runs/smol.sh): 10 steps x 32 prompts x 1 response
    "smol": dict(steps=10, prompts_per_step=32, max_new_tokens=48, lr=3e-5, min_lr=3e-5, micro_batch=4,
                 eval_every=1000, eval_limit=25, ckpt_every=5, exact_kl_rows=4, exact_kl_every=5),
    # The paper's Stage 3 on one 8xH100 node (memory: `python plan_memory.py`): Qwen3-30B-A3B
    # student and teachers, 2048 prompts x 1 rollout per step, mix 0.35/0.35/0.30, 32k tokens.
    # Give --init, --teacher and --domains=math:FILE,if:FILE,code:FILE (+ --data_dir).
    "qwen3-30b-a3b-8xh100": dict(steps=200, prompts_per_step=2048, n=1, max_new_tokens=32768,
                                 domain_weights="0.35,0.35,0.3", lr=1e-6, min_lr=1e-6,
                                 eval_every=20, eval_limit=256, ckpt_every=10, exact_kl_rows=2, exact_kl_every=20,
                                 bf16=True, activation_checkpointing=True, optimizer_offload=True,
                                 teacher_dtype="bfloat16", rollout_engine="vllm", engine_tp=4, engine_memory=0.6,
                                 rollout_cache_gib=24, micro_batch=64, micro_batch_tokens=65536),
}
LOSSES = ("pg", "topk", "reverse_kl", "forward_kl", "jsd")
# refused as soon as the command line is read, before anything loads (config.check): the
# options shared with train_teacher_rl.py (train_utils.ON_POLICY_LIMITS) and this script's own; the
# cross-field eps rules are mopd.check_objective's
LIMITS = merge_limits(ON_POLICY_LIMITS, {">= 1": "topk exact_kl_every", ">= 0": "orm_alpha exact_kl_rows",
                                          "> 0": "adv_clip", "in [0, 1]": "beta", "one of " + " ".join(LOSSES): "loss",
                                          "one of float32 bfloat16 float16": "teacher_dtype",
                                          "one of native vllm": "teacher_engine",
                                          "one of fixed adaptive": "domain_mix", "in [0, 1]": "mix_floor"})


def mopd_step(model, opt, tok, domains, weights, teachers, cfg, step, engine=None):
    """Student rollouts -> each routed to its domain's teacher -> scored -> one update.
    Under torchrun each rank does this on its own prompts; the metrics are over all ranks.
    engine: the student's vLLM engine (--rollout_engine=vllm), else the native sampler."""
    t_start = time.time()
    roll, rows_ex, rewards, t_sample = sample_and_reward(model, tok, domains, weights, cfg, step, engine)
    t_reward = time.time() - t_start - t_sample  # decoding and each domain's reward function
    names = [d.name for d in domains]
    row_dom = [e.domain for e in rows_ex]
    # mu: the sampler's untruncated log-probs (top-p/top-k are not reweighted; README)
    tokens, mask, mu = roll.tokens, roll.response_mask[:, 1:], roll.policy_logprobs[:, 1:]
    groups = route(row_dom)

    # the teacher's log-prob of every sampled token: the PG signal, and the sampled KL estimate
    # (the full-distribution losses get it from their own teacher prefill, during the update).
    # score_s: the teachers' own seconds (Teachers.seconds), here and inside the update, for
    # every loss; update_s: the update's other seconds
    s0 = teachers.seconds
    t_logp = torch.zeros_like(mu)
    if cfg.loss == "pg":  # prefills of training's micro-batch size (mopd.row_groups: rows and padded tokens)
        for d, rows, real in each_domain(groups, names):
            for part, ok in distributed.in_step(mopd.row_groups(mask, rows, cfg) if real else []):
                lp = teachers.score(d, tokens[part], mask[part], "logprobs", cfg.temperature)
                if ok:
                    t_logp[part] = lp
    t_score = teachers.seconds - s0

    # the exact KL on the first exact_kl_rows rows of each domain, before the update (so it
    # describes the policy that sampled); its seconds (the student's and teacher's forwards) apart
    all_dom = distributed.gather_list(row_dom)
    exact, t_exact = {}, {}
    if cfg.exact_kl_rows and (step + 1) % cfg.exact_kl_every == 0:
        t0 = time.time()
        exact = exact_kl_subsample(model, teachers, groups, names, tokens, mask, all_dom, len(row_dom), cfg)
        t_exact = {"exact_kl_s": time.time() - t0}

    t_update, s0 = time.time(), teachers.seconds
    return_freed_memory()  # the rollout's freed buffers go back to the OS before the update's activations
    opt.zero_grad(set_to_none=True)
    if cfg.loss == "pg":
        a_orm = None
        if cfg.orm_alpha:
            a_orm = mopd.group_advantages(rewards, cfg.n, cfg.std_norm).to(mu.device)

        def adv_fn(r, logp, w):
            a = mopd.mopd_advantage(t_logp[r, :w], logp, cfg.adv_clip)[0]
            return a if a_orm is None else a + cfg.orm_alpha * a_orm[r, None]
        batch = {"tokens": tokens, "mask": mask, "old_logp": mu}
        logp = torch.zeros_like(mu)
        m = mopd.pg_update(model, batch, adv_fn, cfg, cfg.micro_batch, logp_out=logp)
        clip_hits = (mopd.mopd_advantage(t_logp, logp, cfg.adv_clip)[1] & mask).sum().item()
        m = {**m, "adv_clip_hits": sum(distributed.gather_list([clip_hits])), "band_drop_frac": m.pop("clip_frac")}
    else:
        m = mopd.distill_update(model, tokens, mask, groups, teachers, cfg, names, teacher_logp=t_logp)
    gnorm = clip_and_step(model, opt, cfg.grad_clip)
    t_score += teachers.seconds - s0  # the teachers' prefills inside the update (every loss but pg)
    t_update = time.time() - t_update - (teachers.seconds - s0)

    # per-row numbers from every rank, in order; per-domain metrics from them: reward, length,
    # the sampled reverse-KL estimate E_mu[log mu - log pi_T] (of the sampler, before the update)
    kl_sum = ((mu - t_logp) * mask).sum(1).tolist()
    all_rows = distributed.gather_list(zip(row_dom, rewards, kl_sum, mask.sum(1).tolist(),
                                           roll.response_lens.tolist()))
    per = {}
    for d in names:
        rs = [r for r in all_rows if r[0] == d]
        if rs:
            per[d] = {"kl_est": sum(r[2] for r in rs) / max(1, sum(r[3] for r in rs)),
                      "reward": sum(r[1] for r in rs) / len(rs),
                      "response_len": sum(r[4] for r in rs) / len(rs), **exact.get(d, {})}
    if "adv_clip_hits" in m:  # a fraction of all response tokens, every rank's
        m["adv_clip_frac"] = m.pop("adv_clip_hits") / max(1, sum(r[3] for r in all_rows))
    if cfg.orm_alpha:  # the ORM term's GRPO groups: all-equal ones add nothing to it
        m["no_signal_frac"] = no_signal_frac([r[1] for r in all_rows], cfg.n)
    n_rows, n_tok = len(all_rows), sum(r[4] for r in all_rows)
    return {**m, "grad_norm": gnorm, "reward": sum(r[1] for r in all_rows) / n_rows,
            "kl_est": sum(r[2] for r in all_rows) / max(1, sum(r[3] for r in all_rows)),
            "by_domain": per, "samples": (step + 1) * n_rows, "response_len": n_tok / n_rows,
            "tokens_per_s": n_tok / (time.time() - t_start), "sample_s": t_sample, "reward_s": t_reward,
            "score_s": t_score, "update_s": t_update, **t_exact, "step_s": time.time() - t_start,
            **({"sync_s": engine.sync_s} if engine is not None else {})}


def exact_kl_subsample(model, teachers, groups, names, tokens, mask, all_dom, n_local, cfg):
    """{domain: {"kl_exact": ...}}: the exact KL(pi_theta || pi_T) per response token on the first
    cfg.exact_kl_rows rows of each domain in the whole batch (whichever ranks hold them)."""
    rank = distributed.world()[0]
    first = sum(distributed.gather_list([n_local])[:rank])  # global index of this rank's row 0
    seen = {}
    for dom in all_dom[:first]:  # rows of each domain on the ranks before this one
        seen[dom] = seen.get(dom, 0) + 1
    sub = {d: rows[:max(0, cfg.exact_kl_rows - seen.get(d, 0))] for d, rows in groups.items()}
    sub = {d: rows for d, rows in sub.items() if rows}
    out = {}
    for d, rows, real in each_domain(sub, names):
        k = exact_reverse_kl(model, teachers, d, tokens[rows], mask[rows], cfg.temperature)
        n = mask[rows].sum().item()
        tot = distributed.all_sum(torch.tensor([k if real else 0.0, n if real else 0.0], dtype=torch.float64,
                                               device=mask.device)).tolist()
        if tot[1]:
            out[d] = {"kl_exact": tot[0] / tot[1]}
    return out


@torch.no_grad()
def exact_reverse_kl(model, teachers, domain, tokens, mask, temperature):
    """Sum over response tokens of the exact KL(pi_theta || pi_T) over the full vocabulary."""
    was = model.training
    model.eval()
    h = model(tokens[:, :-1], return_hidden=True)
    th, tw = teachers.score(domain, tokens, mask, "hidden", temperature)
    k = kernels.kl(h, model.lm_head_weight, th, tw, kind="reverse", temperature=temperature, mask=mask)
    model.train(was)
    return k.sum().item()


MIX_DECAY = 0.7  # adaptive mixture: the weight of the past in each domain's gap estimate (~3 steps)


def adaptive_mixture(gap, names, floor):
    """
    The headroom-adaptive mixture: sample domain d with probability
        w_d = floor / D + (1 - floor) * g_d / sum_e g_e,
    g_d = an exponential average of d's kl_est, the sampled reverse KL to its own teacher per
    response token (what MOPD drives to 0: the remaining gap). A domain already at its teacher
    gets only its floor; one far behind gets most of the batch. Until every domain has a
    gap estimate (or when all gaps are 0), the uniform mixture.
    """
    if any(d not in gap for d in names):
        return [1.0] * len(names)
    tot = sum(max(gap[d], 0.0) for d in names)
    if tot <= 0:
        return [1.0] * len(names)
    return [floor / len(names) + (1 - floor) * max(gap[d], 0.0) / tot for d in names]


def update_gap(gap, by_domain):
    """One step's kl_est per domain into the running gaps (a domain with no row this step keeps its own)."""
    for d, m in by_domain.items():
        gap[d] = m["kl_est"] if d not in gap else MIX_DECAY * gap[d] + (1 - MIX_DECAY) * m["kl_est"]


def replay_gap(out_dir, start):
    """The gaps after step `start` of a resumed run, from its own metrics log: resume is exact."""
    import json
    import os
    gap, path = {}, os.path.join(out_dir + ".log", "metrics.jsonl")
    if start and os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "by_domain" in row and row.get("step", 0) <= start:
                    update_gap(gap, row["by_domain"])
    return gap


def teacher_engine_options(cfg):
    """Teachers' engine settings for --teacher_engine=vllm (None: the native prefill); what the
    engine cannot give the loss was refused by check_start (engine.check)."""
    if cfg.teacher_engine != "vllm":
        return None
    return dict(memory=cfg.engine_memory, tp=cfg.engine_tp, seed=cfg.seed)


def main(argv=None):
    cfg = parse_config(Config, argv, PRESETS, LIMITS)
    print_config(cfg)
    if cfg.orm_alpha and cfg.n < 2:
        raise SystemExit(f"error: --orm_alpha={cfg.orm_alpha} needs --n > 1 (GRPO group advantages)")
    mopd.check_objective(cfg)
    check_start(cfg)
    try:
        registry = parse_registry(cfg.teacher)
    except ValueError as e:
        raise ValueError(f"--teacher={cfg.teacher}: {e}") from None
    sources = {"--init": cfg.init, **{f"--teacher={d}": path for d, path in registry.items()}}
    with checkpoint.Run(cfg, sources) as run:  # OUT_DIR: locked, checked; run.state when resuming
        set_seed(cfg.seed)
        tok, model, opt, start, src = load_for_training(cfg, run.state)
        domains = get_domains(cfg.domains, cfg.data_dir or None, fits=prompt_fits(tok, model, cfg))
        weights = parse_weights(cfg.domain_weights, domains)
        teachers = Teachers(registry, device=cfg.device, dtype=getattr(torch, cfg.teacher_dtype),
                            offload=cfg.teacher_offload, engine=teacher_engine_options(cfg))
        teachers.check_domains([d.name for d in domains])
        for d in domains:  # before any step: whole files, and the student's tokenizer
            validate(tok, model, registry[d.name], d.name)
        if cfg.loss == "topk" and not 1 <= cfg.topk <= model.config.vocab_size:
            raise SystemExit(f"error: --topk={cfg.topk}: must be in [1, vocab size {model.config.vocab_size}]")
        engine = make_engine(cfg, model)  # None: the native sampler (rollout.generate)
        run.begin(start)
        flat = 0  # with --orm_alpha: consecutive steps in which every ORM group was all-equal
        names = [d.name for d in domains]
        gap = replay_gap(cfg.out_dir, start) if cfg.domain_mix == "adaptive" else {}
        for step in range(start, cfg.steps):
            lr = set_lr(opt, cfg, step)
            mix = adaptive_mixture(gap, names, cfg.mix_floor) if cfg.domain_mix == "adaptive" else weights
            row = {"step": step + 1, "lr": lr, **mopd_step(model, opt, tok, domains, mix, teachers, cfg, step, engine)}
            if cfg.domain_mix == "adaptive":
                update_gap(gap, row["by_domain"])
                row["mix"] = {d: w / sum(mix) for d, w in zip(names, mix)}
            run.check_finite(row)  # NaN/Inf loss or gradient: stop, the last checkpoint stays the last good one
            if due(step, cfg.eval_every, cfg.steps):
                t_eval = time.time()
                row["eval"] = evaluate(model, tok, domains, cfg.max_new_tokens, limit=cfg.eval_limit,
                                       max_cache_bytes=cache_bytes(cfg))
                row["eval_s"] = time.time() - t_eval
            run.log(row, show=("reward", "kl_est", "kl_exact", "no_signal_frac", "loss"))
            flat = flat + 1 if row.get("no_signal_frac") == 1 else 0
            if flat == NO_SIGNAL_STEPS and distributed.world()[0] == 0:  # once per such stretch
                print(no_signal_warning(flat, cfg.n, "the ORM term of the advantage (--orm_alpha)"), flush=True)
            if due(step, cfg.ckpt_every, cfg.steps):
                checkpoint.save_checkpoint(cfg.out_dir, model, src, run.trainer_state(step + 1), opt)
            run.stop_if_interrupted()  # Ctrl-C during this step: stop now that it is logged (and saved, if due)
    print0(f"saved {cfg.out_dir}")


if __name__ == "__main__":
    cli(main)
