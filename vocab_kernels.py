"""
Exact log-probs and KL divergences straight from hidden states, never [tokens x vocab] in memory.

A Qwen3 vocabulary has 151,936 entries: one 4,096-token sequence of fp32 logits is 2.3 GiB,
and a MOPD step needs the student's and the teacher's. Everything here takes the final hidden
states [..., H] and the lm_head weight [V, H] (logits = hidden @ weight.T / temperature) and
walks over the tokens one chunk at a time, so at most [chunk x V] logits exist at once.

(Named vocab_kernels, not kernels: a top-level kernels.py shadows Hugging Face's `kernels`
package, which transformers >= 5.25 requires and imports, so that from this directory every
`from transformers import ...ForCausalLM` failed; tests/test_cli.py guards the names.)

What is in this file, top to bottom:
- token_logprobs(): log p(target) per token.
- token_logprob_loss(): a loss summed over tokens from each token's log-prob (the policy-
  gradient losses of RL and of MOPD's PG form), its per-token weights formed inside the chunk.
- kl(): exact per-token KL(student || teacher) ("reverse", the MOPD direction),
  KL(teacher || student) ("forward") or the generalised JSD, gradients to the student only.
- teacher_topk() / topk_kl(): the paper's Eq. 5 (teacher top-k ids and log-probs, then the
  truncated KL with its "- p_s + p_t" term).
- logits(): the one GEMM behind all of them (and the sampler's head): fp32 logits from fp32
  or bf16 inputs, on CUDA a bf16 GEMM with fp32 output (no fp32 copy of the weight).
- The one chunked loop they all share (_fused_linear) and the autograd.Function around it.
- Triton kernels for the per-row math of token_logprobs and kl (online max/sum over vocab
  blocks, then the gradient), used automatically on CUDA; plain PyTorch elsewhere.
  The matmuls stay with cuBLAS / MKL in both cases: per chunk, z = h @ W^T, then the row math
  (one pass for the normaliser, one to write dz in place of z), then dz @ W and dz^T @ h.
  Each chunk holds whole rows of z because the gradient needs p = exp(z - logsumexp(z)) for
  every logit, i.e. the row's final normaliser first: with the row at hand each logit is
  computed once (one matmul); blocking the vocabulary too would mean computing it twice.
- *_ref(): plain, materialise-everything references; the tests and bench/bench_kl.py use them.

How the gradient is made cheap. The naive path costs one matmul forward (logits) and two
backward (grad_hidden = dz @ W, grad_weight = dz^T @ h). Recomputing the logits in backward
would cost a fourth. So, like Liger's fused linear cross-entropy, the forward pass computes
the gradients while it holds a chunk's logits, for a unit gradient on every token:
  - grad_hidden is stored per token [N, H]; backward multiplies token n by grad_output[n],
    which is exact for any grad_output (token n's output depends on token n only).
  - grad_weight [V, H] is a sum over tokens, so the stored sum is exact only when
    grad_output is the same number for every unmasked token (loss = out.sum(), out.mean(),
    or a masked mean). Backward checks that; otherwise it recomputes grad_weight chunk by
    chunk with the true grad_output (exact, but one more logits matmul per model plus the
    grad_weight matmul).
Matmuls of [tokens x H x V] per call, forward + backward, student [+ teacher for kl()]; the
naive path needs 3 [+1]:
    loss gives every token the same weight (mean, sum):    3 [+1]   precompute_grads=True
    per-token weights (PG loss -A_t log p, per-seq means): 5 [+2]   precompute_grads=True
    any loss, forward computes values only:                4 [+2]   precompute_grads=False
    token_logprob_loss (the loss itself, fused in):        3        weights formed per chunk
so a loss with per-token weights passes precompute_grads=False, and a policy-gradient loss,
whose weights are functions of each token's own log-prob, uses token_logprob_loss.
Inputs may be fp32 or bf16; logits and every sum are fp32 (fp64 when the inputs are fp64, so
gradcheck works). Outputs are fp32 (fp64 for fp64 inputs). Masked tokens are dropped before
the matmul: they cost nothing, give 0 and receive 0 gradient.
"""

import functools
import math

import torch
import torch.nn.functional as F

try:  # optional: only the CUDA path (and its interpreter tests) needs it
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False

DEFAULT_MEM_BUDGET = 192 * 2**20  # bytes for the [chunk x V] buffers of one call (see bench/bench_kl.py)
KL_KINDS = ("reverse", "forward", "jsd")

# -----------------------------------------------------------------------------
# Small helpers

def _acc_dtype(x):
    # fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 so gradcheck is meaningful
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@functools.cache
def _mm_out_dtype_works(device, dtype):
    """Whether this device runs mm(dtype x dtype -> fp32) at all, tried once: torch < 2.8 has no
    out_dtype, CUDA refuses it below compute capability 8.0 (V100, T4), ROCm's backend may not
    have it. Where it fails, the fp32 path below serves."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _half_gemm(h, w):
    """Whether the logits' GEMM runs in h's and w's own half precision with an fp32 output
    (see logits): on CUDA, both bf16 (or both fp16), where the device runs it."""
    return (h.is_cuda and h.dtype == w.dtype and h.dtype in (torch.bfloat16, torch.float16)
            and _mm_out_dtype_works(h.device, h.dtype))


def gemm_weight(weight, h, acc):
    """The lm_head weight as logits() multiplies it by h: as stored where the half-precision
    GEMM applies (fp32 accumulation: not for fp64 callers such as gradcheck), else a copy in
    the accumulation dtype acc (none if it is already), made once per call for every chunk."""
    return weight if acc == torch.float32 and _half_gemm(h, weight) else weight.to(acc)


def logits(h, w, temperature=1.0, out=None):
    """z = h @ w^T / T, [C, H] x [V, H] -> [C, V] in fp32 (fp64 for fp64 inputs): the one GEMM
    behind every function here and the sampler's head (rollout.head_logits); w from gemm_weight.
    - bf16 (fp16) h and w on CUDA: one GEMM in their own precision with an fp32 output (mm's
      out_dtype). The product of two bf16 numbers is exact in fp32 and cuBLAS accumulates in
      fp32, so z is the fp32 GEMM of the same numbers up to summation order, on tensor cores
      (an fp32 SGEMM is ~15x slower on an H100) and with no fp32 copy of w (Qwen3-30B-A3B's
      head: 151,936 x 2,048 x 4 bytes = 1.2 GB per call). T divides z afterwards: h / T in
      bf16 would round.
    - Elsewhere (w then fp32/fp64): h converted to w's dtype and scaled, then the GEMM; scaling
      h (C x H) is cheaper than scaling z (C x V)."""
    if _half_gemm(h, w):
        z = torch.mm(h, w.t(), out_dtype=torch.float32, out=out)
        return z if temperature == 1.0 else z.div_(temperature)
    h = h.to(w.dtype)
    return torch.mm(h if temperature == 1.0 else h / temperature, w.t(), out=out)


def auto_chunk_size(vocab_size, n_buffers, mem_budget_bytes=DEFAULT_MEM_BUDGET, itemsize=4):
    """Tokens per chunk so that n_buffers [chunk x V] fp32 temporaries fit in the budget."""
    return max(1, int(mem_budget_bytes // (n_buffers * vocab_size * itemsize)))


def _logsumexp(z, rows_at_once=8):
    """torch.logsumexp(z, dim=1, keepdim=True) for z [C, V], with one reused [8 x V] scratch
    buffer: torch.logsumexp itself would allocate a second whole [C x V] temporary."""
    C = z.shape[0]
    m = z.amax(dim=1, keepdim=True)
    s = torch.empty_like(m)
    scratch = z.new_empty(min(rows_at_once, C), z.shape[1])
    for i in range(0, C, rows_at_once):
        r = slice(i, min(i + rows_at_once, C))
        e = torch.sub(z[r], m[r], out=scratch[:r.stop - i]).exp_()  # exp(z - m) for these rows
        s[r] = e.sum(dim=1, keepdim=True)
    return m + s.log()


def _use_triton(backend, x):
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' but triton is not installed")
        if x.dtype == torch.float64:
            raise ValueError("the Triton kernels work in fp32; use backend='torch' for fp64")
        return True
    if backend == "auto":
        return HAS_TRITON and x.is_cuda and x.dtype != torch.float64
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def _flatten(hidden, mask):
    """[..., H] -> ([...], [n_valid, H], idx): masked tokens are dropped before any matmul."""
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    if mask is None:
        return lead, flat, None
    if mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} != hidden leading shape {tuple(lead)}")
    idx = mask.reshape(-1).bool().nonzero().squeeze(1)
    return lead, flat.index_select(0, idx), idx  # index_select is differentiable: 0 grad to masked rows


def _unflatten(vals, lead, idx, fill=0):
    """Per-valid-token values [n_valid, *rest] -> [..., *rest], masked tokens = fill."""
    rest = vals.shape[1:]
    if idx is None:
        return vals.reshape(*lead, *rest)
    n = math.prod(lead)
    out = vals.new_full((n, *rest), fill).index_put((idx,), vals)  # differentiable w.r.t. vals
    return out.reshape(*lead, *rest)


def _per_token(x, lead, idx):
    """A per-token tensor [..., *rest] (same leading shape as hidden) -> [n_valid, *rest]."""
    if x.shape[:len(lead)] != lead:
        raise ValueError(f"expected leading shape {tuple(lead)}, got {tuple(x.shape)}")
    flat = x.reshape(-1, *x.shape[len(lead):])
    return flat if idx is None else flat[idx]

# -----------------------------------------------------------------------------
# Per-row math, PyTorch. Each takes one chunk of logits z [C, V] (fp32, ours to overwrite),
# returns the per-token output [C] and dz = d(sum_n g_n out_n)/dz, or None when no g is given.
# The ops are in place wherever a buffer is dead, so the live [C, V] buffers stay few; the
# public functions count them when they turn the memory budget into a chunk size.

def _logprob_rows_torch(z, y, g):
    # log p_v = z_v - m - log s,  m = max_v z_v,  s = sum_v exp(z_v - m)
    # This lives in z alone: z -> z - m -> p -> dz.
    m = z.amax(dim=1, keepdim=True)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z -= m
    p = z.exp_()
    s = p.sum(1, keepdim=True)
    lp = z_y - (m + s.log()).squeeze(1)
    if g is None:
        return lp, None
    if callable(g):  # the weights depend on the log-probs (token_logprob_loss)
        g = g(lp)
    # d lp / dz_j = 1[j = y] - p_j, with p_j = exp(z_j - m) / s: one pass scales by -g / s
    dz = p.mul_(-g[:, None] / s).scatter_add_(1, y[:, None], g[:, None])
    return lp, dz


def _kl_rows_torch(zs, zt, kind, beta, g):
    # a = log p_s, b = log p_t over the full vocabulary
    zs -= _logsumexp(zs)
    zt -= _logsumexp(zt)
    if kind == "reverse":
        # KL(s||t) = sum_v p_s (a - b);   dKL/dz_s = p_s (a - b - KL)
        terms = zt.neg_().add_(zs)                       # a - b, in place of b
        ps = zs.exp_()                                   # p_s, in place of a
        out = terms.mul_(ps).sum(1)                      # terms: p_s (a - b)
        dz = None if g is None else terms.addcmul_(ps, out[:, None], value=-1).mul_(g[:, None])
    elif kind == "forward":
        # KL(t||s) = sum_v p_t (b - a);   dKL/dz_s = p_s - p_t
        pt = zt.exp()
        out = zt.sub_(zs).mul_(pt).sum(1)                # p_t (b - a), in place of b
        dz = None if g is None else zs.exp_().sub_(pt).mul_(g[:, None])
    else:
        # JSD_beta = beta KL(t||m) + (1-beta) KL(s||m),   m = (1-beta) p_s + beta p_t
        # dJSD/dz_s = (1-beta) p_s (a - log m - KL(s||m))   (the d log m terms sum to zero)
        logm = zs + math.log1p(-beta)
        torch.logaddexp(logm, zt + math.log(beta), out=logm)  # log m, in log space: no underflow
        pt = zt.exp()
        kl_t = zt.sub_(logm).mul_(pt).sum(1)             # sum p_t (b - log m), in place of b
        ps = torch.exp(zs, out=pt)                       # p_s, in place of p_t
        diff = zs.sub_(logm)                             # a - log m, in place of a
        kl_s = torch.mul(diff, ps, out=logm).sum(1)      # sum p_s (a - log m), in place of log m
        out = beta * kl_t + (1 - beta) * kl_s
        dz = None if g is None else diff.sub_(kl_s[:, None]).mul_(ps).mul_((1 - beta) * g[:, None])
    return out, dz


def _topk_rows_torch(z, ids, lt, g):
    # Eq. 5: sum_{v in K} [ p_s(v) (log p_s(v) - log p_t(v)) - p_s(v) + p_t(v) ],
    # p_s normalised over the FULL vocabulary, the teacher's top-k log-probs not renormalised.
    z -= _logsumexp(z)
    ls = z.gather(1, ids)
    ps, pt = ls.exp(), lt.exp()
    out = (ps * (ls - lt) - ps + pt).sum(1)
    if g is None:
        return out, None
    # d out / d log p_s(v) = p_s(v) (ls - lt) =: c_v on K; through log-softmax: dz_j = c_j - p_j sum_v c_v
    c = ps * (ls - lt) * g[:, None]
    dz = z.exp_().mul_(-c.sum(1, keepdim=True)).scatter_add_(1, ids, c)
    return out, dz

# -----------------------------------------------------------------------------
# Per-row math, Triton (CUDA; or CPU under TRITON_INTERPRET=1). One program per token row,
# looping over blocks of the vocabulary: pass 1 keeps a running max m and a running sum
# d = sum exp(z - m) (rescaled by exp(m_old - m_new) whenever the max grows, as in flash
# attention), so each logit is read once for the normaliser; pass 2 writes dz in place.

if HAS_TRITON:
    @triton.jit
    def _logprob_rows_kernel(Z, stride_z, Y, G, LP, V, BLOCK: tl.constexpr, GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = Z + row * stride_z
        # the target's logit first: pass 2 overwrites the row in place, and a read after pass 1
        # could race with another warp's pass-2 store (the reductions below are the barrier)
        y = tl.load(Y + row)
        zy = tl.load(z_row + y)
        m = float("-inf")  # running max
        d = 0.0            # running sum exp(z - m)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < V
            z = tl.load(z_row + offs, mask=inb, other=0.0)
            m_new = tl.maximum(m, tl.max(tl.where(inb, z, float("-inf")), axis=0))
            m_ok = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp(-inf), not exp(nan)
            e = tl.where(inb, tl.exp(z - m_ok), 0.0)  # lanes past the end of the vocab add nothing
            d = d * tl.exp(m - m_ok) + tl.sum(e, axis=0)
            m = m_new
        lse = m + tl.log(d)
        tl.store(LP + row, zy - lse)
        if GRAD:
            g = tl.load(G + row)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                inb = offs < V
                p = tl.exp(tl.load(z_row + offs, mask=inb, other=0.0) - lse)
                dz = tl.where(offs == y, g, 0.0) - g * p  # g (1[j = y] - p_j)
                tl.store(z_row + offs, dz, mask=inb)

    @triton.jit
    def _kl_rows_kernel(ZS, ZT, stride_s, stride_t, G, OUT, V, beta, log_beta, log_1m_beta,
                        KIND: tl.constexpr, BLOCK: tl.constexpr, GRAD: tl.constexpr):
        # KIND 0: reverse KL(s||t), 1: forward KL(t||s), 2: generalised JSD with 0 < beta < 1
        row = tl.program_id(0).to(tl.int64)
        zs_row = ZS + row * stride_s
        zt_row = ZT + row * stride_t
        # pass 1: both normalisers, online, plus the cross term of the direction:
        #   reverse: c = sum exp(zs - ms) (zs - zt)  ->  KL = c / ds - lse_s + lse_t
        #   forward: c = sum exp(zt - mt) (zt - zs)  ->  KL = c / dt - lse_t + lse_s
        ms = float("-inf")
        mt = float("-inf")
        ds = 0.0
        dt = 0.0
        c = 0.0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < V
            zs = tl.load(zs_row + offs, mask=inb, other=0.0)
            zt = tl.load(zt_row + offs, mask=inb, other=0.0)
            ms_new = tl.maximum(ms, tl.max(tl.where(inb, zs, float("-inf")), axis=0))
            mt_new = tl.maximum(mt, tl.max(tl.where(inb, zt, float("-inf")), axis=0))
            ms_ok = tl.where(ms_new == float("-inf"), 0.0, ms_new)  # all -inf so far: no exp(nan)
            mt_ok = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            es = tl.where(inb, tl.exp(zs - ms_ok), 0.0)  # lanes past the end of the vocab add nothing
            et = tl.where(inb, tl.exp(zt - mt_ok), 0.0)
            if KIND == 0:  # a token of probability 0 adds 0 (not 0 * inf)
                c = c * tl.exp(ms - ms_ok) + tl.sum(tl.where(es > 0, es * (zs - zt), 0.0), axis=0)
            if KIND == 1:
                c = c * tl.exp(mt - mt_ok) + tl.sum(tl.where(et > 0, et * (zt - zs), 0.0), axis=0)
            ds = ds * tl.exp(ms - ms_ok) + tl.sum(es, axis=0)
            dt = dt * tl.exp(mt - mt_ok) + tl.sum(et, axis=0)
            ms = ms_new
            mt = mt_new
        lse_s = ms + tl.log(ds)
        lse_t = mt + tl.log(dt)
        kl = 0.0
        kl_s = 0.0
        if KIND == 0:
            kl = c / ds - lse_s + lse_t
        if KIND == 1:
            kl = c / dt - lse_t + lse_s
        if KIND == 2:
            # pass 2: the mixture m = (1-beta) p_s + beta p_t needs both final normalisers
            kl_t = 0.0
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                inb = offs < V
                a = tl.load(zs_row + offs, mask=inb, other=0.0) - lse_s
                b = tl.load(zt_row + offs, mask=inb, other=0.0) - lse_t
                x = log_1m_beta + a
                w = log_beta + b
                mx = tl.maximum(x, w)
                mx = tl.where(mx == float("-inf"), 0.0, mx)
                logm = mx + tl.log(tl.exp(x - mx) + tl.exp(w - mx))
                kl_t += tl.sum(tl.where(inb & (b > float("-inf")), tl.exp(b) * (b - logm), 0.0), axis=0)
                kl_s += tl.sum(tl.where(inb & (a > float("-inf")), tl.exp(a) * (a - logm), 0.0), axis=0)
            kl = beta * kl_t + (1.0 - beta) * kl_s
        tl.store(OUT + row, kl)
        if GRAD:
            g = tl.load(G + row)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                inb = offs < V
                a = tl.load(zs_row + offs, mask=inb, other=0.0) - lse_s
                b = tl.load(zt_row + offs, mask=inb, other=0.0) - lse_t
                ps = tl.exp(a)
                if KIND == 0:
                    dz = tl.where(ps > 0, g * ps * (a - b - kl), 0.0)
                if KIND == 1:
                    dz = g * (ps - tl.exp(b))
                if KIND == 2:
                    x = log_1m_beta + a
                    w = log_beta + b
                    mx = tl.maximum(x, w)
                    mx = tl.where(mx == float("-inf"), 0.0, mx)
                    logm = mx + tl.log(tl.exp(x - mx) + tl.exp(w - mx))
                    dz = tl.where(ps > 0, g * (1.0 - beta) * ps * (a - logm - kl_s), 0.0)
                tl.store(zs_row + offs, dz, mask=inb)


def _block(V, cap):
    """Vocabulary lanes per block: a power of two, at most `cap` (with 8 warps, 2048 fp32 lanes are 8
    values per thread per live tensor; the old 4096 with 4 warps spilled registers in the KL kernel,
    which keeps ~6 such tensors live; neither figure is measured on a GPU yet: bench/gpu_check.sh)."""
    return min(cap, triton.next_power_of_2(V))


NUM_WARPS = 8


def _logprob_rows_triton(z, y, g):
    C, V = z.shape
    lp = torch.empty(C, dtype=torch.float32, device=z.device)
    # the kernel reads row r of y and g at base + r: make them dense (a grad_output may be an
    # expanded, stride-0 tensor). Without g the pointer gets `lp`; GRAD=False keeps it unread.
    y = y.contiguous()
    if callable(g):  # weights from the log-probs: values first, then the gradient pass
        _logprob_rows_kernel[(C,)](z, z.stride(0), y, lp, lp, V, BLOCK=_block(V, 2048), GRAD=False,
                                   num_warps=NUM_WARPS)
        g = g(lp)
    g_ = lp if g is None else g.contiguous()
    _logprob_rows_kernel[(C,)](z, z.stride(0), y, g_, lp, V, BLOCK=_block(V, 2048), GRAD=g is not None,
                               num_warps=NUM_WARPS)
    return lp, (z if g is not None else None)


def _kl_rows_triton(zs, zt, kind, beta, g):
    C, V = zs.shape
    out = torch.empty(C, dtype=torch.float32, device=zs.device)
    kind_id = KL_KINDS.index(kind)
    log_beta = math.log(beta) if 0 < beta else 0.0
    log_1m_beta = math.log1p(-beta) if beta < 1 else 0.0
    g_ = out if g is None else g.contiguous()
    _kl_rows_kernel[(C,)](zs, zt, zs.stride(0), zt.stride(0), g_, out, V, beta, log_beta, log_1m_beta,
                          KIND=kind_id, BLOCK=_block(V, 1024), GRAD=g is not None, num_warps=NUM_WARPS)
    return out, (zs if g is not None else None)

# -----------------------------------------------------------------------------
# The loop every function shares, and its autograd.Function

def _fused_linear(hidden, weight, temperature, rows, chunk_size, g=None,
                  need_grad_hidden=False, need_grad_weight=False):
    """For each chunk c of tokens (hidden: [N, H] valid tokens, weight: [V, H]):
         z             = hidden[c] @ weight^T / T              [C, V], fp32
         out[c], dz    = rows(z, c, g[c])                        dz = d(sum_n g_n out_n)/dz
         grad_hidden[c] = dz @ weight / T                        [C, H]
         grad_weight  += dz^T @ hidden[c] / T                    [V, H]
    g: the per-token weights [N] of the output (its grad_output); None = values only; or a
    function g(c, out_c) -> weights of chunk c, for weights that depend on the output."""
    N, H = hidden.shape
    acc = _acc_dtype(hidden)
    w = gemm_weight(weight, hidden, acc)  # a weight-sized copy only for bf16 weights off CUDA
    # the gradients' two GEMMs stay in fp32 (dz is fp32): on CUDA in bf16 this is the one
    # place an fp32 copy of the weight is still made, and only when a gradient is wanted
    w_grad = w.to(acc) if need_grad_hidden or need_grad_weight else None
    grad_h = hidden.new_empty(N, H, dtype=acc) if need_grad_hidden else None
    grad_w = torch.zeros_like(w_grad) if need_grad_weight else None
    zbuf = chunk_buffer(min(chunk_size, N), w)  # every chunk's logits, in one buffer
    outs = []
    for start in range(0, N, chunk_size):
        c = slice(start, min(start + chunk_size, N))
        z = logits(hidden[c], w, temperature, out=zbuf[:c.stop - start])
        gc = None if g is None else (lambda o, c=c: g(c, o)) if callable(g) else g[c]
        out, dz = rows(z, c, gc)
        outs.append(out)
        if dz is not None:
            if need_grad_hidden:
                grad_h[c] = dz @ w_grad
            if need_grad_weight:
                h = hidden[c].to(acc)
                grad_w.addmm_(dz.t(), h if temperature == 1.0 else h / temperature)
        del z, dz  # free this chunk's logits before the next chunk's are made
    if grad_h is not None:
        grad_h /= temperature
    out = torch.cat(outs) if outs else hidden.new_zeros(0, dtype=acc)  # no tokens at all: empty
    return out, grad_h, grad_w


def chunk_buffer(rows, w):
    """An uninitialised [rows x V] buffer for a chunk's logits (w: the [V, H] weight), made once
    per call and reused by every chunk. A fresh [chunk x V] tensor per chunk is a fresh mmap
    (glibc serves blocks above 32 MiB so), whose every page the kernel must fault in and zero
    before the matmul writes it: at V = 151,936 and 331-row chunks that was a third of the time
    of the logits' matmul on a CPU (0.47 -> 0.30 s for 1,024 tokens; README "Benchmarks: RL and
    MOPD steps"). On CUDA the caching allocator already reuses blocks; the buffer costs nothing."""
    return torch.empty(rows, w.shape[0], dtype=_acc_dtype(w), device=w.device)


def _is_uniform(g):
    return g.numel() == 0 or bool((g == g[0]).all())


class _FusedLinearFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H]) -> the per-token output of `rows`, see _fused_linear.
    Forward computes the gradients for a unit grad_output; backward scales them, or
    recomputes what a general grad_output needs (see the module docstring for the costs)."""

    @staticmethod
    def forward(ctx, hidden, weight, temperature, rows, chunk_size, precompute_grads):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        unit = None  # precompute_grads=False: values only now, backward recomputes everything
        if precompute_grads:
            unit = torch.ones(hidden.shape[0], dtype=_acc_dtype(hidden), device=hidden.device)
        out, ctx.grad_h, ctx.grad_w = _fused_linear(hidden, weight, temperature, rows, chunk_size,
                                                    unit, need_h and precompute_grads,
                                                    need_w and precompute_grads)
        ctx.save_for_backward(hidden, weight)
        ctx.temperature, ctx.rows, ctx.chunk_size = temperature, rows, chunk_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = grad_w = None
        # stored per-token grad_hidden: exact for any grad_output, token by token.
        # Out of place ([N, H] is small), so a graph kept with retain_graph can use it again.
        if need_h and ctx.grad_h is not None:
            grad_h = ctx.grad_h * g[:, None]
        # stored grad_weight is a sum over tokens: exact only for one grad_output for all tokens.
        # It is weight-sized, so it is scaled in place and handed out once.
        if need_w and ctx.grad_w is not None and _is_uniform(g):
            grad_w = ctx.grad_w.mul_(g[0] if g.numel() else 0.0)
        ctx.grad_w = None
        redo_h, redo_w = need_h and grad_h is None, need_w and grad_w is None
        if redo_h or redo_w:  # general grad_output: recompute, chunk by chunk, with the true g
            _, gh, gw = _fused_linear(hidden, weight, ctx.temperature, ctx.rows, ctx.chunk_size,
                                      g.to(_acc_dtype(hidden)), redo_h, redo_w)
            grad_h = gh if redo_h else grad_h
            grad_w = gw if redo_w else grad_w
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def _run(hidden, weight, temperature, rows, chunk_size, precompute_grads):
    """Values (and, when autograd needs them, gradients) of `rows` over all valid tokens."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearFunction.apply(hidden, weight, temperature, rows, chunk_size, precompute_grads)
    return _fused_linear(hidden, weight, temperature, rows, chunk_size)[0]


class _FusedLossFunction(torch.autograd.Function):
    """(hidden [N, H], weight [V, H]) -> (loss, per-token output), see token_logprob_loss.
    The forward pass computes the exact gradients (the weights come from the output itself,
    chunk by chunk); the loss is a scalar, so backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, temperature, rows, chunk_size, weights, sums):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out, ctx.grad_h, ctx.grad_w = _fused_linear(hidden, weight, temperature, rows, chunk_size, weights,
                                                    need_h, need_w)
        ctx.mark_non_differentiable(out)
        ctx.dtypes = hidden.dtype, weight.dtype
        loss = torch.stack(sums).sum() if sums else out.new_zeros(())
        return loss, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _):
        if ctx.needs_input_grad[1] and ctx.grad_w is None:
            raise RuntimeError("token_logprob_loss: its gradients are handed out once (the weight's is "
                               "scaled in place); a second backward through the same loss is not supported")
        grad_h = None if ctx.grad_h is None else (ctx.grad_h * g).to(ctx.dtypes[0])  # out of place: kept
        grad_w = None if ctx.grad_w is None else ctx.grad_w.mul_(g).to(ctx.dtypes[1])
        ctx.grad_w = None  # weight-sized: scaled in place and handed out once
        return grad_h, grad_w, None, None, None, None, None


def _check(hidden, weight, temperature):
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != weight.shape[1] {weight.shape[1]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

# -----------------------------------------------------------------------------
# Public API

def token_logprobs(hidden, weight, targets, temperature=1.0, mask=None, chunk_size=None,
                   mem_budget_bytes=DEFAULT_MEM_BUDGET, backend="auto", precompute_grads=True):
    """log p(targets) per token, p = softmax(hidden @ weight.T / temperature) over the full vocab.

    hidden [..., H] (fp32/bf16), weight [V, H], targets [...] (int), mask [...] (bool) or None.
    Returns fp32 [...] log-probs; masked tokens give 0.
    Differentiable w.r.t. hidden and weight. backend: "auto" (Triton on CUDA), "torch", "triton".
    chunk_size: tokens per chunk; None = as many as mem_budget_bytes allows ([chunk x V] fp32).
    precompute_grads: True suits losses that weight every token alike (out.mean()); for per-token
    weights known only at backward time, False saves one matmul of five. A policy-gradient
    loss, whose weights are functions of each token's own log-prob, is token_logprob_loss's.
    Under torch.no_grad() (or with inputs that need no grad) only the values are computed.
    """
    _check(hidden, weight, temperature)
    lead, h, idx = _flatten(hidden, mask)
    y = _per_token(targets, lead, idx).long()
    V = weight.shape[0]
    chunk = chunk_size or auto_chunk_size(V, 1, mem_budget_bytes)  # the logits
    triton_rows = _use_triton(backend, hidden)
    if not triton_rows and not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _unflatten(_logprobs_by_vocab_block(h, weight, y, temperature, mem_budget_bytes), lead, idx)
    row_fn = _logprob_rows_triton if triton_rows else _logprob_rows_torch

    def rows(z, c, g):
        return row_fn(z, y[c], g)

    return _unflatten(_run(h, weight, temperature, rows, chunk, precompute_grads), lead, idx)


def _logprobs_by_vocab_block(h, weight, y, temperature, mem_budget_bytes, block=2048, max_rows=1024):
    """
    token_logprobs' values when no gradient is wanted (a teacher's scoring, the PG signal), on
    the PyTorch path: log p(y) = z_y - log sum_v exp(z_v), with the normaliser accumulated over
    vocabulary blocks, logsumexp_v z_v = logsumexp_b (logsumexp_{v in b} z_v), as flash
    attention does over keys. Each block's [rows x 2,048] logits (16 MiB at most) stay in the
    CPU's cache between the matmul that writes them and the logsumexp that reads them, where a
    chunk of whole rows ([331 x 151,936] at the default budget: 201 MB) went to memory and back
    for each of its passes: 1,024 tokens at V = 151,936 took 0.33 s against 0.48-0.52 s (README
    "Benchmarks: RL and MOPD steps"). z_y is its own dot product, h . w_y. Without the whole row
    at hand there is no gradient here: training takes _fused_linear's path.
    """
    acc = _acc_dtype(h)
    V = weight.shape[0]
    rows = max(1, min(max_rows, auto_chunk_size(min(block, V), 1, mem_budget_bytes), h.shape[0]))
    nb = -(-V // block)
    buf = h.new_empty(rows, min(block, V), dtype=acc)  # one block's logits
    lse = h.new_empty(rows, nb, dtype=acc)  # each block's logsumexp, per token
    out = []
    for start in range(0, h.shape[0], rows):
        hc = h[start:start + rows]
        n = hc.shape[0]
        for b in range(nb):
            wb = gemm_weight(weight[b * block:(b + 1) * block], hc, acc)
            lse[:n, b] = torch.logsumexp(logits(hc, wb, temperature, out=buf[:n, :wb.shape[0]]), dim=1)
        z_y = (hc.to(acc) / temperature * weight[y[start:start + n]].to(acc)).sum(1)
        out.append(z_y - torch.logsumexp(lse[:n], dim=1))
    return torch.cat(out) if out else h.new_zeros(0, dtype=acc)


def token_logprob_loss(hidden, weight, targets, loss_fn, temperature=1.0, mask=None, chunk_size=None,
                       mem_budget_bytes=DEFAULT_MEM_BUDGET, backend="auto"):
    """A loss summed over tokens, each token's term a function of its own log-prob, fused:
        loss = sum_n loss_fn(lp)_n,   lp_n = log p(targets_n)   (over the unmasked tokens)
    The policy-gradient losses are such sums: -A_t * ratio_t with A_t = sg[log pi_T - log
    pi_theta] (MOPD) or a reward's (RL), PPO's clip, the band, a k3 KL, each times its
    aggregation weight. Their per-token weights d loss / d lp_n depend on lp itself, so
    token_logprobs must wait for backward and compute the logits again (4 matmuls with
    precompute_grads=False, see the top); here each chunk's log-probs give its weights
    (autograd on the chunk's [C] values) while its logits are at hand, so the exact gradients
    cost 3 matmuls, as naive code.

    loss_fn: log-probs [...] (the targets' shape; masked tokens hold 0) -> per-token loss [...].
    It must be elementwise: token n's term may depend on lp_n and on constants only (it is
    called once per chunk on a tensor whose other tokens hold placeholders, so its elementwise
    work is N / chunk times N: nothing next to a chunk's C x H x V matmul). Masked tokens'
    terms are not counted. hidden, weight, targets, mask, chunk_size, backend: as token_logprobs.
    Returns (loss: a 0-dim tensor, fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden and
    weight, whose gradients are handed out once: no second backward; lp [...]: the log-probs,
    detached, masked tokens 0).
    """
    _check(hidden, weight, temperature)
    lead, h, idx = _flatten(hidden, mask)
    y = _per_token(targets, lead, idx).long()
    pos = idx if idx is not None else torch.arange(h.shape[0], device=h.device)  # flat positions in [...]
    V, n_all = weight.shape[0], math.prod(lead)
    chunk = chunk_size or auto_chunk_size(V, 1, mem_budget_bytes)  # the logits
    row_fn = _logprob_rows_triton if _use_triton(backend, hidden) else _logprob_rows_torch
    sums = []  # each chunk's loss

    def weights(c, lp):  # d loss / d lp of chunk c's tokens, from their log-probs
        with torch.enable_grad():
            leaf = lp.detach().requires_grad_()
            full = leaf.new_zeros(n_all).index_put((pos[c],), leaf)  # differentiable w.r.t. leaf
            term = loss_fn(full.view(lead)).reshape(-1)[pos[c]].sum()
            g = torch.autograd.grad(term, leaf, allow_unused=True)[0] if term.requires_grad else None
        sums.append(term.detach().to(lp.dtype))
        return torch.zeros_like(lp) if g is None else g

    def rows(z, c, g):
        return row_fn(z, y[c], g)

    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, lp = _FusedLossFunction.apply(h, weight, temperature, rows, chunk, weights, sums)
    else:
        lp = _fused_linear(h, weight, temperature, rows, chunk, weights)[0]
        loss = torch.stack(sums).sum() if sums else lp.new_zeros(())
    return loss, _unflatten(lp, lead, idx)


def kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind="reverse", beta=0.5,
       temperature=1.0, mask=None, chunk_size=None, mem_budget_bytes=DEFAULT_MEM_BUDGET,
       backend="auto", precompute_grads=True):
    """Exact per-token divergence between the student's and the teacher's full-vocab distributions.

    kind="reverse": KL(student || teacher) = sum_v p_s (log p_s - log p_t)   (MOPD's direction)
    kind="forward": KL(teacher || student) = sum_v p_t (log p_t - log p_s)
    kind="jsd":     generalised JSD as in TRL's GKD: with m = (1-beta) p_s + beta p_t,
                    JSD = beta KL(t || m) + (1-beta) KL(s || m) for 0 < beta < 1; beta=0 is
                    exactly forward KL and beta=1 exactly reverse KL (the mixture formula itself
                    goes to 0 at both ends, so the ends are defined as the two KLs).
    The teacher comes as teacher_hidden [..., H_t] + teacher_weight [V, H_t], its logits never
    materialised either. Teacher inputs are constants: gradients flow to the student only.
    Returns fp32 [...]; masked tokens give 0. chunk_size, mem_budget_bytes, backend and
    precompute_grads are as in token_logprobs (False suits per-sequence means, see the top).
    """
    _check(student_hidden, student_weight, temperature)
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        kind = {0.0: "forward", 1.0: "reverse"}.get(float(beta), "jsd")
    V = student_weight.shape[0]
    lead, h, idx = _flatten(student_hidden, mask)
    if teacher_weight.shape[0] != V or teacher_hidden.shape[:-1] != lead:
        raise ValueError("teacher_hidden/teacher_weight must match the student's tokens and vocabulary "
                         "(teacher and student must share the tokenizer)")
    acc = _acc_dtype(student_hidden)
    th = _per_token(teacher_hidden.detach(), lead, idx)
    tw = gemm_weight(teacher_weight.detach(), th, acc)
    # live [chunk x V] buffers: both logits, plus p_t (forward), plus log m (jsd)
    chunk = chunk_size or auto_chunk_size(V, {"reverse": 2, "forward": 3, "jsd": 4}[kind], mem_budget_bytes)
    row_fn = _kl_rows_triton if _use_triton(backend, student_hidden) else _kl_rows_torch

    tbuf = chunk_buffer(min(chunk, th.shape[0]), tw)  # the teacher's logits, one buffer (chunk_buffer)

    def rows(z, c, g):  # the teacher's logits next to the student's
        return row_fn(z, logits(th[c], tw, temperature, out=tbuf[:c.stop - c.start]), kind, beta, g)

    return _unflatten(_run(h, student_weight, temperature, rows, chunk, precompute_grads), lead, idx)


@torch.no_grad()
def teacher_topk(hidden, weight, k=64, temperature=1.0, mask=None, chunk_size=None,
                 mem_budget_bytes=DEFAULT_MEM_BUDGET):
    """The teacher's top-k token ids and their log-probs, normalised over the FULL vocabulary.

    Returns ids [..., k] (int64) and logprobs [..., k] (fp32), sorted by decreasing probability;
    masked tokens get ids 0 and logprobs 0 (topk_kl ignores them under the same mask).
    """
    _check(hidden, weight, temperature)
    V = weight.shape[0]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, {V}], got {k}")
    lead, h, idx = _flatten(hidden.detach(), mask)
    acc = _acc_dtype(hidden)
    w = gemm_weight(weight.detach(), h, acc)
    chunk = chunk_size or auto_chunk_size(V, 1, mem_budget_bytes)  # the logits
    ids, lps = [h.new_zeros(0, k, dtype=torch.long)], [h.new_zeros(0, k, dtype=acc)]
    zbuf = chunk_buffer(min(chunk, h.shape[0]), w)
    for start in range(0, h.shape[0], chunk):
        hc = h[start:start + chunk]
        z = logits(hc, w, temperature, out=zbuf[:hc.shape[0]])
        vals, top = z.topk(k, dim=1)
        lps.append(vals - _logsumexp(z))
        ids.append(top)
    return _unflatten(torch.cat(ids), lead, idx), _unflatten(torch.cat(lps), lead, idx)


def topk_kl(student_hidden, student_weight, topk_ids, teacher_topk_logprobs, temperature=1.0,
            mask=None, chunk_size=None, mem_budget_bytes=DEFAULT_MEM_BUDGET, precompute_grads=True):
    """Paper Eq. 5 per token: sum_{v in K} [ p_s(v) log(p_s(v)/p_t(v)) - p_s(v) + p_t(v) ].

    K = topk_ids [..., k] (the teacher's top-k), teacher_topk_logprobs [..., k] as returned by
    teacher_topk (full-vocab normalised, not renormalised over K). The student's log-probs are
    normalised over the full vocabulary too. Gradients to the student only. Returns fp32 [...].
    """
    _check(student_hidden, student_weight, temperature)
    V = student_weight.shape[0]
    lead, h, idx = _flatten(student_hidden, mask)
    acc = _acc_dtype(student_hidden)
    ids = _per_token(topk_ids, lead, idx).long()
    lt = _per_token(teacher_topk_logprobs.detach(), lead, idx).to(acc)
    chunk = chunk_size or auto_chunk_size(V, 1, mem_budget_bytes)  # the logits

    def rows(z, c, g):
        return _topk_rows_torch(z, ids[c], lt[c], g)

    return _unflatten(_run(h, student_weight, temperature, rows, chunk, precompute_grads), lead, idx)

# -----------------------------------------------------------------------------
# References: materialise the logits, write the math as plainly as possible. Used by the tests
# (in float64) and as the "naive" side of bench/bench_kl.py (in fp32).

def _ref_logits(hidden, weight, temperature):
    dtype = torch.promote_types(_acc_dtype(hidden), _acc_dtype(weight))
    return (hidden.to(dtype) @ weight.to(dtype).t()) / temperature


def _ref_masked(x, mask):
    return x if mask is None else torch.where(mask, x, torch.zeros_like(x))


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, mask=None):
    logp = F.log_softmax(_ref_logits(hidden, weight, temperature), dim=-1)
    lp = logp.gather(-1, targets.long().clamp_min(0)[..., None]).squeeze(-1)
    return _ref_masked(lp, mask)


def kl_from_logprobs_ref(ls, lt, kind="reverse", beta=0.5):
    """Per-token divergence from full log-prob tensors ls (student) and lt (teacher), [..., V]."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    if kind == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    logm = torch.logsumexp(torch.stack([ls + math.log1p(-beta), lt + math.log(beta)]), dim=0)
    return beta * (lt.exp() * (lt - logm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - logm)).sum(-1)


def kl_ref(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind="reverse", beta=0.5,
           temperature=1.0, mask=None):
    zs = _ref_logits(student_hidden, student_weight, temperature)
    zt = _ref_logits(teacher_hidden, teacher_weight, temperature).detach()
    out = kl_from_logprobs_ref(F.log_softmax(zs, -1), F.log_softmax(zt, -1), kind, beta)
    return _ref_masked(out, mask)


def teacher_topk_ref(hidden, weight, k=64, temperature=1.0, mask=None):
    logp = F.log_softmax(_ref_logits(hidden, weight, temperature), dim=-1)
    lps, ids = logp.topk(k, dim=-1)
    if mask is not None:
        ids, lps = ids * mask[..., None], _ref_masked(lps, mask[..., None])
    return ids, lps


def topk_kl_ref(student_hidden, student_weight, topk_ids, teacher_topk_logprobs, temperature=1.0,
                mask=None):
    ls = F.log_softmax(_ref_logits(student_hidden, student_weight, temperature), dim=-1)
    ls = ls.gather(-1, topk_ids.long())
    lt = teacher_topk_logprobs.to(ls.dtype)
    out = (ls.exp() * (ls - lt) - ls.exp() + lt.exp()).sum(-1)
    return _ref_masked(out, mask)
