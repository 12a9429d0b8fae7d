"""
The transformer: Qwen3 (dense), Qwen3-MoE and Llama, written out by hand, with the names
and layout of ordinary Hugging Face checkpoints (reading and writing their files is
checkpoint.py's job; this file does no IO beyond ModelConfig.from_hf reading a config.json).

What is in this file, top to bottom:
- ModelConfig: one dataclass, built from an HF `config.json` (ModelConfig.from_hf).
- RoPE (default / linear / llama3 / yarn), RMSNorm, attention (SDPA, flash-attn on CUDA when
  importable), the SwiGLU MLP and the MoE block.
- KVCache: a preallocated per-layer cache with one write position per row (used by
  rollout.py; prompts are right-padded, so every row's positions start at 0 and the
  "one shared position counter" bug of left-padded decoding cannot happen).
- Transformer: forward() returns logits or the final hidden states (vocab_kernels.py wants the
  hidden states plus `lm_head_weight`, never [tokens x vocab] logits);
  from_pretrained() / load_hf_weights() / save_pretrained() read and write HF safetensors
  directories through checkpoint.py (_hf_layout() is the name mapping they use);
  inference_weights(): what generate() runs under on a CPU, a per-call snapshot of the
  blocks' weights with q/k/v and gate/up fused and transposed (faster small GEMMs), each
  matrix and the lm_head also prepacked for the decode batch (prepack: MKL's own layout), or
  multiplied as W @ x^T where that is faster on this CPU and gives the same bits (decode_gemm).
  Sharded (FSDP2) models: from_pretrained(shard_fn=...) has each rank read only its own
  slices of the files; save_pretrained() is then a collective that gathers one file at a time.

Notes on fidelity: every op follows transformers' own implementation order (RMSNorm in
fp32, q/k norm before RoPE, router softmax in fp32 before top-k) so our logits match
theirs to float rounding; tests/test_model.py checks that for all three families.
"""

import functools
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from checkpoint import TOKENIZER_FILES, VOCAB_FILES, load_tokenizer  # noqa: F401  (re-exported: callers import them from here)

try:  # optional: used only for the no-cache causal case on CUDA
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

SUPPORTED_ARCHS = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe",
                   "LlamaForCausalLM": "llama"}
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")

# -----------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    arch: str = "qwen3"                  # qwen3 | qwen3_moe | llama
    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 256         # dense MLP width
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2                # GQA: each KV head serves num_heads/num_kv_heads queries
    head_dim: int = 16                   # Qwen3: independent of hidden_size/num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # {"rope_type": "linear"|"llama3", ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    # MoE (qwen3_moe only)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # tokens; kept so a saved directory is complete
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False)  # HF keys we do not interpret

    @property
    def qk_norm(self):  # Qwen3's per-head RMSNorm on q and k, applied before RoPE
        return self.arch in ("qwen3", "qwen3_moe")

    def is_moe_layer(self, i):  # same rule as transformers' Qwen3MoeDecoderLayer
        return (self.arch == "qwen3_moe" and self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_hf(cls, src):
        """Build from an HF config: a dict, a config.json path, or a checkpoint directory.
        What it cannot build is a ValueError naming the config.json it read."""
        where = ""
        if not isinstance(src, dict):
            path = os.path.join(src, "config.json") if os.path.isdir(src) else src
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no config.json")
            with open(path) as f:
                try:
                    src = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
            where = f"{path}: "
        d = dict(src)
        archs = d.get("architectures") or []
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHS:
            raise ValueError(f"{where}unsupported architectures={archs!r}; supported: {sorted(SUPPORTED_ARCHS)}")
        arch = SUPPORTED_ARCHS[archs[0]]
        # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta + rope_scaling
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE:
            raise ValueError(f"{where}unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE}")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if d.get("use_sliding_window"):
            raise ValueError(f"{where}unsupported: use_sliding_window=true (sliding-window attention)")
        if d.get("mlp_bias"):
            raise ValueError(f"{where}unsupported: mlp_bias=true")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}unsupported hidden_act={d['hidden_act']!r}; only silu (SwiGLU)")
        n_heads = d["num_attention_heads"]
        cfg = cls(
            arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size", 0), num_layers=d["num_hidden_layers"],
            num_heads=n_heads, num_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", arch != "qwen3_moe"),
            attention_bias=d.get("attention_bias", False),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"))
        if arch == "qwen3_moe":
            cfg.num_experts = d.get("num_experts", d.get("num_local_experts", 0))
            cfg.num_experts_per_tok = d["num_experts_per_tok"]
            cfg.moe_intermediate_size = d["moe_intermediate_size"]
            cfg.norm_topk_prob = d.get("norm_topk_prob", False)
            cfg.decoder_sparse_step = d.get("decoder_sparse_step", 1)
            cfg.mlp_only_layers = list(d.get("mlp_only_layers") or [])
            cfg.router_aux_loss_coef = d.get("router_aux_loss_coef", 0.001)
        cfg.extra = d
        return cfg

    def to_hf(self):
        """The HF config.json dict; keys we do not interpret are passed through from `extra`."""
        name = {v: k for k, v in SUPPORTED_ARCHS.items()}[self.arch]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        d = dict(self.extra)
        d.pop("rope_scaling", None)
        d.update(architectures=[name], model_type=self.arch, vocab_size=self.vocab_size,
                 hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                 num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
                 hidden_act="silu", rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                 rope_parameters=rope, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
                 bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                 pad_token_id=self.pad_token_id)
        if self.arch == "qwen3_moe":
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                     mlp_only_layers=self.mlp_only_layers,
                     router_aux_loss_coef=self.router_aux_loss_coef)
            d.pop("num_local_experts", None)
        return d

# -----------------------------------------------------------------------------
# RoPE

def rope_inv_freq(cfg):
    """inv_freq_i = 1 / theta^(2i/d), rescaled for 'linear' / 'llama3' RoPE scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling or {}
    if s.get("rope_type") == "linear":  # positions / factor == inv_freq / factor
        inv = inv / s["factor"]
    elif s.get("rope_type") == "llama3":  # Llama 3.1: slow down only the low frequencies
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif s.get("rope_type") == "yarn":
        return yarn_inv_freq(cfg)
    return inv.float()


def yarn_inv_freq(cfg):
    """
    YaRN (Peng et al. 2023, arXiv:2309.00071), as transformers computes it (in fp32, its order):
    per frequency, blend the interpolated inv_freq / factor and the original inv_freq with a
    ramp over the dimensions: dimensions that turn fewer than beta_slow times over the original
    context are interpolated, more than beta_fast times kept, linear in between. Qwen3's
    40,960-position checkpoints reach 131,072 with {"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 32768}. The attention factor is rope_attention_scale's.
    """
    s, d, base = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta
    factor = s.get("factor") or cfg.max_position_embeddings / s["original_max_position_embeddings"]
    old_ctx = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations):  # the dimension that turns `rotations` times over old_ctx positions
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))
    lo, hi = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    keep = 1 - ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    return 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


def rope_attention_scale(cfg):
    """YaRN's attention factor (cos and sin are multiplied by it: attention logits by its square),
    0.1 ln(factor) + 1 unless the config gives it; 1 for every other RoPE."""
    s = cfg.rope_scaling or {}
    if s.get("rope_type") != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor = s.get("factor") or cfg.max_position_embeddings / s["original_max_position_embeddings"]

    def mscale(m=1):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(mscale(s["mscale"]) / mscale(s["mscale_all_dim"]))
    return mscale()


def rope_cos_sin(inv_freq, positions, dtype, scale=1.0):
    """
    cos/sin for per-row positions [B, T] -> [B, T, 1, head_dim] (broadcast over heads),
    computed in fp32, times `scale` (YaRN's attention factor; 1 otherwise). The first half of
    sin is negated: rotate_half(x) * sin becomes cat(x2, x1) * sin, one op fewer per call
    (negation is exact, so the values are HF's).
    """
    freqs = positions[..., None].float() * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    sin[..., : freqs.shape[-1]].neg_()
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x, cos, sin):
    """x: [B, T, H, d]. Rotates the two halves of each head (HF's rotate_half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)

# -----------------------------------------------------------------------------
# Layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps):
    """
    weight * x / rms(x) over the last dim: normalised in fp32, cast back, then the weight (the
    order transformers uses). One F.rms_norm call in fp32; `weight` may also be [..., d]
    (per-head weights stacked, see Attention).
    """
    if x.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=b)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        # {"qkv": transposed(...), "o": transposed(...), "qk_norm": [nh + nkv, d]} inside inference_weights()
        self.wt = None

    def forward(self, x, cos, sin, cache=None, layer=0, positions=None, mask=None):
        B, T, _ = x.shape
        if self.wt is None:
            q = self.q_proj(x).view(B, T, self.nh, self.hd)
            k = self.k_proj(x).view(B, T, self.nkv, self.hd)
            v = self.v_proj(x).view(B, T, self.nkv, self.hd)
            if hasattr(self, "q_norm"):  # Qwen3: per-head norm *before* RoPE
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, T, H, d]
        else:  # the inference snapshot: q, k, v from one matmul; q and k normed and rotated
            # together (the same ops per head, half the calls: decoding is call-bound)
            qkv = linear_t(x, self.wt["qkv"]).view(B, T, self.nh + 2 * self.nkv, self.hd)
            qk, v = qkv.split([self.nh + self.nkv, self.nkv], dim=2)
            if hasattr(self, "q_norm"):
                qk = rms_norm(qk, self.wt["qk_norm"], self.q_norm.eps)
            q, k = apply_rope(qk, cos, sin).split([self.nh, self.nkv], dim=2)
        if cache is not None:  # write this step's keys/values at each row's own positions
            kc, vc = cache.update(layer, k, v, positions)  # the filled prefix, [B, nkv, used, d]
        if mask is not None:  # decoding: attend to the cache (slots 0..p of its row for position p)
            y = cached_attention(q.transpose(1, 2), kc, vc, mask)
        else:  # causal over this call's own keys: training, or a prefill into an empty cache
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
            if flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
                y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    causal=True).transpose(1, 2)
            else:
                y = sdpa(q, k, v, causal=True)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return linear_t(y, self.wt["o"]) if self.wt is not None else self.o_proj(y)


def sdpa(q, k, v, mask=None, causal=False):
    """Scaled dot-product attention with grouped KV heads (GQA)."""
    if k.shape[1] != q.shape[1]:  # repeat KV heads; cheaper than enable_gqa on older torch
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


def cached_attention(q, k, v, mask):
    """
    q [B, nh, T, d] against the cache's k, v [B, nkv, S, d] under an additive mask [B, 1, T, S].
    GQA without copying the cache: the rep = nh / nkv query heads that share a KV head are
    folded into the query length ([B, nkv, rep*T, d]), so K/V are read in place; repeating
    them would copy the whole cache every decode step.
    """
    B, nh, T, d = q.shape
    rep = nh // k.shape[1]
    if rep > 1:
        q = q.reshape(B, k.shape[1], rep * T, d)  # query row r*T + t is (head r of the group, t)
        mask = mask.repeat(1, 1, rep, 1) if T > 1 else mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # reshape, not view: CUDA's memory-efficient SDPA (the one that takes a float mask) may
    # return a non-contiguous output, which view() refuses (tests/test_model.py fakes one)
    return y.reshape(B, nh, T, d)


def transposed(*linears, rows=0):
    """nn.Linear layers stacked along the output, for inference: (W^T, b, None), W^T one [in, out]
    contiguous matrix; or, where prepack can pack them for a decode batch of `rows` rows,
    (W, b, packed) with W the [out, in] stack (what a call with other row counts uses: a prefill,
    or fewer rows left) and packed MKL's layout of it. No [in, out] copy then: its strided
    transposing copy was most of the snapshot's cost (SmolLM2-135M: ~0.2 s per generate call)."""
    b = None if linears[0].bias is None else torch.cat([l.bias for l in linears])
    packed = prepack([l.weight for l in linears], rows, bias=b is not None)
    if packed is not None:
        return packed[2], b, packed[:2]
    return torch.cat([l.weight.t() for l in linears], dim=1), b, None  # one copy, contiguous


def prepack(weights, rows, bias=False):
    """
    Linear layers' weights [out, in], stacked along the output (as transposed() stacks them), in
    MKL's own blocked layout for an sgemm with exactly `rows` rows (a decode step's batch):
    (packed, rows, the stacked [out, in] weight), or None. An sgemm with a few rows copies
    ("packs") the whole weight into that layout on every call before it multiplies; at 16 rows
    that is most of the call, since the weight streams from memory twice over (SmolLM2-135M at
    16 rows: the 30 layers' matmuls 45 -> 30 ms a decode step, its [576 x 49,152] head 10.3 ->
    7.7 ms; README "Benchmarks: sampling"). Packing once per generate() call removes it. The
    arithmetic is the same sgemm's (fp32 products summed in MKL's order): on the shapes tested
    it gives the very bits of x @ W^T except where the inner dimension is long (>= ~1,024),
    where the order of the partial sums can differ: fp32 rounding, like a change of thread
    count. CPU fp32 with MKL only (torch.ops.mkl is what inductor uses for the same thing).
    Where decode_gemm measured W @ x^T faster and bit-equal for this shape, nothing is packed:
    (None, rows, W), and packed_linear computes w_xt. bias: whether a bias will be added (the
    measurement includes it).
    """
    w = weights[0]
    if rows < 2 or w.device.type != "cpu" or w.dtype != torch.float32 or not torch._C.has_mkl:
        return None
    w = torch.cat(weights) if len(weights) > 1 else w.contiguous()
    form = DECODE_GEMM if DECODE_GEMM != "auto" else decode_gemm(rows, *w.shape, bias, torch.get_num_threads())
    if form == "w_xt":  # nothing to pack: W @ x^T reads W as it is
        return None, rows, w
    return torch.ops.mkl._mkl_reorder_linear_weight(w, rows), rows, w


def packed_linear(x, packed, w, b=None):
    """x @ w^T + b from prepack's (packed, rows) when x has exactly those rows, else None.
    w: the [out, in] weight it was packed from (the op reads its shape). packed (None, rows):
    decode_gemm chose W @ x^T for this shape."""
    if packed is None or x.numel() != packed[1] * x.shape[-1]:
        return None
    if packed[0] is None:
        return w_xt(x, w, b)
    if torch.compiler.is_compiling():  # an opaque op to inductor (below)
        return mkl_linear(x, packed[0], w, b, packed[1])
    return torch.ops.mkl._mkl_linear(x, packed[0], w, b, packed[1])


W_XT_BLOCK = 4096  # w_xt's output features per GEMM call


def w_xt(x, w, b=None, block=None):
    """x @ w^T + b computed as (W @ x^T)^T: the GEMM with the weight as its tall left operand
    and the few rows as its narrow right one, transposed back into a contiguous [.., out], by
    blocks of `block` output features, so that each block's [block, rows] result is still in
    cache when it is transposed (a whole lm_head's [151,936 x 16] transposed at once cost ~7
    ms, a third of the GEMM's time, on the EPYC)."""
    block = block or W_XT_BLOCK
    xt = x.reshape(-1, x.shape[-1]).t()
    y = x.new_empty(xt.shape[1], w.shape[0])
    for a in range(0, w.shape[0], block):
        wb = w[a:a + block]
        y[:, a:a + block] = (torch.mm(wb, xt) if b is None else torch.addmm(b[a:a + block, None], wb, xt)).t()
    return y.view(*x.shape[:-1], w.shape[0])


DECODE_GEMM = "auto"  # "auto": decode_gemm decides per shape; "packed" / "w_xt" force one (tests)


@functools.cache
def decode_gemm(rows, out_features, in_features, bias=False, threads=None):
    """
    Which fp32 GEMM a decode step runs for x [rows, in] @ W^T, W [out, in]: "packed" (MKL's
    sgemm from the prepacked weight) or "w_xt" (W @ x^T, transposed back: w_xt). Which is
    faster depends on the CPU and the shape: on an AMD EPYC VM W @ x^T ran up to 1.5x faster
    for lm_heads at 16 rows (SmolLM2's [576 x 49,152]: 15.5 vs 20.6 ms) and within ~10% either
    way on the tiny model's layers, while on an Intel VM the packed sgemm was the faster head.
    So it is measured, once per shape and thread count in a process, on random inputs of that
    shape, and "w_xt" is chosen only where the two give the very same bits there (the same
    products summed in the same order: a GEMM's order depends on the shapes, the layout and
    the threads, not on the numbers), so that the choice, which timing makes, can never change
    a token. Where they differ (on the EPYC: 1-7 rows) the packed sgemm stays. It costs 14
    calls of each form per shape, once (a few tenths of a second for a 152k-token lm_head).
    threads: only a key of the cache (MKL splits the work by torch's thread count).
    """
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    forms = {"packed": lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, rows), "w_xt": lambda: w_xt(x, w, b)}
    if not torch.equal(forms["packed"](), forms["w_xt"]()):
        return "packed"
    best = dict.fromkeys(forms, float("inf"))
    for _ in range(7):  # alternating, and the best of each: a drifting load or a spike hits both alike
        for k, f in forms.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return min(forms, key=best.get)


@torch.library.custom_op("mopd::mkl_linear", mutates_args=())
def mkl_linear(x: torch.Tensor, packed: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
               rows: int) -> torch.Tensor:
    """MKL's packed linear as a custom op, for a decode step under torch.compile
    (rollout.generate(compile=True)): inductor has a lowering of its own for
    torch.ops.mkl._mkl_linear, for weights it packed itself, and it fails (an AssertionError)
    on ours; as an op it cannot look into, it calls it as it is."""
    return torch.ops.mkl._mkl_linear(x, packed, w, b, rows)


@mkl_linear.register_fake
def _(x, packed, w, b, rows):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def linear_t(x, wt_b):
    """x @ W^T + b from a triple made by transposed(): from the prepacked weight when x has the
    rows it was packed for (a decode step), else from W [out, in] (F.linear), or from W^T where
    nothing was packed."""
    w, b, packed = wt_b
    if packed is None:
        return x @ w if b is None else torch.addmm(b, x.flatten(0, -2), w).view(*x.shape[:-1], -1)
    y = packed_linear(x, packed, w, b)
    return F.linear(x, w, b) if y is None else y


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.wt = None  # {"gate_up": transposed(...), "down": transposed(...)} inside inference_weights()

    def forward(self, x):
        if self.wt is not None:  # one matmul for gate and up (see Transformer.inference_weights)
            gate, up = linear_t(x, self.wt["gate_up"]).chunk(2, dim=-1)
            return linear_t(F.silu(gate) * up, self.wt["down"])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """
    Qwen3-MoE sparse block: router softmax in fp32 over all experts, *then* top-k,
    optionally renormalise the k weights (norm_topk_prob), weighted sum of SwiGLU experts.

    Expert weights are stacked ([E, I, H] / [E, H, I]) so the block is one parameter per
    projection (what FSDP shards and a grouped matmul consumes). Compute: sort the
    (token, expert) assignments by expert, then either one grouped matmul per projection
    over all experts at once (torch's F.grouped_mm, on CUDA in bf16 where torch has it:
    128 experts in one kernel launch, not 128), or one dense SwiGLU per expert that received
    tokens — a Python loop over *active experts*, never over tokens (CPU, fp32, older torch;
    F.grouped_mm's CPU path has no backward). Both see the same sorted rows and give the
    same result; routing is this one function for sampling and training alike.
    """
    grouped = "auto"  # "auto": grouped matmul where supported; True / False force it (tests)
    def __init__(self, cfg):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.E, self.k, self.norm_topk = E, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(H, E, bias=False)  # the router
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.aux_loss = None  # load-balancing loss of the last forward (for training)

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(-1, H)
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [N, E] fp32
        topw, topi = probs.topk(self.k, dim=-1)  # [N, k]
        if self.norm_topk:
            topw = topw / topw.sum(-1, keepdim=True)
        topw = topw.to(x.dtype)
        # Switch-style load balancing: E * sum_e (fraction of assignments to e) * (mean prob of e)
        frac = torch.zeros(self.E, device=x.device).index_add_(
            0, topi.flatten(), torch.ones(topi.numel(), device=x.device)) / topi.numel()
        self.aux_loss = self.E * (frac * probs.mean(0)).sum()
        # group (token, expert) pairs by expert
        flat_e = topi.flatten()
        order = flat_e.argsort(stable=True)
        tok = order // self.k  # which token each sorted assignment came from
        counts = torch.bincount(flat_e, minlength=self.E)
        w = topw.flatten()[order, None]  # each sorted assignment's routing weight
        out = torch.zeros_like(x)
        if self.use_grouped(x):
            # rows [offs[e-1], offs[e]) of the sorted tokens go through expert e
            offs = counts.cumsum(0).to(torch.int32)
            xs = x[tok]
            h = F.silu(F.grouped_mm(xs, self.gate_proj.transpose(-2, -1), offs=offs)) * \
                F.grouped_mm(xs, self.up_proj.transpose(-2, -1), offs=offs)
            out.index_add_(0, tok, F.grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offs) * w)
            return out.view(B, T, H)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            idx = tok[start:start + c]
            xe = x[idx]
            he = F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())
            out.index_add_(0, idx, (he @ self.down_proj[e].t()) * w[start:start + c])
            start += c
        return out.view(B, T, H)

    def use_grouped(self, x):
        if self.grouped != "auto":
            return self.grouped
        return hasattr(F, "grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16


class Block(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, **kw):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **kw)
        return x + self.mlp(self.post_attention_layernorm(x))

# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """
    Preallocated keys/values, one [rows, kv_heads, max_len, head_dim] tensor per layer, plus
    `lengths`: how many slots of each row are filled. Row b's token at position p lives in slot
    p, so positions are per row and right padding in a prompt batch is harmless (a padded slot
    is overwritten by that row's next real token before anything attends to it). Head-major,
    as attention reads it ([B, H, S, d]): each (row, head)'s filled keys are one contiguous
    block. Slot-major ([B, S, H, d], one write per token contiguous instead) gave bit-identical
    attention but a decode step's SDPA 1.3-1.5x slower on an AMD EPYC (strided reads: 1.79 vs
    1.23 ms at 64 rows x 100 slots). A tensor per layer, not one for all: under torch.compile a
    write into a view of one big tensor made inductor copy the whole cache out and back at every
    decode step (a compiled generate call on bench_sampling's tiny Qwen3: 4.8 s instead of 1.0 s).
    """
    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        # slots 0..used-1 may be filled in some row; attention reads only those (forward sets
        # it from the positions, or rollout.decode_step as a plain int under torch.compile)
        self.used = 0

    @staticmethod
    def bytes_per_token(cfg, dtype):
        """Keys and values of every layer for one token of one row (what a cache slot costs):
        rollout.cache_chunks, engine.py's CPU KV budget and plan_memory.py size caches with it."""
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8

    def update(self, layer, k, v, positions):
        """k, v [B, T, H, d] go to slots `positions` [B, T] of their rows; returns the filled
        prefix as [B, H, used, d] views."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer].transpose(1, 2)[rows, positions] = k  # (a [B, S, H, d] view: the same memory)
        self.v[layer].transpose(1, 2)[rows, positions] = v
        return self.k[layer][:, :, :self.used], self.v[layer][:, :, :self.used]

    def repeat_rows(self, n):
        """n copies of each row, adjacent (prefill a prompt once, sample n continuations)."""
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        self.lengths = self.lengths.repeat_interleave(n)

    def keep_rows(self, keep):
        """Only the rows where `keep` [B] is True, in order (generate drops finished rows)."""
        self.k, self.v = [k[keep] for k in self.k], [v[keep] for v in self.v]
        self.lengths = self.lengths[keep]

# -----------------------------------------------------------------------------
# The model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # a plain attribute, not a buffer: it is derived from the config, so a model built on
        # the meta device and materialised later never has to restore it from a checkpoint
        self._inv_freq = rope_inv_freq(cfg)
        self._rope_scale = rope_attention_scale(cfg)
        self.source_dir = None  # where from_pretrained read us (tokenizer files are copied on save)
        self.head_packed = None  # the lm_head prepacked for decoding, inside inference_weights(rows)

    @property
    def lm_head_weight(self):
        return self.lm_head.weight

    def is_sharded(self):
        """Whether distributed.shard made this an FSDP2 module: its parameters are DTensor
        shards outside forward, and its forward is a collective."""
        return hasattr(self, "reshard")  # FSDPModule's method, checked without importing FSDP

    def init_weights(self, std=0.02, seed=None):
        """Random init for training from scratch (normal(0, std), norms at 1)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, input_ids, positions=None, cache=None, return_hidden=False):
        """
        input_ids [B, T]; positions [B, T] (default 0..T-1 per row, or each row's cache
        length onwards when a cache is given). Returns logits [B, T, V], or the final
        normed hidden states [B, T, H] when return_hidden (for vocab_kernels.py, which never
        materialises the logits).
        """
        B, T = input_ids.shape
        # a prefill into an empty cache (every row at 0..T-1) attends causally to its own fresh
        # keys: what the cache mask would say, and faster (no mask, no cache read)
        prefill = cache is not None and positions is None and not bool(cache.lengths.any())
        if positions is None:
            start = cache.lengths[:, None] if cache is not None else 0
            positions = start + torch.arange(T, device=input_ids.device)[None, :].expand(B, T)
        x = self.embed_tokens(input_ids)
        inv = self._inv_freq
        if inv.device != x.device:
            inv = self._inv_freq = inv.to(x.device)
        cos, sin = rope_cos_sin(inv, positions, x.dtype, self._rope_scale)
        kw = {}
        if cache is not None:
            if not torch.compiler.is_compiling():  # (rollout.decode_step sets it when compiled:
                cache.used = int(positions.max()) + 1  # .item() would break the graph)
            # a query at position p sees the cache slots 0..p of its own row; as an additive
            # float mask made once per step (SDPA would convert a boolean one in every layer)
            mask = None
            if not prefill:
                slots = torch.arange(cache.used, device=x.device)
                allowed = slots[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
                mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
                mask.masked_fill_(~allowed, float("-inf"))
            kw = dict(cache=cache, positions=positions, mask=mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, layer=i, **kw) if kw else layer(x, cos, sin)
        if cache is not None:
            cache.lengths = positions[:, -1] + 1
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    @contextmanager
    def inference_weights(self, rows=0):
        """
        Inside this block (generate() uses it) the linear layers of every block run, on a
        CPU, from a snapshot of their weights laid out for inference:
        - q/k/v concatenated into one matrix, gate/up into another: fewer, larger matmuls;
        - stored transposed, [in, out] contiguous, which MKL's fp32 GEMM with a few rows
          (decoding has one row per sequence) runs faster than nn.Linear's [out, in].
        Together a decode step measured 3-16% faster here (4 to 64 rows); the lm_head is
        left alone (no faster transposed).
        rows (the decode batch, >= 2; with MKL, fp32): every matrix, the lm_head's included
        (head_packed), is instead prepacked for calls of exactly that many rows (see prepack),
        and kept [out, in] for calls of any other size (stacked copies for q/k/v and gate/up,
        the modules' own weights otherwise): decode steps ~1.2-1.3x faster at 16 rows. Or, per
        shape where decode_gemm finds it faster and bit-equal, multiplied as W @ x^T.
        The snapshot is made on entry and dropped on exit, so it can never go stale when an
        optimizer updates the model between two generate() calls; meanwhile it costs one
        more copy of the weights (packed: the lm_head's too, plus the q/k/v and gate/up
        stacks). Parameters, names and the HF mapping are untouched. No gradient reaches
        the snapshot: inference only. On a GPU this is a no-op (cuBLAS is as
        fast on nn.Linear's layout, and GPU memory is the scarcer resource). Also a no-op on
        a sharded model: outside forward each rank holds only its shards of the weights.
        """
        if self.lm_head.weight.device.type != "cpu" or self.is_sharded():
            yield self
            return
        blocks = [(layer.self_attn, layer.mlp) for layer in self.layers]
        try:
            with torch.no_grad():
                for attn, mlp in blocks:
                    attn.wt = {"qkv": transposed(attn.q_proj, attn.k_proj, attn.v_proj, rows=rows),
                               "o": transposed(attn.o_proj, rows=rows)}
                    if hasattr(attn, "q_norm"):  # one weight row per q head, then per k head
                        attn.wt["qk_norm"] = torch.cat([attn.q_norm.weight.expand(attn.nh, -1),
                                                        attn.k_norm.weight.expand(attn.nkv, -1)])
                    if isinstance(mlp, MLP):  # MoE experts keep their own loop
                        mlp.wt = {"gate_up": transposed(mlp.gate_proj, mlp.up_proj, rows=rows),
                                  "down": transposed(mlp.down_proj, rows=rows)}
                head = prepack([self.lm_head.weight], rows)
                self.head_packed = None if head is None else head[:2]
            yield self
        finally:
            self.head_packed = None
            for attn, mlp in blocks:
                attn.wt = mlp.wt = None

    def router_aux_loss(self):
        """Sum of the MoE load-balancing losses of the last forward, times the config's coef."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        if not losses:
            return torch.zeros(())
        return self.config.router_aux_loss_coef * torch.stack(losses).sum()

    # ---- Hugging Face checkpoints ---------------------------------------------------------

    def _hf_layout(self, keep_vars=False):
        """[(our name, tensor, [(hf key, expert index or None)])] in state_dict order; a tied
        lm_head is left out (HF stores it once, as the embedding)."""
        return [(n, t, _expert_keys(n, t.shape[0] if t.dim() == 3 else 0))
                for n, t in self.state_dict(keep_vars=keep_vars).items()
                if not (n == "lm_head.weight" and self.config.tie_word_embeddings)]

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", shard_fn=None):
        """Load an HF directory (checkpoint.load_pretrained: built on the meta device, each tensor
        read straight from its file; with shard_fn each rank reads only its own slices)."""
        return checkpoint.load_pretrained(cls, path, dtype=dtype, device=device, shard_fn=shard_fn)

    def load_hf_weights(self, path, dtype=torch.float32, device="cpu", only=None):
        """Fill this model's parameters (or those named in `only`) from an HF directory
        (checkpoint.load_hf_weights; works on a meta-device or sharded model)."""
        return checkpoint.load_hf_weights(self, path, dtype=dtype, device=device, only=only)

    def save_pretrained(self, path, tokenizer_dir=None, max_shard_bytes=5 * 2**30):
        """Write an HF directory that transformers loads, atomically (checkpoint.save_pretrained;
        a collective on a sharded model). Returns its absolute path."""
        return checkpoint.save_pretrained(self, path, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes)


def _expert_keys(name, num_experts):
    """Our parameter name -> [(hf key, expert index or None)]."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        if num_experts and name.endswith(f"mlp.{proj}"):
            base = name[: -len(proj)]
            return [(f"model.{base}experts.{e}.{proj}.weight", e) for e in range(num_experts)]
    return [(name if name == "lm_head.weight" else "model." + name, None)]


def num_params(model, exclude_embedding=False):
    n = sum(p.numel() for p in model.parameters())
    return n - model.embed_tokens.weight.numel() if exclude_embedding else n
