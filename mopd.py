"""
The objective. One policy-gradient update serves both stages of MOPD:
- Stage 2, RL on verifiable rewards (train_teacher_rl.py): A_t = a group-normalised reward.
- Stage 3, MOPD (train_mopd.py): A_t = sg[log pi_T(y_t) - log pi_theta(y_t)], the dense
  per-token reverse-KL signal of the domain's teacher.
Each equation is quoted beside the function that computes it.

Tensors follow rollout.Rollout's layout: `tokens` [R, L] is prompt-then-response per row,
and everything per token is aligned with the *predicted* token, i.e. with tokens[:, 1:]
(shape [R, L-1]); `mask` marks the response tokens there.
"""

import torch

import distributed
import vocab_kernels as kernels
from teachers import each_domain

# -----------------------------------------------------------------------------
# log-probs of the policy

def policy_logprobs(model, tokens, mask, temperature=1.0):
    """
    log pi_theta(y_t | x, y_<t) for every t, [R, L-1], in fp32, from the final hidden states
    and the lm_head weight (kernels.token_logprobs never materialises [tokens x vocab]).
    Use the sampler's temperature so that, on-policy, pi_theta == the sampling policy mu.
    For a loss that weighs every token alike (SFT's mean): vocab_kernels.py computes the gradient
    during the forward pass.
    """
    hidden = model(tokens[:, :-1], return_hidden=True)
    return kernels.token_logprobs(hidden, model.lm_head_weight, tokens[:, 1:], temperature=temperature,
                                  mask=mask)


def policy_loss(model, tokens, mask, token_loss, temperature=1.0):
    """
    (sum_t token_loss(log pi_theta)_t, log pi_theta [R, L-1] detached), for a loss whose term
    at each token is a function of that token's log-prob (every policy-gradient loss here):
    kernels.token_logprob_loss forms each token's weight inside its chunk, so the logits are
    computed once and never as a whole [tokens x vocab].
    """
    hidden = model(tokens[:, :-1], return_hidden=True)
    return kernels.token_logprob_loss(hidden, model.lm_head_weight, tokens[:, 1:], token_loss,
                                      temperature=temperature, mask=mask)

# -----------------------------------------------------------------------------
# advantages

def group_advantages(rewards, n, std_norm=True, eps=1e-6):
    """
    GRPO: A_i = (r_i - mean(r_group)) / (std(r_group) + eps) over the n samples of a prompt
    (rows are prompt-major, n per prompt). std_norm=False gives Dr. GRPO's r_i - mean.
    A group whose rewards are all equal gets A = 0 (no signal, but it is never dropped).
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, n)
    a = r - r.mean(1, keepdim=True)
    if std_norm and n > 1:
        a = a / (r.std(1, keepdim=True) + eps)
    return a.flatten()


def k3_kl(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: e^(ref-logp) - (ref-logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1

def mopd_advantage(teacher_logp, logp, clip=5.0):
    """
    MOPD's per-token advantage (paper, PG form):
        A_t = clip( sg[ log pi_T(y_t | x, y_<t) - log pi_theta(y_t | x, y_<t) ], -clip, clip )
    Its policy gradient is, in expectation, the gradient of the per-token reverse KL
    KL(pi_theta || pi_T) with no credit to later tokens. A_t may be positive or negative.
    Returns (A [R, T], which tokens hit the clip).
    """
    a = (teacher_logp - logp).detach()
    return a.clamp(-clip, clip), a.abs() > clip

# -----------------------------------------------------------------------------
# the one policy-gradient update

def pg_token_loss(logp, old_logp, adv, mask, ratio_mode="clip", eps_low=0.2, eps_high=0.28):
    """
    Per-token surrogate with ratio_t = pi_theta(y_t) / mu(y_t) (mu = the policy that sampled):

      "clip" (PPO / GRPO / DAPO's clip-higher):
          L_t = -min( ratio_t * A_t , clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t )
      "band" (MiMo-V2-Flash Eq. 7-9, the MOPD default):
          w_t = sg[ratio_t] if eps_low <= ratio_t <= eps_high else 0
          L_t = - w_t * A_t * log pi_theta(y_t)
        (here eps_low / eps_high are the band's ends, e.g. 0.5 and 2.0)

    Both give -A_t * grad(ratio_t) inside their trust region and 0 outside it, and on-policy
    (ratio == 1) both reduce to the plain policy gradient -A_t * grad log pi_theta(y_t).
    Returns (loss per token [R, L-1], fraction of masked tokens that were clipped/dropped).
    """
    ratio = torch.exp(logp - old_logp)
    if ratio_mode == "clip":
        loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    elif ratio_mode == "band":
        keep = (ratio >= eps_low) & (ratio <= eps_high)
        loss = -(ratio.detach() * keep) * adv * logp
        clipped = ~keep
    else:
        raise ValueError(f"ratio_mode={ratio_mode!r}; expected 'clip' or 'band'")
    frac = (clipped & mask).sum() / mask.sum().clamp(min=1)
    return loss * mask, frac


LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
RATIO_MODES = ("clip", "band")


def check_objective(cfg):
    """
    Refuse, before step 1, eps settings that would train silently on nothing; one line naming
    the flags (config.cli prints it, exit 2). Single-field limits (ratio_mode, loss_agg,
    temperature, top_p, n) are in each script's LIMITS, checked by config.check.
    The trap this exists for: eps_low / eps_high mean *distances from 1* under "clip" but the
    band's *ends* under "band", so `--ratio_mode=band` with the clip defaults (0.2, 0.28)
    keeps no token with ratio ~1 and zeroes every gradient.
    """
    lo, hi = cfg.eps_low, cfg.eps_high
    if cfg.ratio_mode == "band" and not 0 <= lo < 1 < hi:
        raise ValueError(f"--ratio_mode=band keeps tokens with eps_low <= pi/mu <= eps_high, so it needs "
                         f"eps_low < 1 < eps_high (e.g. 0.5 and 2.0); got --eps_low={lo} --eps_high={hi}")
    if cfg.ratio_mode == "clip" and not (0 < lo < 1 and hi > 0):
        raise ValueError(f"--ratio_mode=clip clips pi/mu to [1 - eps_low, 1 + eps_high], so it needs "
                         f"0 < eps_low < 1 and eps_high > 0 (e.g. 0.2 and 0.28); got --eps_low={lo} --eps_high={hi}")


def aggregate(token_loss, mask, mode, num_seqs=None, num_tokens=None, max_len=None):
    """
    Reduce a per-token loss [R, L-1] to a scalar:
      "token-mean":          sum_all L_t / (number of response tokens)       (DAPO; RL default)
      "seq-mean-token-mean": mean over sequences of (1/|y|) sum_t L_t       (GRPO; the MOPD paper)
      "seq-mean-token-sum":  mean over sequences of sum_t L_t / L_max       (Dr. GRPO, no length bias)
    num_seqs / num_tokens are the whole batch's counts (over micro-batches and ranks) and
    max_len a constant (the generation budget; default the mask's width), so that
    micro-batches and ranks add up to the loss of the whole batch.
    """
    w = aggregate_weights(mask, mode, num_seqs, num_tokens, max_len, token_loss.dtype)
    return (token_loss * mask * w).sum()


def aggregate_weights(mask, mode, num_seqs=None, num_tokens=None, max_len=None, dtype=torch.float32):
    """Each token's weight in aggregate() [R, L-1]: the loss is sum_t weight_t * L_t."""
    num_seqs = num_seqs or mask.shape[0]
    max_len = max_len or mask.shape[1]
    ones = torch.ones(mask.shape, dtype=dtype, device=mask.device)
    if mode == "token-mean":
        return ones / (num_tokens or mask.sum().clamp(min=1))
    if mode == "seq-mean-token-mean":
        return ones / (mask.sum(1, keepdim=True).clamp(min=1) * num_seqs)
    if mode == "seq-mean-token-sum":
        return ones / (max_len * num_seqs)
    raise ValueError(f"loss_agg={mode!r}; expected token-mean, seq-mean-token-mean or seq-mean-token-sum")


def batch_counts(mask):
    """(sequences, response tokens >= 1) of the whole batch: this rank's rows plus every other
    rank's, the denominators that make micro-batches and ranks add up to one batch loss."""
    counts = distributed.all_sum(torch.tensor([mask.shape[0], mask.sum().item()], dtype=torch.float64,
                                              device=mask.device))
    return counts[0].item(), max(1.0, counts[1].item())


def train_loss(model, loss, share):
    """The loss to backpropagate: the objective plus, for an MoE model, the router's
    load-balancing loss of the forward just run (model.router_aux_loss(), the config's
    router_aux_loss_coef; 0 for dense models), weighted by this micro-batch's share of the
    batch so that it, too, adds up to one batch mean."""
    return loss + model.router_aux_loss().to(loss.device) * share


def micro_batches(mask, micro_batch, max_tokens=0):
    """
    The rows of each micro-batch: slices of micro_batch consecutive rows, or, with max_tokens,
    rows packed by length: sorted longest first, each micro-batch as many rows (at most
    micro_batch) as fit in max_tokens once padded to its longest row (a row longer than that
    goes alone). Answers of 2k..64k tokens then take ~mean/max as many forward/backward
    passes as one row each (the 30B presets: every pass of an offloaded optimizer moves the
    fp32 shards host<->GPU once). Rows are index tensors then (adv_fn and logp_out take them).
    """
    R = mask.shape[0]
    if not max_tokens:
        return [slice(i, min(i + micro_batch, R)) for i in range(0, R, micro_batch)]
    # each row's width as pg_update cuts it: its last response token's position + 2 (2 if none)
    used = torch.where(mask.any(1), mask.long().cumsum(1).argmax(1) + 2, 2)
    order = torch.argsort(used, descending=True, stable=True).tolist()
    out, cur = [], []
    for r in order:
        if cur and (len(cur) + 1) * int(used[cur[0]]) > max_tokens or len(cur) == micro_batch:
            out.append(torch.tensor(sorted(cur), device=mask.device))
            cur = []
        cur.append(r)
    if cur:
        out.append(torch.tensor(sorted(cur), device=mask.device))
    return out


def row_groups(mask, rows, cfg):
    """micro_batches() over `rows` (indices into mask): lists of those indices, one per forward;
    the teachers' and the reference model's prefills use them too, so no forward of any model
    holds more rows or padded tokens than a training micro-batch."""
    groups = micro_batches(mask[rows], cfg.micro_batch, getattr(cfg, "micro_batch_tokens", 0))
    idx = list(range(len(rows)))
    return [[rows[j] for j in (idx[g] if isinstance(g, slice) else g.tolist())] for g in groups]


def pg_update(model, batch, adv_fn, cfg, micro_batch=64, kl_coef=0.0, logp_out=None):
    """
    The policy-gradient update shared by RL and MOPD: for each micro-batch of rows, the
    policy's log-probs, per-token advantages from adv_fn(rows, logp, width) (detached by us),
    the surrogate loss, backward. The caller steps the optimiser.
    adv_fn must be elementwise in logp (A_t from log pi_theta(y_t) and constants, as both
    stages' are) and free of side effects: the loss is fused into the log-prob kernel
    (policy_loss), which calls it once per chunk of tokens; then once more for the metrics.
    logp_out [R, L-1], if given, receives log pi_theta of the sampled tokens.

    batch: dict with tokens [R, L], mask [R, L-1] (response tokens), old_logp [R, L-1] (the
    sampler's log-probs); optional ref_logp [R, L-1] for a k3 KL penalty weighted by kl_coef.
    cfg fields used: temperature, ratio_mode, eps_low, eps_high, loss_agg, max_new_tokens, and
    micro_batch_tokens if it has one (micro_batches: rows packed by length).
    Under torchrun each rank passes its own rows; the loss is normalised by the whole batch's
    counts over all ranks, and the metrics are sums over all ranks.
    Returns a dict of metrics (means over the batch).
    """
    tokens, mask, old = batch["tokens"], batch["mask"], batch["old_logp"]
    num_seqs, n_tok = batch_counts(mask)
    sums = torch.zeros(5, dtype=torch.float64, device=mask.device)  # loss, clipped, ratio, |ratio-1|, kl
    scale = distributed.grad_scale()
    groups = micro_batches(mask, micro_batch, getattr(cfg, "micro_batch_tokens", 0))
    for i in range(distributed.global_max(len(groups))):
        dummy = i >= len(groups)  # this rank has no rows left: a zero-weight pass keeps FSDP in step
        rows = slice(0, 1) if dummy else groups[i]
        m = mask[rows]
        # drop right padding that no row of this micro-batch uses
        width = int(m.any(0).nonzero().max()) + 2 if m.any() else 2
        tok, m, o = tokens[rows, :width], m[:, :width - 1], old[rows, :width - 1]
        ref = batch["ref_logp"][rows, :width - 1] if kl_coef and "ref_logp" in batch else None
        agg_w = aggregate_weights(m, cfg.loss_agg, num_seqs, n_tok, cfg.max_new_tokens) * m

        def terms(logp):  # each token's term of the batch loss, from its log-prob (elementwise)
            # sg[...]: advantages carry no gradient
            adv = torch.zeros_like(logp) if dummy else adv_fn(rows, logp.detach(), width - 1).detach()
            token_loss, frac = pg_token_loss(logp, o, adv, m, cfg.ratio_mode, cfg.eps_low, cfg.eps_high)
            kl = k3_kl(logp, ref) * m if ref is not None else torch.zeros_like(logp)
            return token_loss + kl_coef * kl, frac, kl

        loss, logp = policy_loss(model, tok, m, lambda lp: terms(lp)[0] * agg_w, cfg.temperature)
        (train_loss(model, loss, m.shape[0] / num_seqs) * (0.0 if dummy else scale)).backward()
        if not dummy:
            with torch.no_grad():
                _, frac, kl = terms(logp)
                ratio = torch.exp(logp - o)[m]
                sums += torch.stack([loss.detach(), frac * m.sum(), ratio.sum(), (ratio - 1).abs().sum(),
                                     kl.sum()]).double()
                if logp_out is not None:
                    logp_out[rows, :width - 1] = logp
    loss, clipped, ratio, absdev, kl = distributed.all_sum(sums).tolist()
    # ratio_mean is the training/sampling importance weight: exactly 1 only when the sampler
    # and the trainer compute identical log-probs (it drifts with kernels, dtypes, MoE routing)
    return dict(loss=loss, clip_frac=clipped / n_tok, ratio_mean=ratio / n_tok, ratio_absdev=absdev / n_tok,
                kl=kl / n_tok)


# -----------------------------------------------------------------------------
# the full-distribution forms (ablations): top-k (Eq. 5), exact reverse / forward KL, JSD

def distill_update(model, tokens, mask, groups, teachers, cfg, domains, teacher_logp=None):
    """
    Backward of a divergence computed over the vocabulary rather than through the sampled token:
      "topk" (paper Eq. 5, K_t = the teacher's top-k ids, no renormalisation):
          loss_t = sum_{v in K_t} [ p_theta(v) log(p_theta(v) / p_T(v)) - p_theta(v) + p_T(v) ]
      "reverse_kl": sum_v p_theta(v) log(p_theta(v) / p_T(v))   (the dense limit of both forms)
      "forward_kl": sum_v p_T(v) log(p_T(v) / p_theta(v));  "jsd": generalised JSD (cfg.beta)
    Teachers score each micro-batch just in time (top-k ids or hidden states, never logits),
    then the loss is aggregated per sequence like the PG form. `domains`: every domain name, in
    one order on all ranks. teacher_logp [R, L-1], if given, receives log pi_T of the sampled
    tokens from the same prefill (for the KL-estimate metric). The caller steps the optimiser.
    """
    num_seqs, n_tok = batch_counts(mask)
    total = torch.zeros((), dtype=torch.float64, device=mask.device)
    for d, rows, real in each_domain(groups, domains):
        for i in range(distributed.global_max(-(-len(rows) // cfg.micro_batch) if real else 0)):
            dummy = not real or i * cfg.micro_batch >= len(rows)  # keep FSDP's collectives in step
            r = rows[:1] if dummy else rows[i * cfg.micro_batch:(i + 1) * cfg.micro_batch]
            tok, m = tokens[r], mask[r]
            hidden = model(tok[:, :-1], return_hidden=True)
            what = "topk" if cfg.loss == "topk" else "hidden"
            t_out, t_sampled = teachers.score(d, tok, m, (what, "logprobs"), cfg.temperature, k=cfg.topk)
            if teacher_logp is not None and not dummy:
                teacher_logp[r] = t_sampled
            if cfg.loss == "topk":
                ids, t_lp = t_out
                per_tok = kernels.topk_kl(hidden, model.lm_head_weight, ids, t_lp, cfg.temperature, mask=m)
            else:
                th, tw = t_out
                kind = {"reverse_kl": "reverse", "forward_kl": "forward", "jsd": "jsd"}[cfg.loss]
                per_tok = kernels.kl(hidden, model.lm_head_weight, th, tw, kind=kind, beta=cfg.beta,
                                     temperature=cfg.temperature, mask=m)
            loss = aggregate(per_tok * m, m, cfg.loss_agg, num_seqs=num_seqs, num_tokens=n_tok,
                             max_len=cfg.max_new_tokens)
            (train_loss(model, loss, len(r) / num_seqs) * (0.0 if dummy else distributed.grad_scale())).backward()
            if not dummy:
                total += loss.detach().double()
    return {"loss": distributed.all_sum(total).item()}
