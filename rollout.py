"""
Hand-written KV-cached sampling: the student's rollouts for RL and for MOPD.

- generate(): prefill each prompt once (a prefix shared by all prompts, such as a chat
  template's system prompt, only once in all), copy its cache rows n times, then decode all
  rows together, one token per step, with per-row positions (prompts are right-padded, so
  row b's token at position p sits in cache slot p; a ragged batch cannot garble). Rows that
  have stopped leave the batch as it goes (COMPACT_AT), so short answers stop costing.
- sampling_logits(): the one place that turns logits into the distribution we sample from
  (temperature, then top-k, then top-p). The sampler and any later re-scoring
  (sampling_logprobs) use it, so `response_logprobs` are the log-probs of the distribution
  that was sampled.
- sample_next(): one exact draw per row: inverse-CDF over a float64 CDF with a 53-bit uniform,
  so even at a 152k vocabulary every token is drawn with its own probability (an fp32 CDF and
  fp32 uniforms sample a distribution ~1e-3 away in total variation and never draw the tail).
  It records two log-probs per token: `logprobs`, the exact log mu of the (truncated)
  distribution sampled, and `policy_logprobs`, the untruncated log-softmax(logits / T), which is
  what the trainer computes on-policy and the importance weight's denominator (README).
- Randomness is per row: row (prompt i, sample j) draws its uniforms from its own PCG64 stream
  seeded by a hash of (seed, first_prompt + i, j) (row_uniforms), so a row's tokens do not
  depend on what else is in the batch, and a slice of the prompts starting at first_prompt
  (one rank's share under torchrun) samples exactly what the whole batch samples for them
  (up to fp32 rounding: a matmul over fewer rows may round a logit differently, ~1e-6, which
  moves a token only when its uniform falls that close to a CDF boundary; one row of 64 in
  48 SmolLM2 tokens, measured; the tests check tokens equal on the tiny model).
  The trainers pass seed = step_seed(seed, step), itself a hash of (seed, step), so no two
  (seed, step, prompt, sample) share a stream (seed + i would: (s, i + 1) == (s + 1, i)).
- The rollout half of an RL or MOPD step, sample_and_reward(): the step's prompts by the
  domain mixture (sample_examples, from step_seed(seed, step), so resume is exact), this
  rank's slice of them, n rollouts each, each scored by its own domain's reward; and the
  prompt/response glue every caller shares (encode_prompt, stop_ids, decode).
- A command line, like nanoGPT's sample.py:
      python rollout.py --model DIR --prompt "What is 2+3?" --n 4 --temperature 0.8
"""

import contextlib
import functools
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import distributed
import vocab_kernels as kernels
from config import cli, parse_config
from model import KVCache, Transformer, load_tokenizer, packed_linear


@dataclass
class Rollout:
    tokens: torch.Tensor          # [R, L] prompt then response, right-padded with pad_id
    prompt_lens: torch.Tensor     # [R]
    response_lens: torch.Tensor   # [R] including the stop token, when one was emitted
    response_mask: torch.Tensor   # [R, L] True on response tokens
    logprobs: torch.Tensor        # [R, L] log mu: log-prob of each response token under the distribution
                                  #   it was sampled from (after top-k/top-p), 0 elsewhere
    policy_logprobs: torch.Tensor # [R, L] log-softmax(logits / T) of each response token, untruncated (what
                                  #   the trainer computes on-policy); `logprobs` itself without top-k/top-p
    prompt_index: list            # row -> index of its prompt (rows are prompt-major, n per prompt)
    stopped: torch.Tensor         # [R] True where a stop token ended the row

    @property
    def response_ids(self):
        return [self.tokens[r, p:p + n].tolist() for r, (p, n) in
                enumerate(zip(self.prompt_lens.tolist(), self.response_lens.tolist()))]

    @property
    def response_logprobs(self):
        return [self.logprobs[r, p:p + n].tolist() for r, (p, n) in
                enumerate(zip(self.prompt_lens.tolist(), self.response_lens.tolist()))]


def sampling_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """
    The logits of the distribution we actually sample from, over the last dim, in fp32:
    logits / T restricted to the top-k logits, then to the smallest set of tokens whose
    probability reaches top_p (the nucleus); excluded tokens get -inf. Its softmax is what
    generate() samples from, its log-softmax is sampling_logprobs().
    """
    return _truncate(_scale(logits, temperature), top_k, top_p)


def _scale(logits, temperature):
    """logits / T in fp32: the untruncated policy at the sampling temperature."""
    logits = logits.float()
    if temperature != 1.0:  # x / 1 == x exactly: skip a pass over [rows x vocab]
        logits = logits / temperature
    return logits


def _truncate(logits, top_k=0, top_p=1.0):
    """top-k then top-p of already scaled logits; returns `logits` itself when neither applies."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sampling_logprobs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """
    log pi(v) of the distribution we actually sample from (see sampling_logits), fp32.
    temperature == 0 means greedy; there is no sampling distribution then, so we return the
    plain log-softmax (T = 1) and generate() takes the argmax.
    """
    if temperature == 0:
        return F.log_softmax(logits.float(), dim=-1)
    return F.log_softmax(sampling_logits(logits, temperature, top_k, top_p), dim=-1)


def sample_next(logits, u, temperature=1.0, top_k=0, top_p=1.0, out=None):
    """
    One token per row from logits [R, V], by inverse CDF with the float64 uniforms u [R] in [0, 1).
    Returns (tokens [R], log mu [R], log pi [R]) in fp32: log mu is the log-prob of the token under
    the distribution sampled (after top-k/top-p), log pi under the untruncated softmax(logits / T)
    (the same tensor when nothing is truncated: computed once). out: an fp32 [R, V] buffer for the
    probabilities (generate reuses one for every step: at V = 152k, softmax into a fresh [R, V]
    tensor took 2-2.5x as long as into a reused one on the 2-core CPU, 7.1 vs 2.8 ms at 16 rows).

    Exact at any vocabulary size, in the relative sense: every token, down to the rarest, is drawn
    with its fp32 softmax probability times (1 + d), |d| <= ~5e-7 (_inverse_cdf: the fp32 block
    sums' rounding; the fp32 softmax itself carries ~1e-7), and log mu is the log of the very
    probability it was drawn with. (An fp32 CDF rounds every step to ~6e-8 *absolute* near 1 and
    fp32 uniforms come on a 2^-24 grid: at V = 152k that is ~1e-3 in total variation, and tokens
    below ~3e-8 are never drawn.)
    temperature == 0 is greedy (u unused; log mu = log pi = the plain log-softmax).
    """
    if temperature == 0:
        logp = sampling_logprobs(logits, 0)
        tok = logp.argmax(-1)
        lp = logp.gather(-1, tok[:, None])[:, 0]
        return tok, lp, lp
    scaled = _scale(logits, temperature)
    kept = _truncate(scaled, top_k, top_p)
    # probabilities, not log-probs: one pass over [rows x vocab] fewer
    probs = torch.softmax(kept, dim=-1, out=out) if out is not None else F.softmax(kept, dim=-1)
    tok, scale = _inverse_cdf(probs, u)
    lp = (probs.gather(-1, tok[:, None])[:, 0].double() * scale).log().float()
    if kept is scaled:
        return tok, lp, lp
    # the untruncated policy's log-prob of the same token: what the trainer's policy_logprobs
    # computes on-policy, the importance weight's denominator (README, "top-k / top-p")
    plp = scaled.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
    return tok, lp, plp


def _inverse_cdf(weights, u, block=256):
    """
    For each row of weights [R, V] (fp32, >= 0, any total > 0: unnormalised probabilities), a token
    drawn by inverse CDF at u, and `scale` (float64): the token was drawn with probability
    weights[token] * scale. Two levels, so that no float64 pass over [R, V] is needed (converting
    to float64 costs ~15x an fp32 sum on a CPU):
    1. a block of `block` tokens, by the float64 running sum of the blocks' fp32 sums S32_b;
    2. the token inside that block, by the float64 running sum of its weights (whose total is
       S64_b), at the point u falls within the block *rescaled* to S64_b.
    So token v of block b is drawn with probability (S32_b / sum_b' S32_b') * (w_v / S64_b): the
    in-block shares are exact, and the block's own mass is off only by S32_b / S64_b, an fp32 sum
    of 256 non-negative numbers, relative error <= 8 * 2^-24 ~ 5e-7. Every token's probability is
    right in relative terms, the rarest included (without the rescaling the last tokens of a block
    would absorb the block sum's absolute rounding, ~1e-7 of its mass).
    """
    R, V = weights.shape
    full = V // block * block
    sums = weights[:, :full].view(R, -1, block).sum(-1)
    if full < V:
        sums = torch.cat([sums, weights[:, full:].sum(-1, keepdim=True)], 1)
    ends = sums.double().cumsum(-1)  # the block CDF (float64: its running sum keeps every block's mass)
    total = ends[:, -1:]
    # below total strictly (u * total may round up to it); right=True lands on a block of
    # positive mass, never an empty (filtered) one
    target = torch.minimum(u.to(total)[:, None] * total, _below(total))
    b = torch.searchsorted(ends, target, right=True)
    start = torch.where(b > 0, ends.gather(1, (b - 1).clamp(min=0)), 0.0)
    mass = ends.gather(1, b) - start  # S32_b (> 0: a block of zero mass is never chosen)
    idx = b * block + torch.arange(block, device=weights.device)
    inner = weights.gather(1, idx.clamp(max=V - 1)).masked_fill(idx >= V, 0).cumsum(-1, dtype=torch.float64)
    exact = inner[:, -1:]  # S64_b
    k = torch.searchsorted(inner, torch.minimum((target - start) / mass * exact, _below(exact)), right=True)
    return (b * block + k)[:, 0], (mass / (exact * total))[:, 0]


def _below(x):
    """The largest float below x (x > 0)."""
    return x.nextafter(torch.zeros_like(x))


def mix_seed(*ints):
    """
    A 64-bit seed that hashes a tuple of ints (numpy's SeedSequence), unlike seed + i, where
    (s, i + 1) and (s + 1, i) coincide. Each int enters as two 32-bit words (mod 2^64): a
    fixed-width encoding, since SeedSequence's own is not one-to-one (it pads [5] to [5, 0], and
    splits 2^32 + 5 into [5, 1], which a tuple (5, 1) also gives).
    """
    return int(np.random.SeedSequence(_words(ints)).generate_state(1, np.uint64)[0])


def _words(ints):
    return [w for x in ints for w in (x % 2**64 & 0xFFFFFFFF, x % 2**64 >> 32)]


def row_uniforms(seed, first_prompt, num_prompts, n, T):
    """
    [num_prompts * n, T] float64 uniforms in [0, 1), rows prompt-major: row (prompt i, sample j)
    is a PCG64 stream seeded by SeedSequence(seed, first_prompt + i, j), 53 random bits each.
    The stream depends only on that triple: not on the batch, nor on how the prompts are split
    into slices (ranks) as long as each slice passes its global first_prompt. (numpy, not
    torch.Generator: the CPU generator keeps only the low 32 bits of its seed.)
    """
    return torch.from_numpy(np.stack([
        np.random.Generator(np.random.PCG64(np.random.SeedSequence(_words((seed, first_prompt + i, j))))).random(T)
        for i in range(num_prompts) for j in range(n)]))


def _validate(model, prompts, max_new_tokens, temperature, top_p, top_k, n):
    if not prompts:
        raise ValueError("generate: empty prompt list")
    if any(len(p) == 0 for p in prompts):
        raise ValueError(f"generate: prompt {[len(p) for p in prompts].index(0)} is empty")
    ctx = model.config.max_position_embeddings
    if max_new_tokens < 1 or max_new_tokens >= ctx:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be in [1, context {ctx})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > ctx:
        raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens={max_new_tokens} "
                         f"exceeds the model's context of {ctx}")
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"generate: token id {bad[0]} outside the vocabulary [0, {vocab})")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0")
    if top_k < 0:
        raise ValueError(f"generate: top_k={top_k} must be >= 0")
    if n < 1:
        raise ValueError(f"generate: n={n} must be >= 1")


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
             stop_token_ids=(), n=1, seed=None, pad_id=0, progress=False, first_prompt=0,
             compile=False, max_cache_bytes=None):
    """
    Sample n continuations of each prompt (a list of token-id lists of any lengths).
    Returns a Rollout, rows prompt-major: prompt 0's n samples, then prompt 1's, ...
    seed (any int; None: drawn from torch's global generator) and first_prompt (the global index
    of prompts[0], when this is one slice of a larger batch) choose the random streams: sample j
    of prompts[i] uses row_uniforms' stream (seed, first_prompt + i, j).
    compile: run each decode step through torch.compile (compiled_decode_step, gpt-fast's
    lever): the first call compiles twice (the cache length becomes symbolic at its second
    value), later calls with the same batch size reuse it. Finished rows then keep stepping.
    max_cache_bytes: the most the KV cache may take; more prompts than fit are sampled in
    consecutive chunks of whole prompts (cache_chunks). A row's tokens depend only on its own
    stream, so the result is the one-batch result (up to fp32 rounding of a smaller matmul).
    """
    _validate(model, prompts, max_new_tokens, temperature, top_p, top_k, n)
    if seed is None:  # one seed for all chunks
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
    chunks = cache_chunks(model, prompts, max_new_tokens, n, max_cache_bytes)
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, stop_token_ids=stop_token_ids, n=n, seed=seed,
              pad_id=pad_id, progress=progress, compile=compile)
    if len(chunks) == 1:
        return _generate(model, prompts, max_new_tokens, first_prompt=first_prompt, **kw)
    parts = []
    for a, b in chunks:  # a chunk past this rank's prompts: a dummy call, dropped (ranks call alike)
        r = _generate(model, prompts[a:b] or prompts[:1], max_new_tokens, first_prompt=first_prompt + a, **kw)
        if b > a:
            parts.append((a, r))
    return _concat(parts, pad_id)


def cache_chunks(model, prompts, max_new_tokens, n, max_cache_bytes):
    """
    [(a, b)]: consecutive slices of the prompts whose KV cache (n rows each, of the longest
    prompt + max_new_tokens slots, keys and values of every layer) fits in max_cache_bytes
    (None: one chunk). Under torchrun every rank makes the same number of chunks (a forward is
    a collective), the global maximum; a rank with fewer prompts gets empty slices at the end.
    At Qwen3-30B-A3B's shape (48 layers, 4 KV heads of 128, bf16: 96 KiB per token) one row of
    a 33k-token rollout is 3.1 GiB, so the MOPD preset's 256 rows per GPU cannot be one batch.
    """
    if not max_cache_bytes:
        return [(0, len(prompts))]
    dtype = getattr(model, "compute_dtype", None) or model.lm_head_weight.dtype
    per_prompt = KVCache.bytes_per_token(model.config, dtype) * n * (max(len(p) for p in prompts) + max_new_tokens)
    per_chunk = max(1, int(max_cache_bytes // per_prompt))
    count = distributed.global_max(-(-len(prompts) // per_chunk))
    size = -(-len(prompts) // count)
    return [(min(i * size, len(prompts)), min((i + 1) * size, len(prompts))) for i in range(count)]


def _concat(parts, pad_id):
    """One Rollout from those of consecutive prompt slices [(first prompt, Rollout)], right-padded."""
    L = max(r.tokens.shape[1] for _, r in parts)

    def pad(x, value):
        return F.pad(x, (0, L - x.shape[1]), value=value)
    cat = lambda f, v: torch.cat([pad(getattr(r, f), v) for _, r in parts])  # noqa: E731
    return Rollout(cat("tokens", pad_id), torch.cat([r.prompt_lens for _, r in parts]),
                   torch.cat([r.response_lens for _, r in parts]), cat("response_mask", False),
                   cat("logprobs", 0.0), cat("policy_logprobs", 0.0),
                   [a + i for a, r in parts for i in r.prompt_index], torch.cat([r.stopped for _, r in parts]))


def _generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
              stop_token_ids=(), n=1, seed=None, pad_id=0, progress=False, first_prompt=0,
              compile=False):
    """generate() for prompts whose KV cache is allocated at once."""
    # a sharded model computes where and in what dtype distributed.shard says (its fp32 master
    # shards may sit in host memory, and bf16 mixed precision makes bf16 keys and values)
    cfg = model.config
    device = getattr(model, "compute_device", None) or model.lm_head_weight.device
    dtype = getattr(model, "compute_dtype", None) or model.lm_head_weight.dtype
    P, R = len(prompts), len(prompts) * n
    plens = torch.tensor([len(p) for p in prompts], device=device)
    pmax = int(plens.max())

    # per-row random streams: uniforms[r, t] decides row r's token t (inverse-CDF sampling)
    base = int(seed)  # generate() drew one if the caller gave none
    uniforms = row_uniforms(base, first_prompt, P, n, max_new_tokens).to(device)

    # prefill every prompt once (right-padded), then give each prompt n rows of cache
    ids = torch.full((P, pmax), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, device=device)
    # inference_mode: ~5% less per-op overhead than no_grad, and decoding is call-bound; but not
    # for an FSDP-sharded model, whose gathered weights outlive this call and must stay
    # ordinary tensors for the training step that follows: no_grad there (not
    # inference_mode(False), which turns grad mode *on*: every decode step, chained through the
    # KV cache, was recorded for autograd).
    # Weights from a snapshot laid out for batched inference (model.py); one row decodes
    # with matrix-vector products, about as fast on the modules' own layout, so it skips
    # the copy (which costs as much as several such steps)
    with torch.no_grad() if model.is_sharded() else torch.inference_mode(), model.inference_weights(rows=R) if R > 1 else contextlib.nullcontext():
        # a prefix every prompt shares (a chat template's system prompt) is prefilled once, in
        # one row, and copied: its keys/values are the same in every row. Each prompt keeps
        # at least its last token for the second prefill, which gives the first logits.
        # (the same on every rank: under torchrun each forward is a collective)
        shared = distributed.global_max(_shared_prefix_len(prompts) if P > 1 else 0, op="min")
        cache = KVCache(cfg, 1 if shared else P, pmax + max_new_tokens, dtype, device)
        if shared:
            model(ids[:1, :shared], cache=cache, return_hidden=True)
            cache.repeat_rows(P)
        hidden = model(ids[:, shared:], cache=cache, return_hidden=True)
        last = hidden[torch.arange(P, device=device), plens - shared - 1]  # each prompt's last token
        cache.lengths = plens.clone()
        cache.repeat_rows(n)
        last = last.repeat_interleave(n, dim=0)
        pos = plens.repeat_interleave(n)  # next position of each row

        stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        out = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=device)
        out_lp = torch.zeros(R, max_new_tokens, device=device)
        truncated = top_k > 0 or top_p < 1.0  # else log pi == log mu: one tensor for both
        out_plp = torch.zeros_like(out_lp) if truncated else out_lp
        rlens = torch.zeros(R, dtype=torch.long, device=device)
        # the [rows x vocab] probabilities of every step go to a buffer made once (see
        # sample_next), and so do the logits where head_logits can write them (an fp32 head; the
        # compiled step and a bf16 head make their own)
        fp32_head = model.lm_head.weight.dtype == torch.float32
        buf = torch.empty(1 + fp32_head, R, cfg.vocab_size, device=device)
        logits_buf = buf[1] if fp32_head else None
        logits = head_logits(model, last, out=logits_buf)
        rows = torch.arange(R, device=device)  # the rows still decoded: logits, pos, cache hold these
        if compile:  # the cache's length is symbolic from the first graph (prompts of other lengths)
            for kv in cache.k + cache.v:
                torch._dynamo.maybe_mark_dynamic(kv, 2)
        steps = range(max_new_tokens)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="sampling", leave=False)
        for t in steps:
            tok, lp, plp = sample_next(logits, uniforms[rows, t], temperature, top_k, top_p, out=buf[0, :len(rows)])
            # a finished row not yet dropped writes past its length: the assembly below reads only
            # each row's first rlens tokens
            fin = done[rows]
            out[rows, t], out_lp[rows, t] = tok, lp
            if truncated:
                out_plp[rows, t] = plp
            rlens[rows] += (~fin).long()
            if len(stop):
                done[rows] = fin | torch.isin(tok, stop)
            if t == max_new_tokens - 1 or _all_done(done):
                break
            # Finished rows leave the batch once a quarter of it has finished (the cache copy
            # costs about one step, so not at every row): a row's tokens depend only on its own
            # logits and uniforms, so dropping the others changes nothing it samples, and the
            # steps left cost in proportion to the rows left (answers of 2..48 tokens in one
            # batch: ~half the work). Until then, and in a compiled step (compiled for one
            # batch size, and packed for it), finished rows keep stepping (what they sample is
            # never read). Every rank still makes the same number of calls (a rank keeps its
            # rows when all of them have finished).
            keep = ~done[rows]
            if not compile and 0 < int(keep.sum()) <= COMPACT_AT * len(rows):
                rows, tok, pos = rows[keep], tok[keep], pos[keep]
                cache.keep_rows(keep)
            if compile:  # the cache length as an int argument: symbolic, so one graph serves all
                logits = compiled_decode_step()(model, tok, pos, cache, used=int(pos.max()) + 1)
            else:
                logits = decode_step(model, tok, pos, cache, out=None if logits_buf is None else logits_buf[:len(rows)])
            pos += 1

    # ordinary tensors again (inference tensors cannot be used by autograd in training)
    out, out_lp, rlens, done = out.clone(), out_lp.clone(), rlens.clone(), done.clone()
    out_plp = out_plp.clone() if truncated else out_lp

    # assemble [R, L] = prompt then response per row, right-padded
    T = int(rlens.max())
    prep = plens.repeat_interleave(n)
    L = int((prep + rlens).max())
    tokens = torch.full((R, L), pad_id, dtype=torch.long, device=device)
    tokens[:, :pmax] = ids.repeat_interleave(n, dim=0)[:, :L]
    tokens[:, :pmax].masked_fill_(torch.arange(pmax, device=device)[None] >= prep[:, None], pad_id)
    cols = prep[:, None] + torch.arange(T, device=device)[None]
    valid = torch.arange(T, device=device)[None] < rlens[:, None]
    rows = torch.arange(R, device=device)[:, None].expand(R, T)
    tokens[rows[valid], cols[valid]] = out[:, :T][valid]
    mask = torch.zeros(R, L, dtype=torch.bool, device=device)
    mask[rows[valid], cols[valid]] = True
    logprobs = torch.zeros(R, L, device=device)
    logprobs[rows[valid], cols[valid]] = out_lp[:, :T][valid]
    policy_logprobs = logprobs
    if truncated:
        policy_logprobs = torch.zeros(R, L, device=device)
        policy_logprobs[rows[valid], cols[valid]] = out_plp[:, :T][valid]
    stopped = done if len(stop) else torch.zeros_like(done)
    return Rollout(tokens, prep, rlens, mask, logprobs, policy_logprobs,
                   [i for i in range(P) for _ in range(n)], stopped)


COMPACT_AT = 0.75  # drop finished rows once at most this fraction of the batch is still running


def decode_step(model, tok, pos, cache, out=None, used=None):
    """One token per row (tok [R] at positions pos [R]) through the model and its cache: the
    next logits [R, V] (in `out` where given and fp32). used: the cache slots attention reads
    (max(pos) + 1), given when compiled: forward would take it from pos with .item(), a break
    in the graph."""
    if used is not None:
        cache.used = used
    hidden = model(tok[:, None], positions=pos[:, None], cache=cache, return_hidden=True)
    return head_logits(model, hidden[:, 0], out)


def head_logits(model, h, out=None):
    """
    The logits [R, V] of final hidden states h [R, H], in fp32 whatever the model computes in:
    by the GEMM training computes them with (kernels.logits), so that mu, the sampler's log-prob,
    is the trainer's pi up to the hidden states' own rounding. bf16 logits would round a logit
    of 20 to a multiple of 0.125, biasing log mu by up to ~0.06 nats. (On CUDA in bf16 that GEMM
    is a bf16 one with fp32 output, without an fp32 copy of W.)
    """
    W = model.lm_head.weight
    if h.dtype == torch.float32:  # decoding on a CPU from the prepacked head (model.prepack)
        y = packed_linear(h, getattr(model, "head_packed", None), W.detach())
        if y is not None:
            return y
    # (detach: mm's out= refuses a tensor that requires grad; sampling takes no gradient)
    return kernels.logits(h, kernels.gemm_weight(W.detach(), h, torch.float32), out=out)


@functools.cache
def compiled_decode_step(backend="inductor", fullgraph=False):
    """
    decode_step under torch.compile (made on first use, shared by every call after it). What it
    fuses is the ~150 small ops between the matmuls of a step (norms, RoPE, residuals, SiLU,
    the cache writes and mask); the matmuls stay MKL's prepacked ones (model.mkl_linear) and
    attention reads the filled prefix of the cache only. The first call compiles twice: for
    its first cache length, then, at the second, for any length (dynamo's automatic dynamic
    shapes); a new batch size compiles once more. Weights are graph inputs, not constants, so
    an optimizer step between two calls needs no recompile. (backend, fullgraph: for the tests,
    which trace it with dynamo alone and insist on one graph.)
    """
    return torch.compile(decode_step, dynamic=None, backend=backend, fullgraph=fullgraph)


def _shared_prefix_len(prompts):
    """Length of the longest prefix all prompts share, short of the shortest prompt's end."""
    n = min(len(p) for p in prompts) - 1
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return max(n, 0)


def _all_done(done):
    """True when every row everywhere is done (an all-reduce under torch.distributed)."""
    return bool(distributed.global_max(int(done.all()), op="min"))


# -----------------------------------------------------------------------------
# prompts and responses, and the rollout half of a training step

def encode_prompt(tok, text):
    """Token ids of a prompt: the chat template when the tokenizer has one, else <bos> + text."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    ids = tok.encode(text, add_special_tokens=False)
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids


def stop_ids(tok, model):
    """Every id that ends a response: the tokenizer's EOS and the model config's (one or a list)."""
    eos = model.config.eos_token_id
    ids = {tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def step_seed(seed, step):
    """Every step's randomness (prompts, sampling) comes from here, so resume is exact: a 64-bit
    hash of (seed, step), so that no two (seed, step) pairs share a stream (seed * K + step,
    the old formula, made seed 0 at step K the same as seed 1 at step 0)."""
    return mix_seed(seed, step)


def sample_examples(domains, weights, num, rng):
    """`num` fresh training examples, each from a domain drawn by the mixing weights."""
    picks = rng.choices(range(len(domains)), weights=weights, k=num)
    return [domains[i].sample(rng) for i in picks]


def show_progress():
    """Whether sampling and evaluation draw tqdm bars (on stderr): on rank 0 only, and by default
    only when stderr is a terminal, so that a log file it is redirected to gets no bar lines
    (tqdm itself would draw into it). MOPD_PROGRESS=1 forces the bars on, MOPD_PROGRESS=0 off."""
    import os
    import sys
    if distributed.world()[0] != 0:
        return False
    env = os.environ.get("MOPD_PROGRESS", "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    return sys.stderr.isatty()


def cache_bytes(cfg):
    """--rollout_cache_gib in bytes, None when unbounded (generate's max_cache_bytes; evaluation
    in the trainers passes it too)."""
    return int(getattr(cfg, "rollout_cache_gib", 0) * 2**30) or None


@torch.no_grad()
def sample_and_reward(model, tok, domains, weights, cfg, step, engine=None):
    """
    The on-policy half of an RL or MOPD step: cfg.prompts_per_step prompts by the domain
    mixture, cfg.n rollouts each from `model`, each scored by its own domain's reward.
    With an engine (--rollout_engine=vllm, engine.py) the engine samples instead, after its
    weights are synced from `model` (seconds in engine.sync_s), with the same per-row seeds.
    Under torchrun this rank's contiguous slice [a, b) of the prompts (whole GRPO groups),
    sampled from the same random streams as one process would use: sample j of prompt a + i
    draws from the stream of (step_seed(seed, step), a + i, j) (row_uniforms).
    Returns (rollout, the Example of each row, rewards, seconds spent sampling).
    """
    rng = random.Random(step_seed(cfg.seed, step))
    exs = sample_examples(domains, weights, cfg.prompts_per_step, rng)
    a, b = distributed.rank_range(len(exs))
    exs = exs[a:b]
    model.eval()
    t0 = time.time()
    prompts = [encode_prompt(tok, e.prompt) for e in exs]
    kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, stop_token_ids=stop_ids(tok, model), n=cfg.n,
              seed=step_seed(cfg.seed, step), first_prompt=a, pad_id=tok.pad_token_id or 0)
    if engine is not None:
        engine.sync(model)
        roll = engine.generate(prompts, cfg.max_new_tokens, device=model.lm_head_weight.device, **kw)
        engine.sleep()  # on a GPU: the engine's memory is the trainer's until the next rollout
    else:
        with distributed.gathered(model, cfg.rollout_gather):
            roll = generate(model, prompts, cfg.max_new_tokens, progress=show_progress(),
                            max_cache_bytes=cache_bytes(cfg), **kw)
    t_sample = time.time() - t0
    by_name = {d.name: d for d in domains}
    rows = [exs[i] for i in roll.prompt_index]
    rewards = [by_name[e.domain].reward(decode(tok, ids), e) for ids, e in zip(roll.response_ids, rows)]
    model.train()
    return roll, rows, rewards, t_sample


# -----------------------------------------------------------------------------
# the command line, like nanoGPT's sample.py: python rollout.py --model DIR --prompt TEXT

@dataclass
class Config:
    model: str = ""                # HF directory (config.json + safetensors + tokenizer)
    prompt: list[str] = field(default_factory=list)  # prompt text; repeat for a batch
    no_chat_template: bool = False  # feed the raw prompt text
    # sampling
    n: int = 1                     # samples per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 = no top-k
    seed: int = -1                 # -1: a fresh seed every run
    # hardware
    device: str = "auto"           # auto: the GPU if there is one, else cpu
    dtype: str = "auto"            # auto: the checkpoint's; or float32 | bfloat16 | float16


# refused as soon as the command line is read, before the checkpoint loads (config.check)
LIMITS = {"required": "model prompt", "exists": "model", ">= 1": "n max_new_tokens", ">= 0": "temperature top_k",
          "in (0, 1]": "top_p", "one of auto float32 bfloat16 float16": "dtype", "device": "device"}


def main(argv=None):
    args = parse_config(Config, argv, limits=LIMITS)
    tok = load_tokenizer(args.model, "--model")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=device)
    if tok.chat_template and not args.no_chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for p in args.prompt]
    else:
        prompts = [tok.encode(p, add_special_tokens=False) for p in args.prompt]
    res = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                   stop_token_ids=stop_ids(tok, model), n=args.n,
                   seed=None if args.seed == -1 else args.seed,
                   pad_id=tok.pad_token_id or 0, progress=args.max_new_tokens >= 64)
    for r, ids in enumerate(res.response_ids):
        print(f"--- prompt {res.prompt_index[r]}, sample {r % args.n}:")
        print(args.prompt[res.prompt_index[r]] + decode(tok, ids))


if __name__ == "__main__":
    cli(main)
