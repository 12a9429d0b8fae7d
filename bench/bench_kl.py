"""
Benchmark: naive (materialise both logit matrices, log_softmax, KL, backward) vs vocab_kernels.py,
for reverse KL + backward and for token log-probs + backward. Prints a markdown table.

Every forward+backward run happens in a fresh child process, so its peak RSS is its own: the
child builds its inputs (in place, no temporaries), records its RSS, runs one step, and
reports "peak extra" = peak RSS (getrusage ru_maxrss) - RSS after the inputs. Runs of naive
and ours alternate, `rounds` times; the table gives medians. Besides wall time it reports the
child's CPU time (user + sys, both threads): on a shared machine the wall time also counts
time spent waiting for a core, the CPU time does not.

    python bench/bench_kl.py --threads=2          # N=2048, V=151936, H=1024, fp32, 2 threads
    python bench/bench_kl.py --tokens 256 --rounds 1    # a quick smoke run
    python bench/bench_kl.py --threads=2 --only="PG"    # the policy-gradient cases only

Cases: "mean" losses (one grad_output for every token: vocab_kernels.py's fast path) and the
per-token-weight losses MOPD actually uses (PG: -A_t * log p; per-sequence means), which take
vocab_kernels.py's recompute path for the weight gradient (see vocab_kernels.py's docstring), and the PG
loss fused into the kernel (token_logprob_loss: the weights formed inside each chunk), which
is what mopd.pg_update runs for RL and for MOPD's PG form.
The command line is every script's (config.py): --key=value or --key value, --threads=N
(torch's threads, passed on to each child; 0, the default, leaves torch's own), --help.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vocab_kernels as K  # noqa: E402
from config import cli, parse_config  # noqa: E402


@dataclass
class Config:
    tokens: int = 2048             # N
    vocab: int = 151936            # V (Qwen3)
    hidden: int = 1024             # H
    rounds: int = 3                # fresh-process runs per (case, impl)
    seq_len: int = 512             # for the per-sequence-mean case
    only: str = ""                 # run only the cases whose name contains this text (e.g. "PG")
    child: list[str] = field(default_factory=list)  # internal: CASE IMPL, one run in this (fresh) process


LIMITS = {">= 1": "tokens vocab hidden rounds seq_len"}

CASES = {  # name -> (function family, loss reduction, vocab_kernels.py's precompute_grads or "fused")
    "reverse KL, mean loss": ("kl", "mean", True),
    "token log-probs, mean loss": ("lp", "mean", True),
    "reverse KL, per-sequence means": ("kl", "per_seq", True),
    "reverse KL, per-sequence means, precompute_grads=False": ("kl", "per_seq", False),
    "token log-probs, PG loss (-A * log p)": ("lp", "pg", True),
    "token log-probs, PG loss, precompute_grads=False": ("lp", "pg", False),
    "PG loss fused (token_logprob_loss, what pg_update runs)": ("lp", "pg", "fused"),
}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args, case, impl):
    family, reduction, pre = CASES[case]
    N, V, H = args.tokens, args.vocab, args.hidden
    g = torch.Generator().manual_seed(0)
    # inputs built in place so that no temporary raises the peak before the baseline is taken
    hs = torch.empty(N, H).normal_(generator=g)
    ws = torch.empty(V, H).normal_(generator=g).mul_(2 / H ** 0.5).requires_grad_()
    if family == "kl":
        ht = torch.empty(N, H).normal_(generator=g)
        wt = torch.empty(V, H).normal_(generator=g).mul_(2 / H ** 0.5)
    else:
        y = torch.randint(0, V, (N,), generator=g)
        adv = torch.empty(N).uniform_(-5, 5, generator=g)  # stands in for the clipped MOPD advantage
    hs.requires_grad_()
    seq_weight = torch.full((N,), 1.0)
    seq_weight[: N // 3] = 2.0  # sequences of different lengths: per-token weights differ
    baseline_peak, baseline = peak_rss_bytes(), rss_bytes()

    def step():
        if pre == "fused" and impl == "ours":  # the loss inside the kernel: each token's weight formed in its chunk
            loss, _ = K.token_logprob_loss(hs, ws, y, lambda lp: -(adv * lp) / N)
            loss.backward()
            ws.grad = hs.grad = None
            return
        if family == "kl":
            out = K.kl_ref(hs, ws, ht, wt) if impl == "naive" else K.kl(hs, ws, ht, wt, precompute_grads=pre)
        else:
            out = (K.token_logprobs_ref(hs, ws, y) if impl == "naive"
                   else K.token_logprobs(hs, ws, y, precompute_grads=pre))
        if reduction == "mean":
            loss = out.mean()
        elif reduction == "per_seq":
            loss = (out * seq_weight).sum() / seq_weight.sum()
        else:  # MOPD PG form; the advantage is a constant here, as sg[.] makes it in training
            loss = -(adv * out).mean()
        loss.backward()
        ws.grad = hs.grad = None

    t0, c0 = time.perf_counter(), time.process_time()
    step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps(dict(wall=wall, cpu=cpu, extra=peak_rss_bytes() - baseline,
                          baseline=baseline, baseline_peak=baseline_peak)))


def run_child(args, case, impl):
    cmd = [sys.executable, os.path.abspath(__file__), f"--threads={torch.get_num_threads()}"] + [
        f"--{k}={getattr(args, k)}" for k in ("tokens", "vocab", "hidden", "seq_len")] + ["--child", case, impl]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(b):
    return b / 2**30


def main(argv=None):
    args = parse_config(Config, argv, limits=LIMITS)
    if args.child:
        return child(args, *args.child)
    N, V, H = args.tokens, args.vocab, args.hidden
    grad_w = V * H * 4
    print(f"N={N} tokens, V={V}, H={H}, fp32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"medians of {args.rounds} forward+backward runs, each in a fresh process, naive and ours alternating; "
          f"load average at start: {os.getloadavg()[0]:.1f}")
    print(f"vocab_kernels.py chunk sizes from the default {K.DEFAULT_MEM_BUDGET / 2**20:.0f} MiB budget: "
          f"reverse kl {K.auto_chunk_size(V, 2)} tokens, token_logprobs {K.auto_chunk_size(V, 1)} tokens\n")
    cases = {k: v for k, v in CASES.items() if args.only in k}
    if not cases:
        raise ValueError(f"--only={args.only}: no case name contains it; cases: {', '.join(CASES)}")
    runs = {}  # (case or naive key, impl) -> list of child results
    for _ in range(args.rounds):
        done_naive = set()  # the naive side does not depend on precompute_grads: once per loss
        for case, (family, reduction, _) in cases.items():
            if (family, reduction) not in done_naive:
                done_naive.add((family, reduction))
                runs.setdefault((family, reduction, "naive"), []).append(run_child(args, case, "naive"))
            runs.setdefault((case, "ours"), []).append(run_child(args, case, "ours"))

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    print("| case | naive wall (s) | ours wall (s) | wall ours/naive | naive CPU (s) | ours CPU (s) | CPU ours/naive "
          "| naive peak extra (GiB) | ours peak extra (GiB) | memory ours/naive | same, minus grad_W |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case, (family, reduction, _) in cases.items():
        n, o = runs[family, reduction, "naive"], runs[case, "ours"]
        nw, ow, nc, oc = med(n, "wall"), med(o, "wall"), med(n, "cpu"), med(o, "cpu")
        ne, oe = max(r["extra"] for r in n), max(r["extra"] for r in o)
        print(f"| {case} | {nw:.1f} | {ow:.1f} | {ow / nw:.2f}x | {nc:.1f} | {oc:.1f} | {oc / nc:.2f}x "
              f"| {gib(ne):.2f} | {gib(oe):.2f} | {oe / ne:.3f} | {max(oe - grad_w, 0) / max(ne - grad_w, 1):.3f} |")
    bad = [r for rs in runs.values() for r in rs if r["baseline_peak"] > r["baseline"] + 64 * 2**20]
    if bad:
        print(f"(warning: {len(bad)} runs had a higher peak before their baseline; their extra is understated)")
    print(f"\n(peak extra is the max over the runs; grad_W = V x H x 4 bytes = {gib(grad_w):.2f} GiB is in both "
          f"columns, since every method must produce the weight gradient; load average at end: "
          f"{os.getloadavg()[0]:.1f})")
    # Why this exists: the paper's scale. Tokens per GPU were not published; take one
    # max-length sequence per GPU (32k for Math/IF, 64k for SWE) and Qwen3-30B-A3B's H = 2048.
    print("\nComputed, paper scale (V = 151,936, fp32, one max-length sequence per GPU, H = 2048):")
    for T in (32768, 65536):
        naive = 2 * T * 151936 * 4  # the two logit matrices alone; naive also keeps log-softmax copies
        ours = K.DEFAULT_MEM_BUDGET + T * 2048 * 4 + 2 * T * 4  # chunk budget + per-token grad_hidden + outputs
        print(f"  {T:,} tokens: naive student+teacher logits {gib(naive):.1f} GiB "
              f"({T:,} x 151,936 x 4 B x 2 models); ours {gib(ours):.2f} GiB "
              f"(chunk budget + {T:,} x 2048 x 4 B stored grad_hidden)")


if __name__ == "__main__":
    cli(main)
