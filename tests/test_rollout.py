"""rollout.py: cache correctness, ragged batches, random streams, the sampling distribution (exact
at a 152k vocabulary), the two recorded log-probs (top-p) and the importance weight, stops, bad input."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from rollout import generate, row_uniforms, sample_next, sampling_logprobs, step_seed


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (L,), generator=g).tolist() for L in lengths]


def test_ragged_batch_equals_each_prompt_alone(tiny_model):
    prompts = _prompts([3, 17, 8, 1])
    batch = generate(tiny_model, prompts, max_new_tokens=20, seed=123, n=2)
    _assert_each_prompt_alone(tiny_model, prompts, batch, max_new_tokens=20, seed=123)


def _assert_each_prompt_alone(model, prompts, batch, max_new_tokens, seed):
    """Each prompt's n=2 rows of `batch` equal generating that prompt alone as prompt i (first_prompt=i:
    what one rank does with its slice of a step's prompts)."""
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=max_new_tokens, seed=seed, first_prompt=i, n=2)
        for j in range(2):
            assert batch.response_ids[2 * i + j] == alone.response_ids[j]
            assert torch.allclose(torch.tensor(batch.response_logprobs[2 * i + j]),
                                  torch.tensor(alone.response_logprobs[j]), atol=1e-5)


def test_seed_reproducible_and_n_samples_differ(tiny_model):
    prompts = _prompts([5, 9])
    a = generate(tiny_model, prompts, max_new_tokens=16, seed=7, n=4)
    b = generate(tiny_model, prompts, max_new_tokens=16, seed=7, n=4)
    assert a.response_ids == b.response_ids
    assert a.prompt_index == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({tuple(r) for r in a.response_ids[:4]}) > 1  # n samples are independent draws


def test_row_streams_never_repeat():
    """Row (seed, step, prompt, sample) streams are distinct: 2 seeds x 50 steps x 16 prompts x 4
    samples give 6400 distinct (u_0, u_1). (The old seed ((seed*K + step) + i)*K' + j gave prompt i
    at step s + 1 the stream of prompt i + 1 at step s: 65 distinct streams per seed here.)"""
    firsts = torch.cat([row_uniforms(step_seed(seed, step), 0, 16, 4, 2) for seed in (0, 1) for step in range(50)])
    assert len({tuple(r) for r in firsts.tolist()}) == len(firsts) == 6400
    # 53-bit float64 uniforms, not fp32's 2^-24 grid
    assert firsts.dtype == torch.float64 and ((firsts * 2**24) % 1 != 0).all()
    # a slice starting at global prompt 5 (a rank's share) has exactly the whole batch's streams
    whole = row_uniforms(123, 0, 8, 4, 10)
    assert torch.equal(row_uniforms(123, 5, 3, 4, 10), whole[20:32])


@pytest.mark.parametrize("s1,s2", [(7, 8), (step_seed(0, 7), step_seed(0, 8))])
def test_seed_and_next_seed_share_no_row(tiny_model, s1, s2):
    """The same prompt at seed s and s + 1 (or at two consecutive steps) shares no response. With
    seed + i, every row of seed s + 1 repeated a row of seed s, one prompt on."""
    prompts = _prompts([5]) * 4
    a = generate(tiny_model, prompts, max_new_tokens=16, seed=s1, n=2)
    b = generate(tiny_model, prompts, max_new_tokens=16, seed=s2, n=2)
    assert not {tuple(r) for r in a.response_ids} & {tuple(r) for r in b.response_ids}


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 10, 1.0), (0.8, 20, 0.6),
                                                     (0.8, 0, 0.3)])
def test_response_logprobs_match_recomputed_forward(tiny_model, temperature, top_k, top_p):
    """logprobs = log mu, the truncated distribution sampled; policy_logprobs = the untruncated
    log-softmax(logits / T) of a full forward, what the trainer computes on-policy."""
    res = generate(tiny_model, _prompts([4, 12, 7]), max_new_tokens=24, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=1)
    with torch.no_grad():
        logits = tiny_model(res.tokens[:, :-1])
    lp = sampling_logprobs(logits, temperature, top_k, top_p).gather(-1, res.tokens[:, 1:, None])[..., 0]
    mask = res.response_mask[:, 1:]
    assert torch.isfinite(lp[mask]).all()
    assert (lp[mask] - res.logprobs[:, 1:][mask]).abs().max().item() <= 1e-5
    pi = F.log_softmax(logits / temperature, -1).gather(-1, res.tokens[:, 1:, None])[..., 0]
    assert (pi[mask] - res.policy_logprobs[:, 1:][mask]).abs().max().item() <= 1e-5
    assert (res.policy_logprobs[~res.response_mask] == 0).all()
    if top_k == 0 and top_p == 1.0:
        assert res.policy_logprobs is res.logprobs  # the same distribution: computed once
    else:  # truncation renormalises: mu > pi wherever the nucleus / top-k holds < all the mass
        assert (res.logprobs - res.policy_logprobs)[:, 1:][mask].max().item() > 0.05
    # the training layout: mask covers exactly prompt_len .. prompt_len + response_len
    for r in range(len(res.prompt_index)):
        p, n = res.prompt_lens[r].item(), res.response_lens[r].item()
        assert res.response_mask[r].nonzero()[:, 0].tolist() == list(range(p, p + n))


def _first_token_counts(model, prompt, draws, **kw):
    res = generate(model, [prompt], max_new_tokens=1, n=draws, seed=11, **kw)
    return torch.bincount(res.tokens[:, len(prompt)], minlength=model.config.vocab_size).double()


def _chi2(counts, probs):
    """Pearson chi-square over bins with expected count >= 5 (the rest pooled into one bin)."""
    exp = probs * counts.sum()
    big = exp >= 5
    obs_b, exp_b = torch.cat([counts[big], counts[~big].sum()[None]]), torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp_b > 0
    stat = ((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]).sum().item()
    df = int(keep.sum()) - 1
    return stat, df + 5 * math.sqrt(2 * df)  # statistic, a ~5-sigma acceptance bound


def test_sampling_frequencies_match_softmax(tiny_model):
    prompt = _prompts([6], seed=3)[0]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt]))[0, -1].double()
    T = 1.5
    counts = _first_token_counts(tiny_model, prompt, 20000, temperature=T)
    stat, bound = _chi2(counts, torch.softmax(logits / T, -1))
    assert stat < bound, (stat, bound)
    # the same test has the power to catch a wrong temperature
    wrong, _ = _chi2(counts, torch.softmax(logits / (T * 1.15), -1))
    assert wrong > bound, (wrong, bound)


def _peaked_logits(V=151_936, seed=0):
    """A Qwen-sized vocabulary: one token holds ~0.9, the other 151,935 share ~0.1."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g) * 2
    logits[V // 3] = 16.0
    return logits


def _old_fp32_distribution(p32):
    """The exact distribution of the previous sampler: fp32 CDF, fp32 uniforms (torch.rand: k / 2^24),
    target u * cdf[-1] in fp32, searchsorted right: count where each of the 2^24 uniforms lands."""
    cdf = p32.cumsum(-1)
    counts = torch.zeros(len(p32), dtype=torch.float64)
    for k0 in range(0, 2**24, 2**22):
        u = torch.arange(k0, k0 + 2**22, dtype=torch.float64).float() / 2**24
        tok = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=len(p32) - 1)
        counts += torch.bincount(tok, minlength=len(p32)).double()
    return counts / 2**24


def test_exact_draws_at_large_vocabulary():
    """At V = 151,936 the sampler draws every token with its fp32 softmax probability times (1 + d),
    |d| < 1e-6, the rarest included, and the log mu it records is the log-prob it drew with. The
    distribution is checked, not estimated (1e-6 on a 1e-12 token would take ~1e36 draws):
    sample_next is inverse-CDF sampling over the map its docstring states (_inverse_cdf: fp32 sums
    of 256-token blocks, their float64 running sum picks the block, the float64 running sum inside
    the block, rescaled to the block's share, picks the token), so token v is drawn iff u lands in
    its interval of that map. We (1) probe sample_next inside the intervals of the mode, the rarest
    tokens and random ones, each at 1/4 and 3/4 of its width (down to ~1e-12 wide): it returns that
    token and records the log of the interval's length; (2) compare the lengths with the fp32
    softmax (max relative error 2.1e-7 here, bound 5e-7) and the float64 one (TV ~2e-8). The old
    fp32 CDF with fp32 uniforms, enumerated exactly over all 2^24 uniforms, is 1.2e-3 away and
    never draws 54% of the tokens (7e-4 of the mass)."""
    T, block = 0.9, 256
    logits = _peaked_logits()
    V = len(logits)
    q = torch.softmax(logits.double() / T, -1)                     # the ideal distribution
    p32 = torch.softmax(logits / T, -1)                            # what the sampler computes
    # the map: block b's fp32 sum, float64 running sums across blocks and inside each block
    pad = torch.cat([p32, p32.new_zeros(-V % block)]).view(-1, block)
    # the blocks' fp32 sums taken exactly as _inverse_cdf takes them (same ops on the same [rows, V]
    # shape: the probes below sit inside intervals ~1e-12 wide, so the sums must match to the bit)
    rows = p32.expand(2 * (1 + 8 + 3 + 7), V).contiguous()
    full = V // block * block
    s32 = torch.cat([rows[:, :full].view(len(rows), -1, block).sum(-1), rows[:, full:].sum(-1, keepdim=True)], 1)[0]
    ends = s32.double().cumsum(0)
    inner = pad.double().cumsum(-1)
    blk, j = torch.arange(V) // block, torch.arange(V) % block
    start = torch.cat([ends.new_zeros(1), ends[:-1]])[blk]
    share = s32.double()[blk] / inner[blk, -1]                     # S32_b / S64_b
    lo = (start + (inner[blk, j] - pad[blk, j].double()) * share) / ends[-1]  # where its interval starts
    drawn = p32.double() * share / ends[-1]                        # and its length: the probability
    rel = (drawn / (p32.double() / p32.double().sum()) - 1).abs().max().item()
    tv_new = 0.5 * (drawn - q).abs().sum().item()
    old = _old_fp32_distribution(p32)
    tv_old = 0.5 * (old - q).abs().sum().item()
    assert rel < 1e-6 and tv_new < 1e-5 and tv_old > 1e-4, (rel, tv_new, tv_old)
    assert (old == 0).float().mean() > 0.3 and (drawn > 0).all()   # the old one never drew these

    # (1) sample_next draws from those intervals and records their log-lengths
    g = torch.Generator().manual_seed(1)
    last = torch.arange(block - 1, V, block)[:3]                   # a block's last token: its rounding
    probe = torch.cat([q.argmax()[None], q.argsort()[:8], last, torch.randint(0, V, (7,), generator=g)])
    u = torch.cat([lo[probe] + drawn[probe] * f for f in (0.25, 0.75)])
    assert len(u) == len(rows)
    tok, lp, plp = sample_next(logits.expand(len(u), -1), u, temperature=T)
    assert torch.equal(tok, probe.repeat(2))
    # mu = the interval's length, to ~1e-17 absolute (the fp64 CDF's rounding: 2e-5 relative on the
    # rarest tokens, p ~ 1e-12) and fp32 storage of log mu (~2e-6 relative)
    assert ((lp.double().exp() - drawn[tok]).abs() <= 1e-5 * drawn[tok] + 1e-15).all()
    assert (lp.double() - q[tok].log()).abs().max() < 1e-5       # = log softmax, to fp32 rounding
    assert plp is lp                                             # no truncation: one log-prob


def test_top_k_and_top_p_support_is_exact(tiny_model):
    prompt = _prompts([6], seed=4)[0]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt]))[0, -1].double()
    p = torch.softmax(logits, -1)
    topk = set(logits.topk(5).indices.tolist())
    counts = _first_token_counts(tiny_model, prompt, 4000, top_k=5)
    assert set(counts.nonzero()[:, 0].tolist()) == topk
    # nucleus, computed independently: sorted, keep while the mass *before* a token is < top_p
    order = p.argsort(descending=True).tolist()
    nucleus, mass = [], 0.0
    for v in order:
        if mass >= 0.5:
            break
        nucleus.append(v)
        mass += p[v].item()
    counts = _first_token_counts(tiny_model, prompt, 8000, top_p=0.5)
    assert set(counts.nonzero()[:, 0].tolist()) == set(nucleus)
    ref = torch.zeros_like(p)
    ref[nucleus] = p[nucleus] / p[nucleus].sum()
    stat, bound = _chi2(counts, ref)
    assert stat < bound


def test_top_p_importance_weight_is_one_on_policy(toy, tmp_path):
    """--top_p=0.3: the trainers compare their policy with the sampler's untruncated log-probs, so
    on-policy the importance weight is 1 and MOPD's band [0.5, 2] drops nothing. (With log mu of
    the nucleus as the denominator the ratio is the nucleus' mass: 0.31 here, and the band dropped
    every token.)"""
    import train_mopd
    import train_teacher_rl
    common = ["--preset=tiny", f"--init={toy['base']}", "--domains=rev,sort", "--steps=1", "--top_p=0.3",
              "--temperature=0.9"]
    train_mopd.main(common + [f"--out_dir={tmp_path}/m", f"--teacher=rev={toy['rev']},sort={toy['sort']}"])
    train_teacher_rl.main(common + [f"--out_dir={tmp_path}/r"])
    (m,) = [json.loads(l) for l in open(f"{tmp_path}/m.log/metrics.jsonl")]
    (r,) = [json.loads(l) for l in open(f"{tmp_path}/r.log/metrics.jsonl")]
    assert abs(m["ratio_mean"] - 1) < 1e-5 and m["band_drop_frac"] == 0, m
    assert abs(r["ratio_mean"] - 1) < 1e-5 and r["ratio_absdev"] < 1e-5, r


def test_stop_tokens(tiny_model):
    prompts = _prompts([5, 8, 3])
    free = generate(tiny_model, prompts, max_new_tokens=30, seed=5)
    stop = free.response_ids[0][3]  # a token row 0 emits at step 3
    res = generate(tiny_model, prompts, max_new_tokens=30, seed=5, stop_token_ids=[stop])
    for full, got, stopped in zip(free.response_ids, res.response_ids, res.stopped.tolist()):
        if stop in full:
            k = full.index(stop)
            assert got == full[:k + 1] and stopped  # the stop token is kept (the model must learn to stop)
        else:
            assert got == full and not stopped
    assert res.response_lens[0].item() <= 4
    # padded positions after a stop are pad and masked out
    r = 0
    end = res.prompt_lens[r] + res.response_lens[r]
    assert not res.response_mask[r, end:].any() and (res.tokens[r, end:] == 0).all()


@pytest.mark.parametrize("kw", [dict(seed=21), dict(seed=22, top_p=0.8, temperature=0.9)])
def test_dropping_finished_rows_changes_nothing(tiny_model, monkeypatch, kw):
    """generate drops finished rows from the batch (cache, positions, logits) once few enough
    are left: each row's tokens, both log-probs, length and stop flag are what the full batch
    gives when no row is ever dropped (COMPACT_AT = 0), and what dropping at every step gives
    (1.0). Rows finish at many different steps here, and the cache does shrink."""
    import rollout
    prompts = _prompts([5, 8, 3, 11, 2, 7])
    free = generate(tiny_model, prompts, max_new_tokens=24, n=3, **kw)
    stops = sorted({ids[k] for ids, k in zip(free.response_ids, [2, 5, 9, 14] * 5)})[:4]
    runs, sizes = {}, {}
    real = rollout.KVCache.keep_rows
    for at in (0.0, 0.75, 1.0):
        monkeypatch.setattr(rollout, "COMPACT_AT", at)
        sizes[at] = []
        monkeypatch.setattr(rollout.KVCache, "keep_rows",
                            lambda self, keep: (real(self, keep), sizes[at].append(self.k[0].shape[0])))
        runs[at] = generate(tiny_model, prompts, max_new_tokens=24, n=3, stop_token_ids=stops, **kw)
    ref = runs[0.0]
    assert sizes[0.0] == [] and len(sizes[1.0]) > len(sizes[0.75]) >= 1  # it did drop rows
    assert len(set(ref.response_lens.tolist())) >= 4  # rows end at different steps
    for at in (0.75, 1.0):
        got = runs[at]
        assert got.response_ids == ref.response_ids
        assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.response_mask, ref.response_mask)
        assert torch.equal(got.stopped, ref.stopped) and torch.equal(got.response_lens, ref.response_lens)
        # the same token's log-prob from a smaller batch: fp32 matmul rounding only
        torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.policy_logprobs, ref.policy_logprobs, rtol=0, atol=1e-5)


def test_greedy_is_deterministic_and_argmax(tiny_model):
    prompts = _prompts([7])
    a = generate(tiny_model, prompts, max_new_tokens=10, temperature=0, seed=1)
    b = generate(tiny_model, prompts, max_new_tokens=10, temperature=0, seed=2)
    assert a.response_ids == b.response_ids
    with torch.no_grad():
        logits = tiny_model(a.tokens[:, :-1])
    assert (logits.argmax(-1)[0, 6:] == a.tokens[0, 7:]).all()


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts=[]), "empty prompt list"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1] * 250]), "exceeds the model's context of 256"),
    (dict(prompts=[[1]], max_new_tokens=256), "max_new_tokens=256 must be in"),
    (dict(prompts=[[1]], top_p=0.0), "top_p=0.0"),
    (dict(prompts=[[1]], top_p=1.5), "top_p=1.5"),
    (dict(prompts=[[1]], temperature=-1.0), "temperature=-1.0"),
    (dict(prompts=[[1]], n=0), "n=0"),
    (dict(prompts=[[1, 500]]), "token id 500 outside the vocabulary"),
])
def test_bad_input(tiny_model, kwargs, msg):
    kw = dict(max_new_tokens=8) | kwargs
    with pytest.raises(ValueError, match=msg):
        generate(tiny_model, **kw)


def test_cli(hf_dirs, tmp_path, capsys):
    """The sample.py-style command line runs on a checkpoint directory with a tokenizer."""
    import shutil
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import rollout
    d = tmp_path / "m"
    shutil.copytree(hf_dirs["qwen3"], d)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789 +=?"
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>").save_pretrained(d)
    rollout.main(["--model", str(d), "--prompt", "what is 2+3?", "--prompt", "hi", "--n", "2",
                  "--max_new_tokens", "5", "--seed", "0"])
    out = capsys.readouterr().out
    assert out.count("--- prompt") == 4 and "what is 2+3?" in out


def test_shared_prefix_is_prefilled_once_and_changes_nothing(tiny_model):
    """Prompts sharing a prefix (a chat template's system prompt) prefill it once, in one row."""
    prefix = _prompts([10], seed=5)[0]
    prompts = [prefix + p for p in _prompts([3, 1, 6], seed=6)]
    shapes = []
    hook = tiny_model.embed_tokens.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    try:
        batch = generate(tiny_model, prompts, max_new_tokens=12, seed=3, n=2)
    finally:
        hook.remove()
    assert shapes[:2] == [(1, 10), (3, 6)]  # the prefix in one row, then each prompt's own tokens
    _assert_each_prompt_alone(tiny_model, prompts, batch, max_new_tokens=12, seed=3)


def test_inference_weights_are_a_fresh_snapshot_per_call(tiny_model):
    """generate() sees a weight update made between two calls, and leaves no snapshot behind."""
    import copy
    model = copy.deepcopy(tiny_model)
    prompts = _prompts([7, 4])
    before = generate(model, prompts, max_new_tokens=10, temperature=0)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(-3.0)  # what an optimizer step does: in place
        model.layers[1].self_attn.k_proj.weight.mul_(2.0)
    after = generate(model, prompts, max_new_tokens=10, temperature=0)
    assert after.response_ids != before.response_ids
    with torch.no_grad():
        logits = model(after.tokens[:, :-1])
    for r, p in enumerate([7, 4]):  # greedy tokens are the argmax of the *updated* model
        assert (logits.argmax(-1)[r, p - 1:p + 9] == after.tokens[r, p:p + 10]).all()
    assert all(l.self_attn.wt is None and l.mlp.wt is None for l in model.layers)


def _mkl_packing():
    """Whether this torch can prepack (MKL, CPU fp32); without it generate() takes the plain path."""
    from model import prepack
    return prepack([torch.ones(2, 2)], 2) is not None


@pytest.mark.parametrize("form", ["packed", "w_xt"])
@pytest.mark.parametrize("bias,rows", [(False, 16), (True, 5)])
def test_prepacked_linears_compute_x_times_w_transposed(bias, rows, form, monkeypatch):
    """model.prepack: the decode step's matmuls, from MKL's prepacked weights or as W @ x^T (the
    two forms decode_gemm chooses between), are x @ W^T (+ b) of the right matrices: q/k/v and
    gate/up stacked in order, the bias added (a Llama with attention_bias), to fp32 rounding
    against float64; other row counts take the plain path (and only they: packing that is
    never used would be correct and merely slow)."""
    import model as model_mod
    from model import ModelConfig, Transformer, linear_t, packed_linear
    if not _mkl_packing():
        pytest.skip("no MKL in this torch: prepack is off and generate() takes the plain path")
    monkeypatch.setattr(model_mod, "DECODE_GEMM", form)
    cfg = ModelConfig(arch="llama", vocab_size=300, hidden_size=64, intermediate_size=1024, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=bias)
    m = Transformer(cfg).init_weights(seed=0)
    attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
    if bias:
        with torch.no_grad():
            for l in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                l.bias.normal_()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), m.inference_weights(rows=rows):
        wt = {**attn.wt, **mlp.wt}
        assert all(wt[k][2] is not None and wt[k][2][1] == rows for k in ("qkv", "o", "gate_up", "down"))
        assert all((wt[k][2][0] is None) == (form == "w_xt") for k in wt if k != "qk_norm")
        assert (m.head_packed[0] is None) == (form == "w_xt")
        cases = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj],
                 "gate_up": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}
        for k, linears in cases.items():
            W = torch.cat([l.weight for l in linears]).double()
            b = torch.cat([l.bias for l in linears]).double() if linears[0].bias is not None else 0
            for n in (rows, rows + 3, 1):  # packed, then the plain path
                x = torch.randn(n, 1, W.shape[1], generator=g)
                want = x.double() @ W.t() + b
                got = linear_t(x, wt[k])
                assert got.shape == want.shape
                # the packed path is taken at exactly the packed row count, and only there
                assert (packed_linear(x, wt[k][2], wt[k][0], wt[k][1]) is not None) == (n == rows)
                torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * W.shape[1] ** 0.5)
                if form == "w_xt":  # by blocks of output features, the last one partial
                    got = model_mod.w_xt(x, W.float(), b.float() if torch.is_tensor(b) else None, block=7)
                    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * W.shape[1] ** 0.5)
        h = torch.randn(rows, 64, generator=g)
        import rollout
        torch.testing.assert_close(rollout.head_logits(m, h).double(), h.double() @ m.lm_head.weight.double().t(),
                                   rtol=0, atol=1e-4)
    assert m.head_packed is None and attn.wt is None and mlp.wt is None


def test_decode_gemm_takes_w_xt_only_where_it_gives_the_same_bits(monkeypatch):
    """model.decode_gemm, which picks a decode matmul's form by timing: W @ x^T only where it
    gives the packed sgemm's very bits (so the timing never moves a token), and then on any
    inputs of that shape, not only its probe's; the slower form never."""
    import time as time_mod

    import model as model_mod
    if not _mkl_packing():
        pytest.skip("no MKL in this torch: prepack is off and generate() takes the plain path")
    shape = (16, 2048, 256)  # the tiny model's gate/up at 16 rows
    real = model_mod.w_xt
    try:
        model_mod.decode_gemm.cache_clear()
        # one ulp off in one entry: "packed", however fast W @ x^T is
        monkeypatch.setattr(model_mod, "w_xt", lambda x, w, b=None: _ulp_off(real(x, w, b)))
        assert model_mod.decode_gemm(*shape) == "packed"
        # the same bits but slower: "packed"
        monkeypatch.setattr(model_mod, "w_xt", lambda x, w, b=None: time_mod.sleep(0.02) or real(x, w, b))
        model_mod.decode_gemm.cache_clear()
        assert model_mod.decode_gemm(*shape) == "packed"
        monkeypatch.setattr(model_mod, "w_xt", real)
        model_mod.decode_gemm.cache_clear()
        for rows, out, inner, bias in [(16, 2048, 256, False), (64, 4096, 256, False), (5, 48, 32, True),
                                       (2, 1024, 1536, False)]:
            form = model_mod.decode_gemm(rows, out, inner, bias)
            assert form in ("packed", "w_xt")
            if form == "w_xt":  # the same bits on other inputs of the shape: real-sized weights, an outlier
                g = torch.Generator().manual_seed(rows)
                x, w = torch.randn(rows, 1, inner, generator=g) * 3, torch.randn(out, inner, generator=g) * 0.02
                x[0, 0, 0] = 1e4
                b = torch.randn(out, generator=g) if bias else None
                packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
                assert torch.equal(model_mod.w_xt(x, w, b), torch.ops.mkl._mkl_linear(x, packed, w, b, rows))
    finally:
        model_mod.decode_gemm.cache_clear()  # the monkeypatched choices must not outlive the test


def _ulp_off(y):
    y = y.clone()
    y.view(-1)[7] = y.view(-1)[7].nextafter(torch.tensor(float("inf")))
    return y


@pytest.mark.parametrize("form", ["packed", "w_xt", "auto"])
def test_prepacked_decoding_samples_what_the_plain_path_does(tiny_model, monkeypatch, form):
    """generate() decodes from prepacked weights (every linear layer and the lm_head), or by
    W @ x^T, or by what decode_gemm chose per shape, and draws the same tokens as without them,
    log-probs to fp32 rounding; stops and dropped rows (fewer rows than packed for) included."""
    import model as model_mod
    import rollout
    monkeypatch.setattr(model_mod, "DECODE_GEMM", form)
    prompts = _prompts([5, 8, 3, 11])
    used = []
    sample = rollout.sample_next
    monkeypatch.setattr(rollout, "sample_next", lambda *a, **k: used.append(
        tiny_model.head_packed is not None and tiny_model.layers[0].mlp.wt["down"][2] is not None) or sample(*a, **k))
    kw = dict(max_new_tokens=24, n=3, seed=9, stop_token_ids=[7, 11, 13])
    packed = generate(tiny_model, prompts, **kw)
    if _mkl_packing():
        assert all(used)
    monkeypatch.setattr(model_mod, "prepack", lambda *a, **k: None)
    plain = generate(tiny_model, prompts, **kw)
    assert packed.response_ids == plain.response_ids and torch.equal(packed.tokens, plain.tokens)
    assert len(set(plain.response_lens.tolist())) >= 3  # rows stopped at different steps
    torch.testing.assert_close(packed.logprobs, plain.logprobs, rtol=0, atol=1e-5)
    assert tiny_model.head_packed is None


@pytest.mark.parametrize("form", ["packed", "w_xt"])
def test_compiled_decode_step_is_one_graph_that_samples_what_eager_does(tiny_model, monkeypatch, form):
    """generate(compile=True) as dynamo traces it (backend="eager": dynamo's graph capture without
    inductor's code generation, so no C++ compile; tests never wait for one): the decode step
    is one graph (fullgraph: nothing breaks it, e.g. an .item() for the cache length), the
    matmuls in it are MKL's prepacked ones (model.mkl_linear) or W @ x^T (decode_gemm's two
    forms), and two graphs serve every step
    of two calls with other prompt lengths (the cache length becomes symbolic, no recompile per
    step). Same tokens and log-probs (both kinds) as the eager path, on a ragged batch with a
    shared prefix and top-p, and again after an optimizer step: the weights are the graph's
    inputs, never stale constants."""
    import model as model_mod
    import rollout
    monkeypatch.setattr(model_mod, "DECODE_GEMM", form)  # each of decode_gemm's two forms
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    real = rollout.compiled_decode_step
    monkeypatch.setattr(rollout, "compiled_decode_step", lambda: real(backend=backend, fullgraph=True))
    torch._dynamo.reset()
    head = _prompts([6], seed=9)[0]
    prompts = [head + p for p in _prompts([3, 17, 8, 1])]
    kw = dict(max_new_tokens=12, n=2, seed=12, top_p=0.8, temperature=0.9)
    try:
        for ps in (prompts, [p + [3] * 5 for p in prompts], "after a step"):
            if ps == "after a step":
                with torch.no_grad():
                    for p in tiny_model.parameters():
                        p.add_(0.05 * torch.randn_like(p))
                ps = prompts
            a = generate(tiny_model, ps, **kw)
            b = generate(tiny_model, ps, compile=True, **kw)
            assert a.response_ids == b.response_ids
            torch.testing.assert_close(b.logprobs, a.logprobs, rtol=0, atol=1e-5)
            torch.testing.assert_close(b.policy_logprobs, a.policy_logprobs, rtol=0, atol=1e-5)
    finally:
        torch._dynamo.reset()
        real.cache_clear()
    assert len(graphs) == 2
    if _mkl_packing():
        ops = [n.target for n in graphs[-1].graph.nodes if n.op == "call_function"]
        n = 4 * tiny_model.config.num_layers + 1
        assert ops.count(torch.ops.mopd.mkl_linear.default) == (n if form == "packed" else 0)
        assert ops.count(torch.mm) + ops.count(torch.addmm) >= (0 if form == "packed" else n)


def test_mkl_linear_custom_op_matches_mkl_and_its_fake():
    """model.mkl_linear, the packed linear that inductor calls as an opaque op: the same values as
    MKL's own op and x @ W^T + b, and a fake implementation of the right shape."""
    import model as model_mod
    if not _mkl_packing():
        pytest.skip("no MKL in this torch: prepack is off and generate() takes the plain path")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    packed, rows, w = model_mod.prepack([w], 5)
    y = model_mod.mkl_linear(x, packed, w, b, rows)
    assert y.shape == (5, 48) and torch.equal(y, torch.ops.mkl._mkl_linear(x, packed, w, b, rows))
    torch.testing.assert_close(y.double(), x.double() @ w.double().t() + b.double(), rtol=0, atol=1e-5)
    # its fake (what tracing sees): the output's shape and dtype, with and without a bias (not
    # torch.library.opcheck: it reads every input's storage, and MKL's packed weight has none)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        for bias in (torch.empty(48), None):
            out = model_mod.mkl_linear(torch.empty(3, 1, 32), torch.empty(1), torch.empty(48, 32), bias, 3)
            assert out.shape == (3, 1, 48) and out.dtype == torch.float32


def test_rollout_tensors_are_ordinary_tensors(tiny_model):
    """generate() samples under inference_mode but returns tensors that training can use."""
    res = generate(tiny_model, _prompts([5, 3]), max_new_tokens=4, seed=0, stop_token_ids=[7])
    for t in (res.tokens, res.prompt_lens, res.response_lens, res.response_mask, res.logprobs, res.stopped):
        assert not t.is_inference()
    w = torch.ones((), requires_grad=True)
    (res.logprobs * w).sum().backward()  # would raise on an inference tensor
    assert w.grad is not None


def test_bf16_sampler_logits_are_fp32_ones(tiny_model, monkeypatch):
    """Under bf16 the sampler draws from fp32 logits of the bf16 hidden states, as the trainer
    computes them (vocab_kernels.py), not from bf16 logits, which round a logit of 20 to a multiple of
    0.125 (log mu biased by up to ~0.06 nats). A one-token rollout's hidden state is the plain
    forward's, bit for bit (a prefill into an empty cache is the causal forward), so the logits
    it samples from must be the fp32 product of those hidden states and W, to fp32 rounding."""
    import copy
    import rollout
    m = copy.deepcopy(tiny_model).to(torch.bfloat16)
    with torch.no_grad():
        m.lm_head.weight.mul_(40)  # logits of tens of nats: where bf16 rounding is large
    seen = []
    sample = rollout.sample_next
    monkeypatch.setattr(rollout, "sample_next", lambda logits, *a, **k: seen.append(logits) or sample(logits, *a, **k))
    prompts = _prompts([9, 9, 9], seed=3)
    roll = generate(m, prompts, max_new_tokens=1, seed=5)
    with torch.no_grad():
        h = m(torch.tensor(prompts), return_hidden=True)[:, -1]
    want = h.float() @ m.lm_head.weight.float().t()
    assert seen[0].dtype == torch.float32
    assert (m.lm_head(h).float() - want).abs().max() > 1e-2  # the rounding this guards against is real here
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-4 * want.abs().max().item())
    lp = torch.log_softmax(want, -1).gather(-1, roll.tokens[:, -1:])[:, 0]
    torch.testing.assert_close(roll.logprobs[:, -1], lp, rtol=0, atol=1e-4)


def test_rollouts_in_cache_sized_chunks_equal_one_batch(tiny_model, monkeypatch):
    """max_cache_bytes: prompts are sampled in consecutive chunks whose KV cache fits; every row
    samples from its own stream, so the chunks together are the one-batch rollout."""
    import rollout
    from model import KVCache
    prompts = _prompts([3, 17, 8, 1, 5])
    whole = generate(tiny_model, prompts, max_new_tokens=12, seed=4, n=2, stop_token_ids=[7])
    c = tiny_model.config
    per_prompt = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * 2 * (17 + 12)
    sizes = []

    class Recorded(KVCache):
        def repeat_rows(self, n):
            super().repeat_rows(n)
            sizes.append(sum(t.numel() * t.element_size() for t in self.k + self.v))
    monkeypatch.setattr(rollout, "KVCache", Recorded)
    budget = 2 * per_prompt + 100  # two prompts (4 rows) per chunk: 3 chunks
    assert rollout.cache_chunks(tiny_model, prompts, 12, 2, budget) == [(0, 2), (2, 4), (4, 5)]
    got = generate(tiny_model, prompts, max_new_tokens=12, seed=4, n=2, stop_token_ids=[7], max_cache_bytes=budget)
    assert len(sizes) == 3 and max(sizes) <= budget, sizes
    assert got.response_ids == whole.response_ids and got.prompt_index == whole.prompt_index
    assert torch.equal(got.stopped, whole.stopped) and torch.equal(got.prompt_lens, whole.prompt_lens)
    L = whole.tokens.shape[1]
    assert got.tokens.shape[1] == L and torch.equal(got.tokens, whole.tokens)
    torch.testing.assert_close(got.logprobs, whole.logprobs, rtol=0, atol=1e-5)
    assert torch.equal(got.response_mask, whole.response_mask)
