"""
Hand-written KV-cached sampling: the student's rollouts for RL and for MOPD.

- generate(): prefill each prompt once (a prefix shared by all prompts, such as a chat
  template's system prompt, only once in all), copy its cache rows n times, then decode all
  rows together, one token per step, with per-row positions (prompts are right-padded, so
  row b's token at position p sits in cache slot p; a ragged batch cannot garble).
- sampling_logits(): the one place that turns logits into the distribution we sample from
  (temperature, then top-k, then top-p). The sampler and any later re-scoring
  (sampling_logprobs) use it, so `response_logprobs` are the log-probs of the distribution
  that was sampled.
- Randomness is per row: row (prompt i, sample j) draws its uniforms from a generator
  seeded by (seed + i, j), so a row's tokens do not depend on what else is in the batch.
- A command line, like nanoGPT's sample.py:
      python rollout.py --model DIR --prompt "What is 2+3?" --n 4 --temperature 0.8
"""

import argparse
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import distributed
from model import KVCache, Transformer


@dataclass
class Rollout:
    tokens: torch.Tensor          # [R, L] prompt then response, right-padded with pad_id
    prompt_lens: torch.Tensor     # [R]
    response_lens: torch.Tensor   # [R] including the stop token, when one was emitted
    response_mask: torch.Tensor   # [R, L] True on response tokens
    logprobs: torch.Tensor        # [R, L] sampling log-prob of each response token, 0 elsewhere
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
    logits = logits.float()
    if temperature != 1.0:  # x / 1 == x exactly: skip a pass over [rows x vocab]
        logits = logits / temperature
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
             stop_token_ids=(), n=1, seed=None, pad_id=0, progress=False):
    """
    Sample n continuations of each prompt (a list of token-id lists of any lengths).
    Returns a Rollout, rows prompt-major: prompt 0's n samples, then prompt 1's, ...
    """
    _validate(model, prompts, max_new_tokens, temperature, top_p, top_k, n)
    # a sharded model computes where and in what dtype distributed.shard says (its fp32 master
    # shards may sit in host memory, and bf16 mixed precision makes bf16 keys and values)
    cfg = model.config
    device = getattr(model, "compute_device", None) or model.lm_head_weight.device
    dtype = getattr(model, "compute_dtype", None) or model.lm_head_weight.dtype
    P, R = len(prompts), len(prompts) * n
    plens = torch.tensor([len(p) for p in prompts], device=device)
    pmax = int(plens.max())

    # per-row random streams: uniforms[r, t] decides row r's token t (inverse-CDF sampling)
    base = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
    uniforms = torch.stack([
        torch.rand(max_new_tokens, generator=torch.Generator().manual_seed((base + i) * 1_000_003 + j))
        for i in range(P) for j in range(n)]).to(device)

    # prefill every prompt once (right-padded), then give each prompt n rows of cache
    ids = torch.full((P, pmax), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, device=device)
    # inference_mode: ~5% less per-op overhead than no_grad, and decoding is call-bound; but not
    # for an FSDP-sharded model, whose gathered weights outlive this call and must stay
    # ordinary tensors for the training step that follows.
    # Weights from a snapshot laid out for batched inference (model.py); one row decodes
    # with matrix-vector products, about as fast on the modules' own layout, so it skips
    # the copy (which costs as much as several such steps)
    with torch.inference_mode(not model.is_sharded()), model.inference_weights() if R > 1 else contextlib.nullcontext():
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
        rlens = torch.zeros(R, dtype=torch.long, device=device)
        logits = model.lm_head(last)
        steps = range(max_new_tokens)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="sampling", leave=False)
        for t in steps:
            if temperature == 0:
                logp = sampling_logprobs(logits, temperature)
                tok = logp.argmax(-1)
                lp = logp.gather(-1, tok[:, None])[:, 0]
            else:  # probabilities, not log-probs: one pass over [rows x vocab] fewer
                probs = F.softmax(sampling_logits(logits, temperature, top_k, top_p), dim=-1)
                cdf = probs.cumsum(-1)
                # right=True never lands on a zero-probability (filtered) token
                tok = torch.searchsorted(cdf, (uniforms[:, t] * cdf[:, -1])[:, None], right=True)[:, 0]
                tok = tok.clamp_(max=probs.shape[-1] - 1)
                lp = probs.gather(-1, tok[:, None])[:, 0].log()  # == sampling_logprobs(...)[tok]
            out[:, t] = torch.where(done, pad_id, tok)
            out_lp[:, t] = torch.where(done, 0.0, lp)
            rlens += (~done).long()
            if len(stop):
                done |= torch.isin(tok, stop)
            if t == max_new_tokens - 1 or _all_done(done):
                break
            # finished rows keep stepping (on pad tokens, outputs ignored): the batch keeps its
            # shape, and under torch.distributed every rank makes the same number of calls
            hidden = model(tok[:, None], positions=pos[:, None], cache=cache, return_hidden=True)
            pos += 1
            logits = model.lm_head(hidden[:, 0])

    # ordinary tensors again (inference tensors cannot be used by autograd in training)
    out, out_lp, rlens, done = out.clone(), out_lp.clone(), rlens.clone(), done.clone()

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
    stopped = done if len(stop) else torch.zeros_like(done)
    return Rollout(tokens, prep, rlens, mask, logprobs,
                   [i for i in range(P) for _ in range(n)], stopped)


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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample from a Hugging Face checkpoint directory.")
    ap.add_argument("--model", required=True, help="HF directory (config.json + safetensors + tokenizer)")
    ap.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    ap.add_argument("--no_chat_template", action="store_true", help="feed the raw prompt text")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = Transformer.from_pretrained(args.model, dtype=dtype, device=args.device)
    if tok.chat_template and not args.no_chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for p in args.prompt]
    else:
        prompts = [tok.encode(p, add_special_tokens=False) for p in args.prompt]
    eos = model.config.eos_token_id
    stops = {tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos])
    res = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                   stop_token_ids=sorted(s for s in stops if s is not None), n=args.n, seed=args.seed,
                   pad_id=tok.pad_token_id or 0, progress=args.max_new_tokens >= 64)
    for r, ids in enumerate(res.response_ids):
        print(f"--- prompt {res.prompt_index[r]}, sample {r % args.n}:")
        print(args.prompt[res.prompt_index[r]] + tok.decode(ids, skip_special_tokens=True))


if __name__ == "__main__":
    main()
