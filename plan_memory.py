"""
Per-GPU memory plan and projected throughput of a MOPD run (student + teachers) under FSDP2.

    python plan_memory.py                                   # the 8xH100 Qwen3-30B-A3B preset
    python plan_memory.py --dry_run=true                    # ...and check it against a real (meta) sharding
    python plan_memory.py --config=ckpt/config.json --world_size=16 --seq_len=65536

What is in this file, top to bottom:
- Config: every knob, defaults = the chosen preset (Qwen3-30B-A3B student + 3 same-size
  teachers on 8 H100s, the paper's batch shape: 2048 prompts x 1 rollout, up to 64k tokens
  per sequence, one 64k-token micro-batch per GPU).
- param_shapes() / param_counts(): every parameter's shape straight from the HF config, hence
  the total, the padded dim-0 shard each rank stores, per FSDP unit, experts, active per token.
- layer_activation_bytes(): the bytes one decoder layer saves for backward per token, written
  out tensor by tensor for model.py's Block (tests check it against autograd's saved tensors).
- plan(): one row per memory item, its formula, bytes, host or GPU, and the phases it is
  alive in (R = rollout, S = teacher scoring, T = training); the peak phase is the total.
- throughput(): seconds per step from FLOPs (compute-bound phases) and bytes (decode), and the
  same model applied to NeMo-RL's published Qwen3-30B-A3B GRPO run to calibrate it.
- dry_run(): builds student and teachers on the meta device, shards them with
  distributed.shard over torch's fake process group of world_size ranks, takes one AdamW step
  on meta, and counts the bytes rank 0 owns. Nothing real is allocated.

The one non-negotiable fact behind the plan: FSDP2 keeps the *sharded* parameters in their own
dtype (fp32 here: they are the optimizer's master weights) and casts to bf16 only when it
all-gathers a layer, so the student costs 4 (params) + 4 (grads) + 8 (AdamW) = 16 bytes per
parameter / world_size, and each frozen bf16 teacher 2 bytes per parameter / world_size.
"""

import dataclasses
import math
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from config import cli, parse_config
from model import KVCache, ModelConfig

GiB = 2**30

# Qwen/Qwen3-30B-A3B config.json (the fields model.py reads)
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 40960, "attention_bias": False,
}
MODELS = {"qwen3-30b-a3b": QWEN3_30B_A3B}

# NeMo-RL v0.4 performance summary (docs/about/performance-summary.md): GRPO, Qwen3-30B-A3B,
# on-policy, DGX-H100, BF16, 32 GPUs, 2048 rollouts/step, max 4096 tokens, mean 3154 tokens,
# vLLM TP4 generation, Megatron TP2/EP8 training: 925 tokens/s/GPU, 225 s per step.
NEMO_RL = dict(gpus=32, rollouts=2048, seq_len=4096, mean_len=3154, tokens_per_s_gpu=925, step_s=225,
               generation_tp=4)


@dataclass
class Config:
    # Model
    model: str = "qwen3-30b-a3b"      # a built-in config (MODELS)
    config: str = ""                  # or an HF config.json / checkpoint dir (overrides --model)
    teachers: int = 3                 # same-origin teachers: the student's architecture
    # Parallelism and batch shape
    world_size: int = 8               # GPUs; FSDP over all of them
    prompts_per_step: int = 2048      # the paper's Stage 3
    rollouts: int = 1                 # per prompt (the paper: 1)
    seq_len: int = 65536              # max prompt + response tokens (paper: 32k Math/IF, 64k SWE)
    micro_batch: int = 1              # training micro-batch per GPU = micro_batch*seq_len tokens
                                      # (one 64k SWE sequence, or shorter ones packed; never split)
    prompt_mean: int = 1024           # mean prompt tokens   (assumed: not published)
    response_mean: int = 8192         # mean response tokens (assumed: not published)
    # Rollouts
    rollout_engine: str = "vllm"      # vllm: an in-process vLLM engine per engine_tp GPUs, synced every step
                                      # (engine.py); native: rollout.py on the model FSDP shards
    engine_tp: int = 4                # GPUs per vLLM engine (tensor parallel; its KV heads shard too)
    # Memory choices
    optimizer_offload: bool = True    # student fp32 params + grads + AdamW in host memory (CPUOffloadPolicy)
    teacher_offload: bool = False     # teachers' bf16 shards in host memory, streamed in layer by layer
    activation_checkpointing: bool = True
    kv_gib: float = 0.0               # KV cache per GPU for rollouts; 0 = what the rollout phase leaves
    reserve_gib: float = 3.0          # CUDA context, NCCL buffers, allocator fragmentation (assumed)
    gpu_gib: float = 75.0             # the budget per GPU
    # Hardware (H100 SXM) and efficiency assumptions
    peak_tflops: float = 989.0        # dense bf16
    mfu: float = 0.35                 # fraction of peak reached by prefill / training matmuls (assumed)
    hbm_tbps: float = 3.35
    hbm_eff: float = 0.7              # fraction of HBM bandwidth reached by decoding (assumed)
    pcie_gbps: float = 25.0           # host<->GPU per GPU, all 8 copying at once (assumed)
    nvlink_gbps: float = 150.0        # effective NVLink rate of collectives: FSDP, MoE all-to-all (assumed)
    host_gbps: float = 20.0           # host memory traffic per rank: CPU AdamW, grad accumulation (assumed)
    # Mode
    dry_run: bool = False             # also build + shard on meta over a fake world_size-rank group


# refused as soon as the command line is read (config.check)
LIMITS = {">= 0": "teachers kv_gib reserve_gib",
          ">= 1": "world_size prompts_per_step rollouts seq_len micro_batch prompt_mean response_mean engine_tp",
          "one of vllm native": "rollout_engine",
          "> 0": "gpu_gib peak_tflops hbm_tbps pcie_gbps nvlink_gbps host_gbps",
          "in (0, 1]": "mfu hbm_eff",
          "exists": "config"}


def model_config(cfg):
    if not cfg.config and cfg.model not in MODELS:
        raise ValueError(f"--model={cfg.model}: unknown; built in: {', '.join(MODELS)} (or --config=PATH)")
    return ModelConfig.from_hf(cfg.config if cfg.config else MODELS[cfg.model])

# -----------------------------------------------------------------------------
# Counting parameters and activations from the config

def param_shapes(mc):
    """{FSDP unit: [parameter shapes]} of model.py's Transformer, from the config alone:
    'layers.i' per decoder layer, 'root' = embeddings + final norm (+ lm_head when untied)."""
    H, V, hd = mc.hidden_size, mc.vocab_size, mc.head_dim
    q, kv = mc.num_heads * hd, mc.num_kv_heads * hd
    units = {}
    for i in range(mc.num_layers):
        s = [(H,), (H,), (q, H), (kv, H), (kv, H), (H, q)]  # 2 norms, q/k/v/o
        s += [(q,), (kv,), (kv,), (H,)] if mc.attention_bias else []
        s += [(hd,), (hd,)] if mc.qk_norm else []
        if mc.is_moe_layer(i):  # router, then the stacked experts
            E, I = mc.num_experts, mc.moe_intermediate_size
            s += [(E, H), (E, I, H), (E, I, H), (E, H, I)]
        else:
            s += [(mc.intermediate_size, H)] * 2 + [(H, mc.intermediate_size)]
        units[f"layers.{i}"] = s
    units["root"] = [(V, H), (H,)] + ([] if mc.tie_word_embeddings else [(V, H)])
    return units


def shard_numel(shapes, W):
    """Elements each rank stores: FSDP2 cuts dim 0 into W chunks padded to ceil(dim0 / W) rows."""
    return sum(math.ceil(s[0] / W) * math.prod(s[1:]) for s in shapes)


def param_counts(mc, W=1):
    """Parameter counts (no model is built): total, per rank (padded shards), the largest FSDP
    unit, the root, the experts, and the weights one token uses (active)."""
    units = param_shapes(mc)
    n = {u: sum(math.prod(s) for s in shapes) for u, shapes in units.items()}
    expert_shapes = [s for shapes in units.values() for s in shapes if len(s) == 3]
    experts = sum(math.prod(s) for s in expert_shapes)
    k_over_e = mc.num_experts_per_tok / mc.num_experts if mc.num_experts else 0
    total = sum(n.values())
    return dict(total=total, shard=sum(shard_numel(s, W) for s in units.values()),
                tensor_max=max(math.prod(s) for shapes in units.values() for s in shapes),
                layer_max=max(v for u, v in n.items() if u != "root"), root=n["root"],
                head=mc.vocab_size * mc.hidden_size, experts=experts,
                experts_shard=shard_numel(expert_shapes, W),
                # per token: every weight but the embedding lookup and the experts it is not routed to
                active=total - mc.vocab_size * mc.hidden_size * (0 if mc.tie_word_embeddings else 1)
                - experts * (1 - k_over_e))


def layer_activation_bytes(mc, i=None, kv_repeat=False):
    """
    Bytes per token that one decoder layer keeps for backward in bf16 training (model.py's
    Block; fp32 where model.py computes in fp32). kv_repeat: the SDPA path, which repeats K/V
    to all heads (CPU, or CUDA without flash-attn); False = flash-attn (GQA-native).
      RMSNorm (each of 2):   fp32 input copy 4H + rstd 4 + normed 2H + normed*weight 2H
      q/k norm (per head):   4d + 4 + 2d  over (nh + nkv) heads
      attention core:        q 2*nh*d + k,v 2*2*nkv*d + out 2*nh*d + logsumexp 4*nh
      MoE, per token:        router probs 4E, top-k ids 8k, weights 4k + 4; per assignment (k):
                             gathered x 2H, gate/up/silu 3*2I, he 2I, down out 2H, weighted out 2H
                             (index_add keeps it), 3 int64 indices, the weight 2
      dense SwiGLU:          gate, up, silu, product 4*2I
    """
    H, d, nh, nkv = mc.hidden_size, mc.head_dim, mc.num_heads, mc.num_kv_heads
    norms = 2 * (8 * H + 4) + ((nh + nkv) * (6 * d + 4) if mc.qk_norm else 0)
    core = 2 * nh * d + 2 * 2 * (nh if kv_repeat else nkv) * d + 2 * nh * d + 4 * nh
    if mc.is_moe_layer(mc.num_layers - 1 if i is None else i):
        E, k, I = mc.num_experts, mc.num_experts_per_tok, mc.moe_intermediate_size
        mlp = 4 * E + 8 * k + 4 * k + 4 + k * (6 * H + 8 * I + 2 * 8 + 2)
    else:
        mlp = 8 * mc.intermediate_size
    return norms + core + mlp


def kv_bytes_per_token(mc):
    return KVCache.bytes_per_token(mc, torch.bfloat16)  # K and V of every layer, bf16 (the engines' dtype)

# -----------------------------------------------------------------------------
# The plan: one row per item

@dataclass
class Row:
    key: str      # short name (the dry run compares by it)
    item: str
    formula: str
    bytes: float
    where: str    # "gpu" or "host"
    phases: str   # subset of "RST": rollout, teacher scoring, training


def plan(cfg, mc=None):
    mc = mc or model_config(cfg)
    W, H, V, L = cfg.world_size, mc.hidden_size, mc.vocab_size, mc.num_layers
    pc = param_counts(mc, W)
    N, Nr = pc["total"], pc["shard"]  # Nr: elements per rank, ~N/W (dim-0 chunks padded)
    T_mb = cfg.micro_batch * cfg.seq_len  # tokens in one training (and teacher-scoring) micro-batch
    a = layer_activation_bytes(mc)
    opt_at = "host" if cfg.optimizer_offload else "gpu"
    t_at = "host" if cfg.teacher_offload else "gpu"
    chunk = 256 * 2**20  # kernels.DEFAULT_MEM_BUDGET: the [chunk x V] logits of one call
    rows = [
        Row("params", "student params (fp32 master shard)", "4*Nr", 4 * Nr, opt_at, "RST"),
        Row("grads", "student grads (fp32 shard)", "4*Nr", 4 * Nr, opt_at, "T"),
        Row("adam", "AdamW exp_avg + exp_avg_sq (fp32 shard)", "8*Nr", 8 * Nr, opt_at, "RST"),
        Row("teachers", f"{cfg.teachers} teachers (bf16 shards)", "teachers*2*Nr", cfg.teachers * 2 * Nr, t_at, "RST"),
        Row("gather", "FSDP all-gather: 2 layers + root (bf16)", "2*2*P_layer + 2*P_root",
            2 * 2 * pc["layer_max"] + 2 * pc["root"], "gpu", "ST"),
        Row("reduce", "FSDP reduce-scatter: bf16 grads + fp32 copy", "max(6*P_root, 2*P_head + 6*P_layer)",
            max(6 * pc["root"], 2 * pc["head"] + 6 * pc["layer_max"]), "gpu", "T"),
    ]
    if cfg.optimizer_offload:  # fp32 shards of the current + next layer copied in, one grad shard out
        rows.append(Row("staging", "offload staging (fp32 shards in/out)", "3*4*P_layer/W",
                        3 * 4 * pc["layer_max"] / W, "gpu", "T"))
    if cfg.activation_checkpointing:
        rows.append(Row("act", "activations, checkpointed (train)", f"T_mb*(L*2H + 1.5*a), a={a/1024:.0f} KiB",
                        T_mb * (L * 2 * H + 1.5 * a), "gpu", "T"))
    else:
        rows.append(Row("act", "activations, all layers saved (train)", f"T_mb*(L + 0.5)*a, a={a/1024:.0f} KiB",
                        T_mb * (L + 0.5) * a, "gpu", "T"))
    rows += [
        Row("head", "fused lm_head kernel (train)", "10*V*H + 4*H*T_mb + chunk", 10 * V * H + 4 * H * T_mb + chunk,
            "gpu", "T"),
        Row("prefill", "teacher prefill, one micro-batch", "a*T_mb + 4*H*T_mb + 4*V*H + chunk",
            a * T_mb + 4 * H * T_mb + 4 * V * H + chunk, "gpu", "S"),
    ]
    if cfg.rollout_engine == "vllm":  # asleep (level 2: weights and KV freed) outside the rollout phase
        t = cfg.engine_tp
        rows += [
            Row("rollout", f"vLLM engine weights (bf16, TP={t})", "2*N/engine_tp", 2 * N / t, "gpu", "R"),
            Row("sync", "weight sync: one gathered fp32 tensor + bf16", "6*P_tensor_max", 6 * pc["tensor_max"],
                "gpu", "R"),
        ]
    else:  # the sharded student samples: every decode step all-gathers each layer again
        rows.append(Row("rollout", "native: FSDP gathers 2 layers + root (bf16)", "2*2*P_layer + 2*P_root",
                        2 * 2 * pc["layer_max"] + 2 * pc["root"], "gpu", "R"))
    rows += [
        Row("workspace", "decode workspace (logits, sampling)", "1 GiB (assumed)", 1 * GiB, "gpu", "R"),
        Row("reserve", "reserve: CUDA ctx, NCCL, fragmentation", f"{cfg.reserve_gib:g} GiB (assumed)",
            cfg.reserve_gib * GiB, "gpu", "RST"),
    ]
    kv_tok = kv_bytes_per_token(mc)
    if cfg.kv_gib > 0:
        kv, how = cfg.kv_gib * GiB, "--kv_gib"
    else:  # what the rollout phase leaves under the budget, minus 2 GiB (vLLM's gpu_memory_utilization)
        kv, how = max(0.0, (cfg.gpu_gib - 2) * GiB - phase_total(rows, "R")), "fills R to budget-2"
    per = f"{kv_tok // 1024} KiB/token" + (f" / TP {cfg.engine_tp}" if cfg.rollout_engine == "vllm" else "")
    rows.append(Row("kv", "KV cache for rollouts" + (" (paged)" if cfg.rollout_engine == "vllm" else ""),
                    f"{how}; {per}", kv, "gpu", "R"))
    return rows


def engine_gpus(cfg):
    """GPUs that share one sampler's weights and KV cache: the engine's TP size, or 1 (native)."""
    return cfg.engine_tp if cfg.rollout_engine == "vllm" else 1


def phase_total(rows, phase):
    return sum(r.bytes for r in rows if r.where == "gpu" and phase in r.phases)


def summarize(cfg, rows, mc):
    """Totals per phase, the peak, host memory and decode rows."""
    phases = {p: phase_total(rows, p) for p in "RST"}
    peak_phase = max(phases, key=phases.get)
    host = sum(r.bytes for r in rows if r.where == "host")
    kv = next(r.bytes for r in rows if r.key == "kv")
    kv_tok = kv_bytes_per_token(mc) / engine_gpus(cfg)  # per GPU: a TP engine shards its KV heads
    return dict(phases=phases, peak_phase=peak_phase, peak=phases[peak_phase], host=host, kv=kv,
                # it fits if the peak phase is under budget and at least one max-length row can decode
                fits=phases[peak_phase] <= cfg.gpu_gib * GiB and kv >= kv_tok * cfg.seq_len,
                # rows in flight per sampler (an engine of engine_tp GPUs, or one native rank)
                decode_rows=int(kv // (kv_tok * (cfg.prompt_mean + cfg.response_mean))),  # paged, mean length
                decode_rows_prealloc=int(kv // (kv_tok * cfg.seq_len)),                   # model.KVCache
                # vLLM's gpu_memory_utilization: the engine's share of the GPU (weights + KV + workspace)
                engine_memory=sum(r.bytes for r in rows if r.key in ("rollout", "kv", "workspace")) / (cfg.gpu_gib * GiB))


def print_plan(cfg, rows, s, mc):
    W = cfg.world_size
    pc = param_counts(mc, W)
    print(f"model: {cfg.config or cfg.model}  N = {pc['total']/1e9:.3f}B params ({pc['experts']/1e9:.2f}B in experts), "
          f"{pc['active']/1e9:.2f}B active/token; Nr = {pc['shard']/1e9:.3f}B per rank; "
          f"P_layer = {pc['layer_max']/1e6:.0f}M, P_root = {pc['root']/1e6:.0f}M")
    print(f"world {W}, {cfg.prompts_per_step} prompts x {cfg.rollouts} rollouts = "
          f"{cfg.prompts_per_step * cfg.rollouts // W} sequences/GPU/step; T_mb = {cfg.micro_batch} x {cfg.seq_len} "
          f"tokens per micro-batch; {cfg.teachers} teachers; optimizer_offload={cfg.optimizer_offload}, "
          f"teacher_offload={cfg.teacher_offload}, activation_checkpointing={cfg.activation_checkpointing}")
    print()
    print(f"| {'item':<44} | {'formula':<38} | {'GiB':>6} | where | phases |")
    print(f"|{'-' * 46}|{'-' * 40}|{'-' * 8}|-------|--------|")
    for r in rows:
        print(f"| {r.item:<44} | {r.formula:<38} | {r.bytes / GiB:6.2f} | {r.where:<5} | {r.phases:<6} |")
    names = {"R": "rollout", "S": "teacher scoring", "T": "training"}
    for p, b in s["phases"].items():
        mark = "  <- peak" if p == s["peak_phase"] else ""
        print(f"| {'GPU total, ' + names[p] + ' phase':<44} | {'sum of GPU rows alive in ' + p:<38} | "
              f"{b / GiB:6.2f} | gpu   | {p:<6} |{mark}")
    fixed = s["phases"]["R"] - s["kv"]
    print(f"(rollout phase without the KV cache: {fixed / GiB:.2f} GiB; the KV cache takes what is left)")
    verdict = "fits" if s["fits"] else "DOES NOT FIT"
    print(f"\nper-GPU peak: {s['peak'] / GiB:.2f} GiB ({names[s['peak_phase']]}) vs budget {cfg.gpu_gib:g} GiB: "
          f"{verdict}")
    print(f"host memory: {s['host'] / GiB:.1f} GiB per rank, {s['host'] * min(W, 8) / GiB:.0f} GiB per 8-GPU node "
          f"(pinned)")
    if cfg.rollout_engine == "vllm":
        print(f"KV cache {s['kv'] / GiB:.1f} GiB per GPU -> {s['decode_rows']} concurrent rows per engine of "
              f"{cfg.engine_tp} GPUs at the mean length {cfg.prompt_mean + cfg.response_mean} (paged); "
              f"--engine_memory={s['engine_memory']:.2f} (of {cfg.gpu_gib:g} GiB)")
    else:
        print(f"KV cache {s['kv'] / GiB:.1f} GiB -> {s['decode_rows_prealloc']} rows per chunk at seq_len "
              f"{cfg.seq_len} (rollout.py preallocates each row; --rollout_cache_gib={s['kv'] / GiB:.0f})")


ROLLOUT_NOTES = {
    "vllm": "a vLLM engine per engine_tp GPUs (engine.py) holding a bf16 copy of the student\n"
            "  split TP ways (its KV heads too), asleep outside the rollout phase (level 2: weights and KV cache\n"
            "  freed), rewritten by engine.sync every step one tensor at a time (the largest gathered in fp32 and\n"
            "  cast); KV cache paged (rows hold their actual length)",
    "native": "rollout.py on the FSDP-sharded student: each decode step all-gathers every layer\n"
              "  again; the KV cache is preallocated per row for seq_len tokens, in chunks of --rollout_cache_gib"}


def print_assumptions(cfg, mc):
    a = layer_activation_bytes(mc)
    print(f"""
assumptions:
- N from the config; W = world_size; P_layer / P_root = largest decoder layer / root (embed + norm + lm_head).
- FSDP2 (distributed.shard): sharded params stay fp32 = the master weights (no separate bf16 shard);
  bf16 exists only in the all-gathered layer (this one + the prefetched next), and the root stays gathered
  from the start of forward to the end of backward (vocab_kernels.py applies lm_head after forward).
  Gradients are reduce-scattered in fp32 (a bf16 unsharded grad + its fp32 copy per layer).
- optimizer_offload = FSDP2 CPUOffloadPolicy on the student: params, grads and AdamW states live in
  pinned host memory, each layer's shard is copied in for its all-gather, the AdamW step runs on CPU.
  teacher_offload = the same policy on each teacher: its bf16 shard is streamed in layer by layer.
- activations (bf16, per micro-batch of T_mb = micro_batch*seq_len tokens, one sequence never split):
  a = {a} bytes/token/layer (layer_activation_bytes, flash-attn); with checkpointing each layer keeps its
  bf16 input (2H) and one layer at a time is recomputed, its backward working set taken as 0.5*a (assumed).
- fused head (vocab_kernels.py): fp32 copy of the bf16 lm_head (4VH), fp32 grad_W (4VH) and its bf16 cast (2VH),
  grad_hidden fp32 (4H*T_mb), the 256 MiB [chunk x V] logits budget; never [T_mb x V] logits.
- teacher scoring: no_grad prefill of one micro-batch; one layer's transients bounded by a*T_mb.
- rollouts ({cfg.rollout_engine}): {ROLLOUT_NOTES[cfg.rollout_engine]}.
- phases do not overlap: rollout (R), teacher scoring (S), training (T); the total is the peak phase.""")

# -----------------------------------------------------------------------------
# Throughput

def fwd_flops_per_token(mc, pc, ctx):
    """Forward FLOPs of one token attending to `ctx` positions: 2 per active weight + QK^T and AV."""
    return 2 * pc["active"] + 4 * mc.num_layers * mc.num_heads * mc.head_dim * ctx


def throughput(cfg, mc, decode_rows, score_fwds=1, fsdp=True):
    """
    Seconds per step per GPU of each phase and prompt+response tokens/s/GPU (NeMo-RL's metric)
    for cfg's shape. score_fwds: prefill passes per sequence besides training (MOPD: the one
    teacher of its domain; GRPO in NeMo-RL: policy + reference log-probs = 2).
    """
    W, L, k = cfg.world_size, mc.num_layers, mc.num_experts_per_tok
    pc = param_counts(mc, W)
    N, Nr = pc["total"], pc["shard"]
    P, R = cfg.prompt_mean, cfg.response_mean
    T, S = P + R, cfg.prompts_per_step * cfg.rollouts / W  # tokens per sequence, sequences per GPU
    flops = cfg.peak_tflops * 1e12 * cfg.mfu
    hbm, pcie, host = cfg.hbm_tbps * 1e12 * cfg.hbm_eff, cfg.pcie_gbps * 1e9, cfg.host_gbps * 1e9
    kv_tok, out = kv_bytes_per_token(mc), {}
    # rollout: prompt prefill (compute-bound), then decoding (bandwidth-bound), B rows in flight per
    # sampler: a vLLM engine of t GPUs (weights, KV heads and FLOPs split t ways; two bf16
    # all-reduces of the hidden state per layer), or one native rank (FSDP all-gathers every
    # layer again at every decode step: 2N bytes, (W-1)/W of them over NVLink)
    t = engine_gpus(cfg)
    out["prompt prefill"] = S * P * fwd_flops_per_token(mc, pc, P / 2) / flops
    B = max(1, min(decode_rows, S * t))
    touched = 1 - (1 - k / mc.num_experts) ** B if mc.num_experts else 1.0  # experts some row of B hits
    nvlink = cfg.nvlink_gbps * 1e9
    if cfg.rollout_engine == "vllm":
        w_read = (2 * (N - pc["experts"]) + 2 * pc["experts"] * touched) / t
        comm = 2 * L * B * mc.hidden_size * 2 * 2 * (t - 1) / t / nvlink
    else:
        w_read = 2 * (N - pc["experts"]) + 2 * pc["experts"] * touched
        comm = 2 * N * (W - 1) / W / nvlink if fsdp else 0.0
    kv_tok = kv_tok / t
    step_s = max((w_read + B * (P + R / 2) * kv_tok) / hbm, B * fwd_flops_per_token(mc, pc, P + R / 2) / (t * flops)) \
        + comm
    tail_s = (w_read + (P + R) * kv_tok) / hbm + comm  # the longest response decodes alone at the end
    out["decode"] = max(S * t * R / B * step_s, (cfg.seq_len - P) * tail_s)
    # teacher scoring: prefill only
    n_micro = math.ceil(S * T / (cfg.micro_batch * cfg.seq_len))
    # FSDP collectives per micro-batch, overlapped with compute (the slower of the two counts):
    # bf16 all-gathers receive (W-1)/W of the model, fp32 reduce-scatters send (W-1)/W of it
    gather = 2 * N * (W - 1) / W / (cfg.nvlink_gbps * 1e9) if fsdp else 0.0
    out["teacher prefill"] = max(S * T * score_fwds * fwd_flops_per_token(mc, pc, T / 2) / flops,
                                 n_micro * score_fwds * gather)
    if cfg.teacher_offload:  # each micro-batch streams the teacher's bf16 shard in (overlaps compute)
        out["teacher prefill"] = max(out["teacher prefill"], n_micro * 2 * Nr / pcie)
    # training: forward + backward (2 forwards) + the recomputed forward when checkpointing
    n_fwd = 4 if cfg.activation_checkpointing else 3
    out["train fwd+bwd"] = max(S * T * n_fwd * fwd_flops_per_token(mc, pc, T / 2) / flops,
                               n_micro * 4 * gather)  # gather in fwd and bwd, fp32 reduce-scatter = 2 gathers
    if cfg.optimizer_offload:
        # per micro-batch: fp32 shards copied in for forward and again for backward (overlaps
        # compute); when accumulating, FSDP2 copies each grad shard out *blocking* and adds it
        # into the host grad on the CPU (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py)
        out["train fwd+bwd"] = max(out["train fwd+bwd"], n_micro * 2 * 4 * Nr / pcie)
        out["grads out + CPU add"] = n_micro * (4 * Nr / pcie + 12 * Nr / host)
        out["AdamW on CPU"] = 28 * Nr / host  # read p, g, m, v; write p, m, v (fp32)
    else:
        out["AdamW on GPU"] = 28 * Nr / hbm
    if cfg.rollout_engine == "vllm":  # engine.sync: every fp32 tensor all-gathered (one at a time), cast,
        # loaded by the engine; host-offloaded shards are copied in first
        out["weight sync"] = 4 * N * (W - 1) / W / nvlink + 2 * N / t / hbm + \
            (4 * Nr / pcie if cfg.optimizer_offload else 0.0)
    total = sum(out.values())
    return dict(phases=out, step_s=total, tokens_per_s_gpu=S * T / total, rows=B, step_ms=step_s * 1e3,
                sequences=S, tokens=S * T, micro_batches=n_micro)


def nemo_rl_setup(cfg):
    """NeMo-RL's published run in our terms (what is not published is an assumption here)."""
    ref = NEMO_RL
    return dataclasses.replace(cfg, world_size=ref["gpus"], prompts_per_step=ref["rollouts"], rollouts=1,
                               seq_len=ref["seq_len"], micro_batch=1, prompt_mean=256,
                               response_mean=ref["mean_len"] - 256, optimizer_offload=False,
                               teacher_offload=False, activation_checkpointing=False,
                               rollout_engine="vllm", engine_tp=ref["generation_tp"])


def at_reference_lengths(cfg):
    """cfg's own path (GPUs, engines, offload, teachers) at NeMo-RL's sequence lengths, with the
    same tokens per training micro-batch: the projection that compares like with like, since a
    token's decode cost grows with the context it attends to (the preset's assumed mean, 9.2k
    tokens, is 2.9x theirs)."""
    ref = NEMO_RL
    return dataclasses.replace(cfg, seq_len=ref["seq_len"], prompt_mean=256, response_mean=ref["mean_len"] - 256,
                               micro_batch=max(1, cfg.micro_batch * cfg.seq_len // ref["seq_len"]))


def print_throughput(cfg, mc, s):
    pc = param_counts(mc)
    tp = throughput(cfg, mc, s["decode_rows"])
    ac = cfg.activation_checkpointing
    if not s["fits"]:
        print("\n(this configuration does not fit: the projection below is for comparison only)")
    print("\nprojected throughput (tokens = prompt + response, per GPU: NeMo-RL's tokens/s/GPU)")
    for line in [
        f"forward FLOPs/token = 2*N_active + 4*L*nh*hd*ctx = 2*{pc['active'] / 1e9:.2f}B + attention "
        f"(ctx = mean position attended)",
        f"training = {4 if ac else 3} forwards (fwd + bwd{' + recompute' if ac else ''}); teacher = 1 forward per "
        f"scored token; both at {cfg.mfu:.0%} of {cfg.peak_tflops:g} TFLOP/s (assumed MFU)",
        (f"decode step (vLLM engine of {cfg.engine_tp} GPUs) = (bf16 weights + KV read) / TP / "
         f"({cfg.hbm_eff:.0%} of {cfg.hbm_tbps} TB/s) + 2 all-reduces/layer at {cfg.nvlink_gbps:g} GB/s: "
         if cfg.rollout_engine == "vllm" else
         f"decode step (native, FSDP) = (bf16 weights + KV read) / ({cfg.hbm_eff:.0%} of {cfg.hbm_tbps} TB/s) "
         f"+ all-gather of every layer at {cfg.nvlink_gbps:g} GB/s: ")
        + f"{tp['rows']} rows in flight -> {tp['step_ms']:.1f} ms/step",
        f"host<->GPU {cfg.pcie_gbps:g} GB/s, host memory {cfg.host_gbps:g} GB/s per rank, FSDP collectives "
        f"{cfg.nvlink_gbps:g} GB/s (all assumed)",
        *([f"weight sync = every fp32 tensor all-gathered (4N (W-1)/W over NVLink) + the engine's bf16 write "
           f"(2N/TP at HBM speed){' + the offloaded shards copied in (4*Nr over PCIe)' if cfg.optimizer_offload else ''}; "
           f"sleep/wake (level 2) taken as free"] if cfg.rollout_engine == "vllm" else []),
        f"mean prompt {cfg.prompt_mean} + response {cfg.response_mean} tokens (assumed), "
        f"{tp['sequences']:.0f} sequences/GPU/step, {tp['micro_batches']} micro-batches of "
        f"{cfg.micro_batch * cfg.seq_len} tokens",
    ]:
        print("  " + line)
    for k, v in tp["phases"].items():
        print(f"  {k:<24} {v:8.1f} s")
    print(f"  {'step':<24} {tp['step_s']:8.1f} s  -> {tp['tokens_per_s_gpu']:.0f} tokens/s/GPU (model)")
    ref = NEMO_RL
    nemo = throughput(nemo_rl_setup(cfg), mc, 10**9, score_fwds=2, fsdp=False)  # all rows fit in KV at once
    eff = ref["tokens_per_s_gpu"] / nemo["tokens_per_s_gpu"]
    print(f"  calibration: the same model on NeMo-RL's Qwen3-30B-A3B GRPO run ({ref['gpus']} H100, "
          f"{ref['rollouts']} rollouts of mean {ref['mean_len']} tokens, max {ref['seq_len']};\n"
          f"  prompt 256 assumed; policy + reference log-prob passes; no offload, recompute or FSDP traffic) "
          f"predicts {nemo['tokens_per_s_gpu']:.0f}\n"
          f"  tokens/s/GPU ({nemo['step_s']:.0f} s/step); they measured {ref['tokens_per_s_gpu']} "
          f"({ref['step_s']} s/step): {eff:.0%} of the model.")
    print(f"  calibrated MOPD preset: ~{tp['tokens_per_s_gpu'] * eff:.0f} tokens/s/GPU, "
          f"~{tp['step_s'] / eff / 60:.0f} min per step of {cfg.prompts_per_step * cfg.rollouts} rollouts")
    short = at_reference_lengths(cfg)
    s2 = summarize(short, plan(short, mc), mc)
    tp2 = throughput(short, mc, s2["decode_rows"])
    print(f"  the same path at NeMo-RL's lengths (prompt 256 + response {short.response_mean}, max {short.seq_len}; "
          f"{short.micro_batch} x {short.seq_len} tokens per micro-batch;\n  {tp2['rows']} rows in flight): "
          f"{tp2['tokens_per_s_gpu']:.0f} tokens/s/GPU (model), calibrated ~{tp2['tokens_per_s_gpu'] * eff:.0f} "
          f"against their measured {ref['tokens_per_s_gpu']}"
          + ("" if s2["fits"] else " (does not fit)"))
    return tp, eff


# -----------------------------------------------------------------------------
# Dry run: real FSDP2 sharding on the meta device over a fake process group

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dry_run(cfg, mc=None):
    """
    Build the student (fp32) and cfg.teachers teachers (bf16) on the meta device, shard all of
    them with distributed.shard over torch's fake process group of world_size ranks, give the
    student meta gradients and take one AdamW step (which creates its states), and count the
    bytes rank 0 owns. Returns {item: bytes}. Every tensor stays on meta: nothing is allocated.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import distributed
    from model import MoE, Transformer
    mc = mc or model_config(cfg)
    if dist.is_initialized():
        raise RuntimeError("dry_run needs a fresh process (a process group is already initialized)")
    rss0 = rss_mib()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=cfg.world_size)
    try:
        mesh = init_device_mesh("cpu", (cfg.world_size,))
        with torch.device("meta"):
            student = Transformer(mc)
        distributed.shard(student, mesh=mesh, offload=cfg.optimizer_offload,
                          activation_checkpointing=cfg.activation_checkpointing)
        params = list(student.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.AdamW(params, lr=1e-6)
        opt.step()  # on meta DTensors: creates exp_avg / exp_avg_sq with the parameters' sharding
        states = [t for st in opt.state.values() for t in st.values() if t.dim() > 0]
        counts = {"student params": distributed.local_bytes(params),
                  "student grads": distributed.local_bytes(p.grad for p in params),
                  "AdamW states": distributed.local_bytes(states)}
        teachers = 0
        for _ in range(cfg.teachers):
            with torch.device("meta"):
                t = Transformer(mc).to(torch.bfloat16).requires_grad_(False)
            distributed.shard(t, mesh=mesh, offload=cfg.teacher_offload)
            teachers += distributed.local_bytes(t.parameters())
            devices = {p.to_local().device.type for p in t.parameters()}
            assert devices == {"meta"}, devices
        counts["teachers"] = teachers
        everything = params + [p.grad for p in params] + states
        assert {t.to_local().device.type for t in everything} == {"meta"}
        moe = next((m for m in student.modules() if isinstance(m, MoE)), None)
        counts["local experts"] = moe.gate_proj.to_local().shape[0] if moe is not None else 0
    finally:
        dist.destroy_process_group()
    counts["rss growth MiB"] = rss_mib() - rss0
    return counts


def compare(cfg, rows, counts):
    """Plan vs count for every item the dry run can count; returns the worst relative error."""
    by = {r.key: r.bytes for r in rows}
    planned = {"student params": by["params"], "student grads": by["grads"], "AdamW states": by["adam"],
               "teachers": by["teachers"]}
    print(f"\ndry run: meta-device FSDP2 over a fake {cfg.world_size}-rank process group, bytes owned by rank 0")
    print(f"| {'item':<16} | {'plan bytes':>14} | {'counted bytes':>14} | {'plan GiB':>9} | {'diff':>7} |")
    print(f"|{'-' * 18}|{'-' * 16}|{'-' * 16}|{'-' * 11}|{'-' * 9}|")
    worst = 0.0
    for k, p in planned.items():
        c = counts[k]
        err = abs(p - c) / c if c else (0.0 if p == 0 else 1.0)
        worst = max(worst, err)
        print(f"| {k:<16} | {p:14,.0f} | {c:14,} | {p / GiB:9.3f} | {100 * err:6.2f}% |")
    tp, tc = sum(planned.values()), sum(counts[k] for k in planned)
    print(f"| {'sum':<16} | {tp:14,.0f} | {tc:14,} | {tp / GiB:9.3f} | {100 * abs(tp - tc) / tc:6.2f}% |")
    print(f"experts per rank: {counts['local experts']} whole experts of a stacked [E, I, H] tensor; "
          f"process RSS grew {counts['rss growth MiB']:.0f} MiB (everything stayed on meta)")
    return worst


def main(argv=None):
    cfg = parse_config(Config, argv, limits=LIMITS)
    mc = model_config(cfg)
    rows = plan(cfg, mc)
    s = summarize(cfg, rows, mc)
    print_plan(cfg, rows, s, mc)
    print_assumptions(cfg, mc)
    print_throughput(cfg, mc, s)
    if cfg.dry_run:
        t0 = time.time()
        counts = dry_run(cfg, mc)
        worst = compare(cfg, rows, counts)
        print(f"dry run took {time.time() - t0:.1f} s; worst plan/count difference {100 * worst:.2f}% (limit 5%)")
        if worst > 0.05:
            sys.exit(1)
    if not s["fits"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cli(main)
