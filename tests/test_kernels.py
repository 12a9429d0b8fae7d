"""
vocab_kernels.py against plain float64 references: values and gradients of every function, the KL
direction, the JSD ends, gradcheck, the sampled-token estimator, and the Triton kernels run on
CPU under TRITON_INTERPRET=1 (in a child process, since the variable must be set before triton
is imported and other test modules may have imported it already).

Every value and gradient is checked against the plain *_ref code (vocab_kernels.py) on the same
inputs, evaluated in float64 as the truth. The error is norm-wise, |ours - truth| / |truth| over
the whole tensor, and its bound is not a fixed number but follows from what plain code achieves:
the same *_ref code run in the inputs' own precision (fp32; for bf16 inputs, fp32 math on the
bf16 values with the gradients rounded to bf16, as ours) misses the truth by err_plain, and ours
may miss it by 2 * err_plain + 2 sqrt(V) 2^-24 (see errors()). A fixed bound cannot be right for
every vocabulary and machine: the hidden gradient is a V-long fp32 dot product per element, whose
error grows with V and depends on the BLAS's summation order (plain fp32 code is off by ~4e-5 at
V = 151936 on an MKL CPU, ~3e-7 at V = 1000). A real bug lands far outside: a gradient scaled by
0.99 is off by 1e-2, a temperature of 0.71 for 0.7 by ~1e-2 too, against bounds of ~1e-6..1e-4
(fp32) and ~4e-3 (bf16, where err_plain is bf16's own rounding, at most 2^-9 per element).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vocab_kernels as K  # noqa: E402

U32 = 2**-24  # fp32 unit roundoff


def rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def cast(dtype, *tensors):
    return [t.detach().to(dtype) for t in tensors]


def grads_of(fn, tensors, g=None):
    """[fn's output, gradients of sum(out * g) w.r.t. `tensors` (fresh leaves)...]: one flat
    list. g=None: the outputs only (a tuple of several becomes the list)."""
    if g is None:
        with torch.no_grad():
            out = fn(*tensors)
        return list(out) if isinstance(out, tuple) else [out]
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return [out, *torch.autograd.grad((out * g).sum(), leaves)]


def reference(fn, tensors, g=None):
    """Plain code `fn` (one of the *_ref functions) on the same inputs: (its outputs and gradients
    in float64, the truth; the same in the inputs' own dtype, what plain code achieves)."""
    return grads_of(fn, cast(torch.float64, *tensors), g), grads_of(fn, tensors, g)


def errors(ours, ref, V):
    """[(error of ours, its bound)] per tensor; ref = reference(...), V = the vocabulary size.
    Bound: twice the plain code's error (same inputs, same precision, same conditioning), plus
    what summing V fp32 terms in another order may cost (~sqrt(V) roundings, twice): ours
    sums in chunks of rows, and a BLAS sums a few rows down another path than one big GEMM
    (MKL, chunk_size=3: 3x the plain code's error, on gradients good to ~1e-6). That slack is
    4e-6 at V = 1000 and 5e-5 at V = 151936, against the 1e-2 of a 1% bug."""
    truth, plain = ref
    assert len(ours) == len(truth) == len(plain)
    slack = 2 * math.sqrt(V) * U32
    return [(rel_err(a, t), 2 * rel_err(p, t) + slack) for a, t, p in zip(ours, truth, plain)]


def check(ours, ref, V, what=""):
    for i, (err, bound) in enumerate(errors(ours, ref, V)):
        assert err <= bound, f"{what} tensor {i}: error {err:.3g} > bound {bound:.3g}"


def lm_inputs(B, T, H, V, dtype=torch.float32, seed=0, scale=1.0):
    """hidden [B, T, H] and weight [V, H] whose logits have a standard deviation of about 2*scale,
    like a trained LM head (peaked but not one-hot), plus a random mask with some tokens off."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2 * scale / math.sqrt(H))
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    return hidden.to(dtype), weight.to(dtype), mask


def per_token_weights(shape, kind, seed=1):
    """grad_output patterns: 'sum' (one number for every token: the fast path) or 'random'
    (one number per token, like the PG loss or per-sequence means: the recompute path)."""
    if kind == "sum":
        return torch.full(shape, 0.37)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

# -----------------------------------------------------------------------------
# token_logprobs


@pytest.mark.parametrize("V", [1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gkind", ["sum", "random"])
def test_token_logprobs_vs_fp64(V, dtype, gkind):
    B, T, H, temp = 2, 9, 32, 0.7
    h, w, mask = lm_inputs(B, T, H, V, dtype)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    y[~mask] = -100  # ignore-index style targets on masked tokens must never be looked up
    g = per_token_weights((B, T), gkind)
    ref = reference(lambda a, b: K.token_logprobs_ref(a, b, y, temp, mask), (h, w), g)
    # several chunks with a ragged last one; the automatic size; gradients recomputed in backward
    for chunk, pre in ((4, True), (None, True), (4, False)):
        ours = grads_of(lambda a, b: K.token_logprobs(a, b, y, temp, mask, chunk, precompute_grads=pre), (h, w), g)
        check(ours, ref, V, (chunk, pre))
        lp, gh, gw = ours
        assert gh.dtype == dtype and gw.dtype == dtype and lp.dtype == torch.float32
        assert (lp[~mask] == 0).all() and (gh[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_values_by_vocabulary_block(dtype):
    """Values only (no_grad: a teacher's scoring) take _logprobs_by_vocab_block: the normaliser
    over vocabulary blocks of 2,048 (here two and a ragged third), tokens in row chunks (a small
    budget: chunks of 3, the last one ragged), at a temperature, under a mask; against float64."""
    V = 2 * 2048 + 5
    h, w, mask = lm_inputs(2, 9, 32, V, dtype, seed=4)
    y = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(5))
    y[0, 1], y[1, 2] = V - 1, 2048  # the ragged block's last id, the second block's first
    mask[0, 1] = mask[1, 2] = True
    y[~mask] = -100
    ref = reference(lambda a, b: K.token_logprobs_ref(a, b, y, 0.7, mask), (h, w))
    for budget in (K.DEFAULT_MEM_BUDGET, 3 * 2048 * 4):
        with torch.no_grad():
            lp = K.token_logprobs(h, w, y, 0.7, mask, mem_budget_bytes=budget)
        check([lp], ref, V, budget)
        assert lp.dtype == torch.float32 and (lp[~mask] == 0).all()


def _pg_terms(lp_t, old, w, clip=5.0):
    """MOPD's PG loss per token, weighted: A_t = clip(sg[lp_T - lp]), PPO's clip of pi/mu,
    times w_t (the aggregation weight). Elementwise in lp, as token_logprob_loss requires."""
    def terms(lp):
        adv = (lp_t - lp).detach().clamp(-clip, clip)
        ratio = torch.exp(lp - old)
        return -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv) * w
    return terms


def _pg_pair(y, temp, mask, lp_t, old, wt, **kw):
    """(ours, plain): (hidden, weight) -> [the PG loss, the sum of the log-probs], fused by
    token_logprob_loss (kw: chunk_size, backend) and on the materialised log-softmax."""
    def fused(a, b):
        loss, lp = K.token_logprob_loss(a, b, y, _pg_terms(lp_t, old, wt), temp, mask, **kw)
        return torch.stack([loss, lp.sum()])

    def plain(a, b):
        lp = K.token_logprobs_ref(a, b, y, temp, mask)
        loss = (_pg_terms(lp_t.to(lp.dtype), old.to(lp.dtype), wt.to(lp.dtype))(lp) * mask).sum()
        return torch.stack([loss, lp.detach().sum()])
    return fused, plain


@pytest.mark.parametrize("V,dtype,chunk", [(1000, torch.float32, 3), (1000, torch.float32, None),
                                           (4097, torch.bfloat16, 4)])
def test_token_logprob_loss_vs_fp64(V, dtype, chunk):
    """The fused PG loss: its value, log-probs and both gradients against plain autograd on the
    materialised log-softmax (float64 truth), with advantages that depend on the log-probs
    (MOPD's), ratios inside and outside PPO's clip, and per-token weights that differ."""
    h, w, mask = lm_inputs(2, 9, 16, V, dtype, seed=30)
    y = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        lp0 = K.token_logprobs_ref(h.double(), w.double(), y, 0.7, mask).float()
    g = torch.Generator().manual_seed(32)
    old = lp0 + torch.randn(2, 9, generator=g) * 0.3        # pi/mu from ~0.5 to ~2: some clipped
    lp_t = lp0 + torch.randn(2, 9, generator=g)             # the teacher disagrees, by token
    wt = torch.rand(2, 9, generator=g) * mask               # per-token weights (per-sequence means...)

    fused, plain = _pg_pair(y, 0.7, mask, lp_t, old, wt, chunk_size=chunk)
    sel = torch.tensor([2.5, 0.0])  # backward through the loss only, with a grad_output that is not 1
    check(grads_of(fused, (h, w), sel), reference(plain, (h, w), sel), V)
    clipped = (torch.exp(lp0 - old) - 1).abs() > 0.28
    assert clipped[mask].any() and (~clipped)[mask].any()  # both sides of the clip are exercised


def test_token_logprob_loss_outputs_and_no_grad():
    """The log-probs it returns are token_logprobs'; under no_grad the loss has the same value;
    a loss_fn that ignores the log-probs gives zero gradient."""
    h, w, mask = lm_inputs(2, 5, 16, 500, seed=33)
    y = torch.randint(0, 500, (2, 5), generator=torch.Generator().manual_seed(34))
    terms = _pg_terms(torch.zeros(2, 5), torch.full((2, 5), -6.0), torch.ones(2, 5))
    loss, lp = K.token_logprob_loss(h, w, y, terms, mask=mask, chunk_size=2)
    torch.testing.assert_close(lp, K.token_logprobs(h, w, y, mask=mask), rtol=0, atol=1e-6)
    assert not lp.requires_grad and (lp[~mask] == 0).all()
    with torch.no_grad():
        loss2, _ = K.token_logprob_loss(h, w, y, terms, mask=mask)
    torch.testing.assert_close(loss, loss2, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, (terms(lp) * mask).sum(), rtol=1e-6, atol=0)
    hl = h.clone().requires_grad_()
    c, _ = K.token_logprob_loss(hl, w, y, lambda lp: torch.ones_like(lp), mask=mask)
    c.backward()
    assert c.item() == mask.sum().item() and hl.grad.abs().max() == 0
    # no mask (every token counts), and a mask with no token at all
    loss, lp = K.token_logprob_loss(h, w, y, terms, chunk_size=3)
    torch.testing.assert_close(loss, terms(K.token_logprobs(h, w, y)).sum(), rtol=1e-6, atol=0)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, lp = K.token_logprob_loss(hl, wl, y, terms, mask=torch.zeros_like(mask))
    loss.backward()
    assert loss.item() == 0 and (lp == 0).all() and hl.grad.abs().max() == 0 and wl.grad.abs().max() == 0
    # its gradients are handed out once: a second backward is an error, not a silent zero
    loss, _ = K.token_logprob_loss(hl, wl, y, terms, mask=mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="handed out once"):
        loss.backward()


def test_token_logprobs_frozen_weight():
    V = 1000
    h, w, mask = lm_inputs(2, 5, 16, V)
    y = torch.randint(0, V, (2, 5))
    g = per_token_weights((2, 5), "random")
    # weight frozen (e.g. tied embeddings trained elsewhere): the gradient w.r.t. hidden only
    truth, plain = reference(lambda a: K.token_logprobs_ref(a, w.to(a.dtype), y, mask=mask), (h,), g)
    check(grads_of(lambda a: K.token_logprobs(a, w, y, mask=mask, chunk_size=3), (h,), g), (truth, plain), V)
    with torch.no_grad():  # values only: no autograd Function, no gradient work
        check([K.token_logprobs(h, w, y, mask=mask)], (truth[:1], plain[:1]), V)

# -----------------------------------------------------------------------------
# kl


@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("V", [1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_vs_fp64(kind, beta, V, dtype):
    B, T, H, temp = 2, 7, 24, 1.3
    hs, ws, mask = lm_inputs(B, T, H, V, dtype, seed=0)
    ht, wt, _ = lm_inputs(B, T, 2 * H, V, dtype, seed=1)  # teacher: another hidden size, same vocab
    for gkind, pre in (("sum", True), ("random", True), ("random", False)):
        g = per_token_weights((B, T), gkind)
        ours = grads_of(lambda a, b: K.kl(a, b, ht, wt, kind=kind, beta=beta, temperature=temp,
                                          mask=mask, chunk_size=3, precompute_grads=pre), (hs, ws), g)
        check(ours, reference(lambda a, b: K.kl_ref(a, b, ht.to(a.dtype), wt.to(a.dtype), kind=kind, beta=beta,
                                                    temperature=temp, mask=mask), (hs, ws), g), V, gkind)
        out, gh, _ = ours
        assert (out[~mask] == 0).all() and (gh[~mask] == 0).all()


def test_kl_teacher_gets_no_gradient():
    hs, ws, _ = lm_inputs(1, 4, 8, 100, seed=5)
    ht, wt, _ = lm_inputs(1, 4, 8, 100, seed=6)
    hs, ht, wt = hs.requires_grad_(), ht.requires_grad_(), wt.requires_grad_()
    K.kl(hs, ws, ht, wt).sum().backward()
    assert hs.grad is not None and ht.grad is None and wt.grad is None


def test_kl_direction_by_hand():
    # p_s = [0.9, 0.1], p_t = [0.5, 0.5]; weight = I, so logits = hidden = log p.
    ps, pt = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(s||t) = 0.368064...
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(t||s) = 0.510825...
    eye = torch.eye(2)
    # fp32 inputs: each log p is off by up to one rounding (2^-24 relative, |log p| <= 2.3), and
    # two terms are summed: the result is good to ~1e-7; 1e-6 is ~16 roundings of an O(1) value
    assert abs(K.kl(ps.log(), eye, pt.log(), eye, kind="reverse").item() - reverse) < 1e-6
    assert abs(K.kl(ps.log(), eye, pt.log(), eye, kind="forward").item() - forward) < 1e-6
    # F.kl_div(input, target) is KL(target || input): reverse KL needs input = teacher.
    assert abs(F.kl_div(pt.log(), ps.log(), reduction="sum", log_target=True).item() - reverse) < 1e-6
    assert abs(F.kl_div(ps.log(), pt.log(), reduction="sum", log_target=True).item() - forward) < 1e-6


def _kls_by_hand(hs, ws, ht, wt, mask=None):
    """reverse KL, forward KL and the symmetric (beta = 0.5) JSD written out, in the inputs' dtype."""
    ls, lt = F.log_softmax(hs @ ws.t(), -1), F.log_softmax(ht @ wt.t(), -1)
    logm = torch.log((ls.exp() + lt.exp()) / 2)
    jsd = 0.5 * (ls.exp() * (ls - logm)).sum(-1) + 0.5 * (lt.exp() * (lt - logm)).sum(-1)
    out = (ls.exp() * (ls - lt)).sum(-1), (lt.exp() * (lt - ls)).sum(-1), jsd
    return out if mask is None else tuple(x * mask for x in out)


def test_kl_direction_on_random_distributions():
    B, T, H, V = 1, 8, 16, 1000
    hs, ws, _ = lm_inputs(B, T, H, V, seed=7, scale=0.5)  # flat student
    ht, wt, _ = lm_inputs(B, T, H, V, seed=8, scale=2.0)  # peaked teacher: the two KLs differ a lot
    truth, plain = reference(_kls_by_hand, (hs, ws, ht, wt))
    reverse, forward, _ = truth
    assert ((reverse - forward).abs() > 0.25).all()
    check([K.kl(hs, ws, ht, wt, kind="reverse"), K.kl(hs, ws, ht, wt, kind="forward")], (truth[:2], plain[:2]), V)


def test_jsd_ends_and_middle():
    B, T, H, V = 2, 5, 16, 1000
    hs, ws, mask = lm_inputs(B, T, H, V, seed=9)
    ht, wt, _ = lm_inputs(B, T, H, V, seed=10)
    fwd = K.kl(hs, ws, ht, wt, kind="forward", mask=mask)
    rev = K.kl(hs, ws, ht, wt, kind="reverse", mask=mask)
    assert torch.equal(K.kl(hs, ws, ht, wt, kind="jsd", beta=0.0, mask=mask), fwd)  # beta=0: forward KL
    assert torch.equal(K.kl(hs, ws, ht, wt, kind="jsd", beta=1.0, mask=mask), rev)  # beta=1: reverse KL
    # beta=0.5 is the textbook symmetric JSD: 0.5 KL(s||m) + 0.5 KL(t||m), m = (p_s + p_t) / 2
    truth, plain = reference(lambda *x: _kls_by_hand(*x, mask), (hs, ws, ht, wt))
    ours = K.kl(hs, ws, ht, wt, kind="jsd", beta=0.5, mask=mask)
    check([ours], (truth[2:], plain[2:]), V)
    assert (ours[mask] <= math.log(2) + 1e-6).all()  # bounded by log 2 (+ ~16 fp32 roundings of it)
    # the mixture at beta close to 1 is a *scaled* reverse KL that vanishes: why beta=1 is special
    near = K.kl(hs, ws, ht, wt, kind="jsd", beta=1 - 1e-3, mask=mask)
    assert (near[mask] < 0.01 * rev[mask]).all()

# -----------------------------------------------------------------------------
# top-k (paper Eq. 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_topk_and_topk_kl_vs_fp64(dtype):
    B, T, H, V, k, temp = 2, 6, 24, 4097, 64, 0.9
    ht, wt, mask = lm_inputs(B, T, H, V, dtype, seed=11)
    hs, ws, _ = lm_inputs(B, T, H, V, dtype, seed=12)
    ids, lps = K.teacher_topk(ht, wt, k=k, temperature=temp, mask=mask, chunk_size=5)
    (rids, rlps), (_, plain_lps) = reference(lambda a, b: K.teacher_topk_ref(a, b, k=k, temperature=temp,
                                                                              mask=mask), (ht, wt))
    assert ids.shape == (B, T, k) and ids.dtype == torch.long
    assert torch.equal(ids, rids)  # random logits: no ties at the k-th place
    check([lps], ([rlps], [plain_lps]), V)
    assert (lps[mask].exp().sum(-1) < 1).all()  # normalised over the full vocab, not over the top k
    for gkind in ("sum", "random"):
        g = per_token_weights((B, T), gkind)
        ours = grads_of(lambda a, b: K.topk_kl(a, b, ids, lps, temp, mask, chunk_size=4), (hs, ws), g)
        check(ours, reference(lambda a, b: K.topk_kl_ref(a, b, ids, lps, temp, mask), (hs, ws), g), V, gkind)


def test_topk_kl_is_zero_at_the_teacher():
    ht, wt, mask = lm_inputs(2, 4, 16, 1000, seed=13)
    ids, lps = K.teacher_topk(ht, wt, k=16)
    hl = ht.clone().requires_grad_()
    loss = K.topk_kl(hl, wt, ids, lps, mask=mask)
    loss.sum().backward()
    # minimum at p_s = p_t on K: loss and gradient are 0 up to rounding. The student's log-probs
    # come from the same fp32 code as the teacher's, so the terms (<= 1 each) cancel to within a
    # few roundings; 1e-6 is ~16 roundings of 2^-24
    assert loss.abs().max() < 1e-6 and hl.grad.abs().max() < 1e-6
    hs, ws, _ = lm_inputs(2, 4, 16, 1000, seed=14)
    assert (K.topk_kl(hs, ws, ids, lps) > 0).all()  # each term p log(p/q) - p + q >= 0

# -----------------------------------------------------------------------------
# The logits' GEMM in bf16 with an fp32 output (the CUDA path)


def test_half_precision_gemm_path(monkeypatch):
    """On CUDA, bf16 hidden states and weights get their logits from one bf16 GEMM with an fp32
    output (vocab_kernels.logits: mm's out_dtype), with no fp32 copy of the weight, the temperature
    applied to z instead of h, and the gradients' GEMMs in fp32. A CPU's mm has no out_dtype, so
    here the path is forced and its GEMM emulated by what cuBLAS computes up to summation order
    (the bf16 numbers' exact products, summed in fp32); what is tested is everything around it,
    in every function of vocab_kernels.py, by the bf16 tests above run again on this path."""
    # where a device cannot run it (a CPU; CUDA below compute capability 8.0), the probe says so
    assert not K._mm_out_dtype_works(torch.device("cpu"), torch.bfloat16)
    real_mm, calls = torch.mm, []

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32  # no fp32 copy
        calls.append(a.shape[0])
        z = real_mm(a.float(), b.float())
        return z if out is None else out.copy_(z)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(K, "_half_gemm", lambda h, w: h.dtype == w.dtype == torch.bfloat16)
    for test, args in [(test_token_logprobs_vs_fp64, (4097, torch.bfloat16, "random")),
                       (test_token_logprobs_vs_fp64, (1000, torch.bfloat16, "sum")),
                       (test_token_logprobs_values_by_vocabulary_block, (torch.bfloat16,)),
                       (test_token_logprob_loss_vs_fp64, (4097, torch.bfloat16, 4)),
                       (test_kl_vs_fp64, ("forward", 0.5, 4097, torch.bfloat16)),
                       (test_kl_vs_fp64, ("jsd", 0.3, 1000, torch.bfloat16)),
                       (test_teacher_topk_and_topk_kl_vs_fp64, (torch.bfloat16,))]:
        n = len(calls)
        test(*args)
        assert len(calls) > n, f"{test.__name__}{args} did not take the half-precision GEMM"
    # an fp64 caller (gradcheck's precision) beside a bf16 teacher keeps fp64 logits: the
    # half-precision GEMM accumulates in fp32, so it serves fp32 accumulation only
    hs, ws, mask = lm_inputs(2, 5, 16, 300, torch.float64, seed=40)
    ht, wt, _ = lm_inputs(2, 5, 24, 300, torch.bfloat16, seed=41)
    n, hl = len(calls), hs.clone().requires_grad_()
    out = K.kl(hl, ws, ht, wt, mask=mask)
    out.sum().backward()
    assert len(calls) == n and out.dtype == hl.grad.dtype == torch.float64
    torch.testing.assert_close(out, K.kl_ref(hs, ws, ht.double(), wt.double(), mask=mask), rtol=1e-12, atol=1e-12)


# -----------------------------------------------------------------------------
# The Qwen3 vocabulary, at a few tokens


def test_qwen3_vocab_151936():
    B, T, H, V = 1, 3, 32, 151936
    hs, ws, _ = lm_inputs(B, T, H, V, seed=15)
    ht, wt, _ = lm_inputs(B, T, H, V, seed=16)
    mask = torch.tensor([[True, False, True]])
    y = torch.tensor([[5, 0, V - 1]])
    g = per_token_weights((B, T), "random")
    ours = grads_of(lambda a, b: K.token_logprobs(a, b, y, 0.7, mask), (hs, ws), g)
    check(ours, reference(lambda a, b: K.token_logprobs_ref(a, b, y, 0.7, mask), (hs, ws), g), V)
    for kind in ("reverse", "jsd"):
        ours = grads_of(lambda a, b: K.kl(a, b, ht, wt, kind=kind, temperature=1.5, mask=mask), (hs, ws), g)
        check(ours, reference(lambda a, b: K.kl_ref(a, b, ht.to(a.dtype), wt.to(a.dtype), kind=kind,
                                                    temperature=1.5, mask=mask), (hs, ws), g), V, kind)
    ids, lps = K.teacher_topk(ht, wt, k=64, mask=mask)
    ours = grads_of(lambda a, b: K.topk_kl(a, b, ids, lps, mask=mask), (hs, ws), g)
    check(ours, reference(lambda a, b: K.topk_kl_ref(a, b, ids, lps, mask=mask), (hs, ws), g), V)

# -----------------------------------------------------------------------------
# gradcheck (float64), chunking, retain_graph, empty masks


def test_gradcheck_float64():
    torch.manual_seed(0)
    B, T, H, V = 2, 3, 4, 7
    h = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ht, wt = torch.randn(B, T, 5, dtype=torch.float64), torch.randn(V, 5, dtype=torch.float64)
    y = torch.randint(0, V, (B, T))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    gc = torch.autograd.gradcheck
    for pre in (True, False):
        assert gc(lambda a, b: K.token_logprobs(a, b, y, 0.7, mask, chunk_size=2, precompute_grads=pre), (h, w))
    for kind in ("reverse", "forward", "jsd"):
        assert gc(lambda a, b: K.kl(a, b, ht, wt, kind=kind, beta=0.3, temperature=1.3, mask=mask, chunk_size=2), (h, w))
    ids, lps = K.teacher_topk(ht, wt, k=3)
    assert gc(lambda a, b: K.topk_kl(a, b, ids, lps, temperature=0.8, mask=mask, chunk_size=2), (h, w))


def test_chunks_never_exceed_the_budget(monkeypatch):
    """Every logits tensor the row math sees is [chunk x V], never [tokens x V]."""
    seen = []
    real = K._kl_rows_torch
    monkeypatch.setattr(K, "_kl_rows_torch", lambda zs, zt, *a: seen.append((zs.shape, zt.shape)) or real(zs, zt, *a))
    B, T, H, V = 4, 16, 8, 1000
    hs, ws, _ = lm_inputs(B, T, H, V)
    ht, wt, _ = lm_inputs(B, T, H, V, seed=1)
    budget = 2 * 8 * V * 4  # reverse KL holds two [chunk x V] fp32 buffers: chunks of 8 tokens
    assert K.auto_chunk_size(V, 2, budget) == 8
    out = K.kl(hs.requires_grad_(), ws, ht, wt, mem_budget_bytes=budget, backend="torch")
    out.mean().backward()
    assert len(seen) == B * T // 8 and all(s == (8, V) and t == (8, V) for s, t in seen)
    check([out], reference(K.kl_ref, (hs, ws, ht, wt)), V)
    # the default budget at the Qwen3 vocabulary
    c = K.auto_chunk_size(151936, 2)
    assert c * 2 * 151936 * 4 <= K.DEFAULT_MEM_BUDGET < (c + 1) * 2 * 151936 * 4


def test_retain_graph_and_second_backward():
    """The fast path hands out its stored weight gradient once; a second backward recomputes."""
    V = 300
    h, w, mask = lm_inputs(2, 5, 8, V)
    y = torch.randint(0, V, (2, 5))
    h, w = h.requires_grad_(), w.requires_grad_()
    out = K.token_logprobs(h, w, y, mask=mask)
    first = torch.autograd.grad(out.mean(), (h, w), retain_graph=True)
    second = torch.autograd.grad(out.mean(), (h, w), retain_graph=True)
    third = torch.autograd.grad((out * per_token_weights((2, 5), "random")).sum(), (h, w))
    ref = reference(lambda a, b: K.token_logprobs_ref(a, b, y, mask=mask), (h, w), torch.full((2, 5), 1 / 10))
    check([out, *first], ref, V, "first")  # out.mean() = sum(out * 1/10)
    check([out, *second], ref, V, "second")
    assert third[0].shape == h.shape


def test_all_tokens_masked():
    h, w, _ = lm_inputs(1, 3, 8, 50)
    h = h.requires_grad_()
    mask = torch.zeros(1, 3, dtype=torch.bool)
    out = K.kl(h, w, h.detach(), w, mask=mask)
    out.sum().backward()
    assert out.shape == (1, 3) and (out == 0).all() and (h.grad == 0).all()

# -----------------------------------------------------------------------------
# The sampled-token (PG) estimate agrees with the exact reverse KL, value and gradient


def test_sampled_estimate_matches_exact_reverse_kl():
    """Monte-Carlo checks at 5 standard errors (se): the draw is seeded, and another seed would
    fail with probability ~3e-5 (P(|Z| > 5) = 5.7e-7 per checked number, 51 numbers). Each check
    is also shown to see a 10% error. V = 64 keeps M samples cheap (the estimator's noise, not V,
    decides that power): at M = 120000, 0.9x the KL is ~35 se away, 0.9x its gradient >10 se."""
    N, H, V, M = 3, 16, 64, 120_000
    hs, ws, _ = lm_inputs(1, N, H, V, seed=17, scale=0.8)
    ht, wt, _ = lm_inputs(1, N, H, V, seed=18, scale=1.5)
    hs, ht = hs[0], ht[0]
    exact = K.kl(hs, ws, ht, wt, kind="reverse")
    forward = K.kl(hs, ws, ht, wt, kind="forward")
    probs = torch.softmax(hs @ ws.t(), dim=-1)
    y = torch.multinomial(probs, M, replacement=True, generator=torch.Generator().manual_seed(19))  # [N, M]
    leaf = hs.clone().requires_grad_()
    lp_s = K.token_logprobs(leaf[:, None].expand(N, M, H), ws, y)
    lp_t = K.token_logprobs(ht[:, None].expand(N, M, H), wt, y)
    ratio = (lp_s - lp_t).detach()  # per-token estimator of KL(s||t): log p_s(y) - log p_t(y), y ~ p_s
    est, stderr = ratio.mean(1), ratio.std(1) / math.sqrt(M)
    assert ((est - exact).abs() < 5 * stderr).all(), ((est - exact) / stderr)
    assert ((est - 0.9 * exact).abs() > 5 * stderr).all()  # power: 0.9x the KL is ~35 se away
    assert ((est - forward).abs() > 10 * stderr).all()  # and it is not the forward KL
    # MOPD's PG form: the gradient of mean(-A * log p_s(y)) with A = sg[log p_t - log p_s] is an
    # unbiased estimate of the gradient of the exact reverse KL
    (pg,) = torch.autograd.grad((ratio * lp_s).mean(1).sum(), leaf)
    leaf2 = hs.clone().requires_grad_()
    (exact_grad,) = torch.autograd.grad(K.kl(leaf2, ws, ht, wt).sum(), leaf2)
    # its standard error, from the per-sample terms ratio_i * d log p_s(y_i)/dh = ratio_i (w_{y_i} - E_p[w])
    def terms(dt):
        return ratio.to(dt)[..., None] * (ws.to(dt)[y] - (probs.to(dt) @ ws.to(dt))[:, None])
    per_sample = terms(torch.float64)
    se = per_sample.std(1) / math.sqrt(M)  # [N, H]
    # autograd through token_logprobs = the analytic terms (as accurate as summing them in fp32)
    check([pg], ([per_sample.mean(1)], [terms(torch.float32).mean(1)]), V)
    assert ((pg - exact_grad).abs() < 5 * se).all(), ((pg - exact_grad) / se).abs().max()
    assert ((pg - 0.9 * exact_grad).abs() > 5 * se).any()  # power: its best component is 11-13 se away

# -----------------------------------------------------------------------------
# Triton kernels, on CPU through the interpreter, against the same float64 references


def _worst(errs):
    return max(errs, key=lambda e: e[0] / e[1])  # (error, bound) closest to failing


def _triton_checks():
    """Runs in a child with TRITON_INTERPRET=1; prints one JSON line: per case, the (error,
    bound) pair of its tensor closest to failing (see errors())."""
    results = {}
    cases = [(1000, torch.float32, 5), (4097, torch.float32, 5), (4097, torch.bfloat16, 5), (151936, torch.float32, 2)]
    for V, dtype, T in cases:
        hs, ws, mask = lm_inputs(1, T, 16, V, dtype, seed=20)
        ht, wt, _ = lm_inputs(1, T, 16, V, dtype, seed=21)
        y = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(22))
        g = per_token_weights((1, T), "random")
        ours = grads_of(lambda a, b: K.token_logprobs(a, b, y, 0.7, mask, backend="triton"), (hs, ws), g)
        ref = reference(lambda a, b: K.token_logprobs_ref(a, b, y, 0.7, mask), (hs, ws), g)
        results[f"token_logprobs V={V} {dtype}"] = _worst(errors(ours, ref, V))
        lp_t = torch.randn(1, T, generator=torch.Generator().manual_seed(26)) - 7
        fused, plain = _pg_pair(y, 0.7, mask, lp_t, torch.full((1, T), -7.0), g.abs(), backend="triton")
        sel = torch.tensor([1.0, 0.0])
        results[f"token_logprob_loss V={V} {dtype}"] = _worst(errors(grads_of(fused, (hs, ws), sel),
                                                                     reference(plain, (hs, ws), sel), V))
        for kind, beta in [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3)]:
            for gkind in ("sum", "random"):
                gg = per_token_weights((1, T), gkind)
                ours = grads_of(lambda a, b: K.kl(a, b, ht, wt, kind=kind, beta=beta, temperature=1.3,
                                                  mask=mask, backend="triton"), (hs, ws), gg)
                ref = reference(lambda a, b: K.kl_ref(a, b, ht.to(a.dtype), wt.to(a.dtype), kind=kind, beta=beta,
                                                      temperature=1.3, mask=mask), (hs, ws), gg)
                results[f"kl {kind} {gkind} V={V} {dtype}"] = _worst(errors(ours, ref, V))
    # out.sum() without a mask hands backward a stride-0 (expanded) grad_output; with
    # precompute_grads=False it reaches the kernels, which must not read past its one element
    hs, ws, _ = lm_inputs(2, 3, 16, 1000, seed=23)
    ht, wt, _ = lm_inputs(2, 3, 16, 1000, seed=24)
    y = torch.randint(0, 1000, (2, 3), generator=torch.Generator().manual_seed(25))
    pairs = [(lambda a, b: K.token_logprobs(a, b, y, backend="triton", precompute_grads=False),
              lambda a, b: K.token_logprobs_ref(a, b, y)),
             (lambda a, b: K.kl(a, b, ht, wt, backend="triton", precompute_grads=False),
              lambda a, b: K.kl_ref(a, b, ht.to(a.dtype), wt.to(a.dtype)))]

    def out_and_grads_of_sum(f, ins):
        leaves = [t.clone().requires_grad_() for t in ins]
        out = f(*leaves)
        return [out, *torch.autograd.grad(out.sum(), leaves)]
    for i, (fn, ref_fn) in enumerate(pairs):
        ref = [out_and_grads_of_sum(ref_fn, cast(dt, hs, ws)) for dt in (torch.float64, torch.float32)]
        results[f"expanded grad_output {i}"] = _worst(errors(out_and_grads_of_sum(fn, (hs, ws)), ref, 1000))
    results.update(_minus_inf_blocks())
    print(json.dumps(results))


def _minus_inf_blocks():
    """Rows whose first vocabulary block (and a few more lanes) is all -inf, as masked logits are:
    the online max starts at -inf there, and exp(-inf - -inf) is NaN unless guarded. The kernels
    on the whole row must equal the torch row math on the finite part (the -inf lanes have
    probability 0: they add nothing and get a zero gradient). The bound: 1e-5 (fp32 sums of
    ~5k terms in another order)."""
    out = {}
    V, C, dead = 5000, 3, 2048 + 7  # a whole 2048-lane block (logprob) and two 1024-lane ones (kl), and more
    gen = torch.Generator().manual_seed(30)
    zs, zt = torch.randn(C, V, generator=gen) * 3, torch.randn(C, V, generator=gen) * 3
    zs[:, :dead] = zt[:, :dead] = float("-inf")
    y = torch.randint(dead, V, (C,), generator=gen)
    g = torch.rand(C, generator=gen) + 0.5
    def worst(*diffs):  # a NaN anywhere is a failure (Python's max() would skip it)
        t = torch.cat([x.flatten() for x in diffs])
        return t.abs().max().item() if torch.isfinite(t).all() else 1e30
    lp, dz = K._logprob_rows_triton(zs.clone(), y, g)
    lp_ref, dz_ref = K._logprob_rows_torch(zs[:, dead:].clone(), y - dead, g)
    out["logprob rows, -inf block"] = (worst(lp - lp_ref, dz[:, dead:] - dz_ref, dz[:, :dead]), 1e-5)
    for kind, beta in [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3)]:
        o, d = K._kl_rows_triton(zs.clone(), zt.clone(), kind, beta, g)
        o_ref, d_ref = K._kl_rows_torch(zs[:, dead:].clone(), zt[:, dead:].clone(), kind, beta, g)
        out[f"kl {kind} rows, -inf block"] = (worst(o - o_ref, d[:, dead:] - d_ref, d[:, :dead]), 1e-5)
    return out


def test_triton_kernels_under_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -r requirements-test.txt)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4 * 8 + 2 + 4
    for name, (err, bound) in results.items():
        assert err <= bound, (name, err, bound)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_kernels_under_interpreter"
    _triton_checks()
