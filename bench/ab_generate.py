"""
A/B of the sampler: rollout.generate of two checkouts of this repository (e.g. `git worktree add
/tmp/old HEAD~1`), alternating in one process on the same random model, prompts and seed, so a
drifting machine load hits both alike. Prints each side's median time, the speed-up, whether the
tokens are identical and the largest difference in log mu. For a change to the sampler: it must
keep the tokens and log-probs (README "Exact draws") and should not be slower.

Cases: a random Qwen3 (hidden 256, 4 layers, 8 heads, 4 KV heads) at three vocabularies:
4,096 (64 rows, 128 new tokens: bench_sampling.py's tiny case), 151,936 (16 rows, 64 tokens:
bench_mopd.py's --vocab=151936 step) and 49,152 (SmolLM2's vocabulary, 16 rows, 64 tokens).

    python bench/ab_generate.py --old=/tmp/old --new=. --threads=2
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
    repeats: int = 3   # timed calls per side (median), after one warm-up call each


CASES = ((4096, 64, 128), (151_936, 16, 64), (49_152, 16, 64))  # vocabulary, rows, new tokens


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


def main(argv=None):
    args = parse_config(Config, argv, limits={">= 1": "repeats"})
    if not args.old:
        raise ValueError("--old: give the checkout to compare against (e.g. git worktree add /tmp/old HEAD~1)")
    sides = {"old": load_rollout(args.old, "rollout_old"), "new": load_rollout(args.new, "rollout_new")}
    print(f"old {args.old}, new {args.new}; {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    for V, R, T in CASES:
        cfg = ModelConfig(vocab_size=V, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8,
                          num_kv_heads=4, head_dim=32, max_position_embeddings=512)
        model = Transformer(cfg).init_weights(seed=0)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, V, (32,), generator=g).tolist() for _ in range(R)]
        times, res = {"old": [], "new": []}, {}
        for _ in range(args.repeats + 1):
            for k, mod in sides.items():
                t0 = time.perf_counter()
                res[k] = mod.generate(model, prompts, T, seed=3)
                times[k].append(time.perf_counter() - t0)
        old, new = (statistics.median(times[k][1:]) for k in ("old", "new"))
        same = torch.equal(res["old"].tokens, res["new"].tokens)
        dlp = (res["old"].logprobs - res["new"].logprobs).abs().max().item()
        print(f"V={V:,} rows={R} new tokens={T}: old {old:.3f} s, new {new:.3f} s, speed-up {old / new:.2f}x; "
              f"same tokens: {same}, max |d log mu| {dlp:.1e}", flush=True)


if __name__ == "__main__":
    cli(main)
