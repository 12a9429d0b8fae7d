"""
One RL step, sample + score + update, of ours (train_teacher_rl.rl_step) against TRL's
GRPOTrainer (issue #4), on the same tiny model, batch and lengths, measured in one run.
Target (issue 15): ours >= 4x TRL's completion tokens/s.

Setup, the same on both sides:
- a random Qwen3 of 4.98M parameters (hidden 256, 4 layers, 8 heads, 4 KV heads, head_dim
  32, MLP 1024, vocab 4096, tied embeddings; the model of bench_sampling.py), built offline
  from transformers' Qwen3Config and saved with save_pretrained; both load that directory.
- a tokenizer built offline with `tokenizers`: one token per character, 3 specials
  (<pad> <eos> <unk>) then 4093 CJK characters, id i <-> chr(0x4E00 + i) (past the UTF-16
  surrogates, 2,048 code points later: --vocab works up to ~1M), so a character's code point
  has the parity of its token id. No BOS, no chat template: a prompt is its ids.
- 4 prompts x 4 samples = 16 completions per step, prompts of 32 tokens, exactly 64 new
  tokens per completion (EOS cannot end a row: TRL gets min_new_tokens=64, ours a tokenizer
  view without an EOS id), temperature 1, no top-k / top-p.
- reward: the fraction of completion characters with an even token id (cheap; the same
  Python function on the decoded text on both sides).
- the same objective settings: DAPO token-mean loss, clip 0.2 / 0.28, no KL term (TRL:
  beta=0, so no reference model), one optimiser step per generation batch (TRL:
  num_iterations=1, gradient_accumulation_steps=1), AdamW lr 3e-4, grad clip 1, fp32.
  TRL's gradient checkpointing (on by default) is off unless --trl_grad_ckpt: it only
  slows TRL down at this size.

Ours is the real training code: rl_step itself (rollout.generate, the reward, GRPO group
advantages, mopd.pg_update, the optimiser step), called with a one-domain adapter whose
prompts and reward are the ones above. TRL's step is timed by a TrainerCallback
(on_step_begin .. on_step_end: generation, reward, loss, backward, clip, optimiser), so
dataset and trainer setup are excluded. The two alternate in one process (a TRL step, then
one of ours, from the callback), so both see the same machine load. The first step of each
is a warm-up; the table reports the median of the timed steps.

For context the run also measures this machine's fp32 matmul rate and prints the matmul
work that any implementation of the step must do (sampling, the training forward and
backward): at that rate it is a floor on the step time, hence a ceiling on the speed-up.
The sampling phase's floor is the larger of that, the weights' bytes at the measured read
bandwidth, and its kernels alone (bench_sampling.kernels_alone: a decode step's GEMMs and
SDPA as generate runs them, the kernels that give its bits, timed on the student's weights).

    python bench/bench_rl.py --threads=2                       # the full run (2 threads, as in README)
    OMP_NUM_THREADS=1 python bench/bench_rl.py --threads=1     # when other jobs share the cores
    python bench/bench_rl.py --skip_trl --steps=2              # ours only
The command line is every script's (config.py): --key=value or --key value, --threads=N
(torch's threads; 0, the default, leaves torch's own), --help.
"""

import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import cli, parse_config  # noqa: E402

TARGET = 4.0  # issue 15: ours / TRL completion tokens/s, at the default and at a 151,936 vocabulary (issue 5 asked 5x)

# -----------------------------------------------------------------------------
# The shared setup (bench_mopd.py imports everything in this section)

SPECIALS = ["<pad>", "<eos>", "<unk>"]  # ids 0, 1, 2
CHAR_BASE = 0x4E00  # token id i >= 3 is the character char_of(i); CHAR_BASE is even
SURROGATES = 0xD800, 0xE000  # code points that are not characters: skipped (a span of even length)


def char_of(i):
    """Token id i >= 3 -> its character: chr(CHAR_BASE + i), skipping the UTF-16 surrogates, so
    any vocabulary up to ~1M ids works (Qwen3's 151,936, Gemma's 262,144) and a character's
    code point keeps the parity of its id."""
    cp = CHAR_BASE + i
    return chr(cp + (SURROGATES[1] - SURROGATES[0]) * (cp >= SURROGATES[0]))


@dataclass
class BenchConfig:
    """The options bench_rl.py and bench_mopd.py share, with bench_rl.py's defaults."""
    # model, batch and lengths
    vocab: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 32
    intermediate: int = 1024       # MLP width (1024: 4.98M params in all)
    prompt_len: int = 32           # tokens per prompt
    new_tokens: int = 64           # tokens per completion, exactly
    prompts: int = 4               # prompts per step
    # timing
    steps: int = 7                 # timed steps per implementation (median)
    warmup: int = 1                # untimed steps first
    skip_trl: bool = False         # time ours only (TRL is not imported)
    trl_grad_ckpt: bool = False    # TRL with gradient checkpointing (its default)
    seed: int = 0


# refused as soon as the command line is read (config.check)
BENCH_LIMITS = {">= 1": "vocab hidden layers heads kv_heads head_dim intermediate prompt_len new_tokens prompts steps",
                ">= 0": "warmup"}


def tokenizer(vocab):
    """The character tokenizer described at the top, as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    v = {t: i for i, t in enumerate(SPECIALS)}
    v.update({char_of(i): i for i in range(len(SPECIALS), vocab)})
    tok = Tokenizer(models.WordLevel(v, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # each character a word
    tok.decoder = decoders.Fuse()  # decode joins characters without spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False, model_max_length=4096)


def matmul_params(args):
    """Weights that take part in a matmul per token: q/k/v/o, the MLP, and the (tied) lm_head."""
    h, d = args.hidden, args.head_dim
    per_layer = h * d * (2 * args.heads + 2 * args.kv_heads) + 3 * h * args.intermediate
    return args.layers * per_layer + args.vocab * h


def num_params(args):
    """All parameters (tied embeddings: the embedding is the lm_head), norms included."""
    return matmul_params(args) + args.layers * (2 * args.hidden + 2 * args.head_dim) + args.hidden


def make_checkpoint(path, args, seed):
    """A random Qwen3 (transformers' own init) + the tokenizer, saved as an HF directory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.head_dim, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(seed)
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    tokenizer(args.vocab).save_pretrained(path)
    return path


def make_prompts(num, length, vocab, seed):
    """`num` prompt strings of exactly `length` tokens (random non-special ids)."""
    rng = random.Random(seed)
    return ["".join(char_of(rng.randrange(len(SPECIALS), vocab)) for _ in range(length))
            for _ in range(num)]


def even_fraction(text):
    """The reward: fraction of characters whose token id is even (code point parity == id parity)."""
    return sum(1 for c in text if ord(c) % 2 == 0) / max(1, len(text))


class Timers(dict):
    """name -> seconds, accumulated."""
    def add(self, name, dt):
        self[name] = self.get(name, 0.0) + dt


ACTIVE = [Timers()]  # the Timers that instrumented functions report to (the variant stepping now)


@contextmanager
def instrumented(*targets):
    """
    Inside the block, every call of module.attr, for each (module, attr, name) in targets, is
    timed under `name` into ACTIVE[0]. Timing only: the name is rebound in this process while
    the block runs (the training scripts look these names up at call time), then restored.
    """
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in targets]

    def timed(fn, name):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                ACTIVE[0].add(name, time.perf_counter() - t)
        return wrapper
    try:
        for (module, attr, fn), (_, _, name) in zip(saved, targets):
            setattr(module, attr, timed(fn, name))
        yield
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def bench_domain(prompts, name="bench"):
    """A tasks.Domain whose sample() draws one of `prompts` and whose reward is even_fraction."""
    from tasks import Domain, Example

    def reward(text, ex):
        t = time.perf_counter()
        r = even_fraction(text)
        ACTIVE[0].add("reward", time.perf_counter() - t)
        return r
    return Domain(name, lambda rng: Example(rng.choice(prompts), "", name), [], reward, lambda ex: "")


class IgnoreEOS:
    """
    The tokenizer, seen without an EOS id: rollout.stop_ids() then finds no stop token,
    so rollout.generate samples exactly max_new_tokens per row (TRL's side gets
    min_new_tokens instead). Everything else is forwarded to the real tokenizer.
    """
    eos_token_id = None

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


class Ours:
    """One variant of our step: step_fn(i) -> metrics dict; keeps timed step times and the split."""
    def __init__(self, name, step_fn, warmup, parts, row_update=False):
        # row_update: the update's time is the step's own update_s (MOPD's full-distribution
        # losses, whose teacher forwards inside the update are counted in score_s instead)
        self.name, self.step_fn, self.warmup, self.parts = name, step_fn, warmup, parts
        self.row_update = row_update
        self.times, self.lens, self.timers, self.k = [], [], Timers(), 0

    def step(self):
        if self.k == self.warmup:  # the split counts timed steps only
            self.timers.clear()
        ACTIVE[0] = self.timers
        t = time.perf_counter()
        m = self.step_fn(self.k)
        dt = time.perf_counter() - t
        self.timers.add("total", dt)
        self.timers.add("sample", m["sample_s"])
        if "score_s" in m:
            self.timers.add("teacher", m["score_s"])
        if self.row_update:
            self.timers.add("update", m["update_s"])
        self.lens.append(m["response_len"])
        if self.k >= self.warmup:
            self.times.append(dt)
        self.k += 1

    def split(self):
        """[(part label, mean seconds per timed step)], the remainder last; and the total."""
        per = {k: v / max(1, len(self.times)) for k, v in self.timers.items()}
        rows = [(label, per.get(key, 0.0)) for key, label in self.parts]
        rows.append(("the rest: optimiser step, grad clip, advantages, metrics", per["total"] - sum(s for _, s in rows)))
        return rows, per["total"]


def step_clock(on_end):
    """A TrainerCallback timing each optimizer step (begin .. end), then calling on_end(seconds)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            on_end(time.perf_counter() - self.t0)
    return StepClock()


def trl_common_args(out_dir, args, batch):
    """TrainingArguments shared by both TRL trainers: CPU, fp32, no logging/saving, one batch per step."""
    return dict(output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_strategy="no",
                save_strategy="no", disable_tqdm=True, max_steps=args.warmup + args.steps,
                per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                gradient_checkpointing=args.trl_grad_ckpt, max_completion_length=args.new_tokens,
                temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": args.new_tokens},
                lr_scheduler_type="constant", weight_decay=0.0, adam_beta2=0.99, max_grad_norm=1.0,
                dataloader_num_workers=0, seed=args.seed)


def require_trl(args):
    """TRL is the peer, not a dependency of the project: say how to get it before anything runs."""
    if not args.skip_trl and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -r requirements-bench.txt, "
                         "or --skip_trl to time ours only")


def run_alternating(make_trainer, ours, args):
    """
    A TRL step, then one step of each of ours, then the matmul rate, and again: ours run from
    TRL's on_step_end, so everything interleaves under the same machine load. Returns TRL's
    timed step times ([] with --skip_trl), TRL's (min, max) completion length per step, the
    matmul FLOP/s measured in each round, and the time of TRL's steps spent in generate().
    """
    trl_times, trl_lens, flops, trl_gen = [], [], [], []
    threads = torch.get_num_threads()  # as --threads set it

    def round_of_ours():
        for o in ours:
            o.step()
        flops.append((machine_flops(), machine_bandwidth()))

    if args.skip_trl:
        for _ in range(args.warmup + args.steps):
            round_of_ours()
        return trl_times, trl_lens, flops, trl_gen
    trainer, gen_s = None, [0.0]

    def after_trl_step(dt):
        if len(trl_lens) >= args.warmup:
            trl_times.append(dt)
            trl_gen.append(gen_s[0])
        gen_s[0] = 0.0
        m = trainer._metrics["train"]
        trl_lens.append((m["completions/min_length"][-1], m["completions/max_length"][-1]))
        round_of_ours()

    from transformers import PrinterCallback
    trainer = make_trainer(step_clock(after_trl_step))
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict, not ours to show
    generate = trainer.model.generate  # timed for the split only (TRL calls it on this very object)

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            gen_s[0] += time.perf_counter() - t
    trainer.model.generate = timed_generate
    torch.set_num_threads(threads)  # in case anything in the setup changed it
    trainer.train()
    return trl_times, trl_lens, flops, trl_gen


def machine_flops(repeats=3):
    """fp32 matmul FLOP/s (a 1024^3 matmul, best of `repeats`), with this process's threads."""
    n = 1024
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def machine_bandwidth(mib=256, repeats=3):
    """Bytes/s this process reads from memory: the sum of a `mib` MiB fp32 tensor (far larger than
    any cache), best of `repeats`. A decode step with few rows is bound by this, not by FLOPs: it
    reads every weight once to do 2 FLOPs per weight per row."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def sampling_kernels_alone(model_dir, args, prompts, n, flops):
    """bench_sampling.kernels_alone for this benchmark's sampling phase: the checkpoint in model_dir
    sampling args.new_tokens tokens, n per prompt, for `prompts` prompts of args.prompt_len tokens
    (distinct first tokens: no shared prefix). Seconds per step, at the FLOP/s given for the prefill."""
    from bench_sampling import kernels_alone
    from model import Transformer
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32)
    ids = [[len(SPECIALS) + i] + [len(SPECIALS)] * (args.prompt_len - 1) for i in range(prompts)]
    return kernels_alone(model, ids, args.new_tokens, flops, n=n)[0]


def load_label():
    """1-, 5-, 15-minute load averages, for the record."""
    return "load avg " + " / ".join(f"{x:.2f}" for x in os.getloadavg())


def check_lengths(ours, trl_lens, new_tokens):
    for o in ours:
        assert all(n == new_tokens for n in o.lens), f"{o.name}: response lengths {o.lens}"
    assert all(lo == hi == new_tokens for lo, hi in trl_lens), f"TRL: completion lengths {trl_lens}"


def print_results(title, trl_name, trl_times, trl_gen, ours, tokens_per_step, work, flops, notes, reads=(),
                  kernels=()):
    """The markdown tables; returns {implementation: completion tokens/s}. work: [(phase, matmul
    FLOPs)]; reads: [(phase, bytes it must read from memory)]; kernels: [(phase, seconds its kernels
    alone took, measured: sampling_kernels_alone)]; a phase's floor is the largest of these times
    (the first two at the rates measured during the run, flops: [(FLOP/s, bytes/s)] per round)."""
    print(f"\n### {title}\n")
    print("| implementation | median step (s) | min .. max (s) | completion tokens / step | "
          "completion tokens/s | vs TRL |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = ([(trl_name, trl_times)] if trl_times else []) + [(o.name, o.times) for o in ours]
    out, base = {}, None
    for name, ts in rows:
        med = statistics.median(ts)
        tps = out[name] = tokens_per_step / med
        base = base or (tps if trl_times else None)
        ratio = f"**{tps / base:.2f}x**" if base and name != trl_name else ("1.00x" if base else "-")
        print(f"| {name} | {med:.3f} | {min(ts):.3f} .. {max(ts):.3f} | {tokens_per_step} | {tps:,.0f} | {ratio} |")
    for o in ours:
        split, total = o.split()
        print(f"\nWhere the time of {o.name} goes (mean of the timed steps, {total:.3f} s):\n")
        print("| part | s / step | share |")
        print("|---|---:|---:|")
        for part, s in split:
            print(f"| {part} | {s:.3f} | {100 * s / total:.0f}% |")
    if trl_times:
        g = statistics.mean(trl_gen)
        print(f"\nFor comparison, {trl_name} (mean of its timed steps, {statistics.mean(trl_times):.3f} s): "
              f"transformers generate() {g:.3f} s, everything else (tokenising, scoring, forward + backward, "
              f"optimiser) {statistics.mean(trl_times) - g:.3f} s.")
    rate, bw = statistics.median(f for f, _ in flops), statistics.median(b for _, b in flops)
    floors = {name: w / rate for name, w in work}
    print("\nMatmul work any implementation must do per step: "
          + ", ".join(f"{name} {w / 1e9:.1f}" for name, w in work)
          + f" GFLOP; at this machine's fp32 matmul rate during the run ({rate / 1e9:.0f} GFLOP/s: a 1024^3 "
          f"matmul, best of 3, after each round, median; {torch.get_num_threads()} threads) that takes "
          + ", ".join(f"{name} {t:.3f} s" for name, t in floors.items()) + ".")
    if reads:
        print("Memory it must read per step: " + ", ".join(f"{name} {b / 1e9:.1f} GB" for name, b in reads)
              + f" (every fp32 weight once per decode step); at this machine's read bandwidth during the run "
              f"({bw / 1e9:.1f} GB/s: the sum of a 256 MiB tensor, best of 3, after each round, median) that takes "
              + ", ".join(f"{name} {b / bw:.3f} s" for name, b in reads) + ".")
        for name, b in reads:
            floors[name] = max(floors.get(name, 0.0), b / bw)
    if kernels:
        print("The kernels alone that give our sampler's bits (bench_sampling.kernels_alone: each decode "
              "step's GEMMs and SDPA as generate runs them, on the student's weights, from memory; the "
              "prefill at the FLOP limit) take " + ", ".join(f"{name} {t:.3f} s" for name, t in kernels)
              + ": a floor for any sampler with those bits.")
        for name, t in kernels:
            floors[name] = max(floors.get(name, 0.0), t)
    floor = sum(floors.values())
    print(f"The floor, each phase at the slowest of these: {floor:.3f} s per step"
          + (f", so no implementation can beat TRL's median step by more than "
             f"{statistics.median(trl_times) / floor:.1f}x." if trl_times else "."))
    if trl_times:
        best = max(v for k, v in out.items() if k != trl_name) / out[trl_name]
        verdict = "met" if best >= TARGET else "missed"
        print(f"\nTarget >= {TARGET:.0f}x TRL: {verdict} (best of ours: {best:.2f}x).")
    for n in notes:
        print(f"\n{n}")
    return out

# -----------------------------------------------------------------------------
# The RL benchmark


def ours_rl(model_dir, args, prompts):
    """train_teacher_rl.rl_step on this benchmark's batch, with the adapter."""
    from train_teacher_rl import Config as TrainConfig, rl_step
    from train_utils import load_for_training
    cfg = TrainConfig(init=model_dir, out_dir=os.path.join(model_dir, "unused_out"), prompts_per_step=args.prompts,
                       n=args.n, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, ratio_mode="clip",
                       eps_low=0.2, eps_high=0.28, loss_agg="token-mean", kl_coef=0.0, lr=3e-4, grad_clip=1.0,
                       seed=args.seed)
    tok, model, opt, _, _ = load_for_training(cfg)  # the training script's own loader and AdamW
    model.config.eos_token_id = None  # with IgnoreEOS: no stop token, exactly max_new_tokens per row
    tok, domain = IgnoreEOS(tok), bench_domain(prompts)
    return Ours("ours (train_teacher_rl.rl_step)", lambda i: rl_step(model, opt, tok, [domain], [1.0], cfg, i),
                args.warmup, [("sample", "sampling (rollout.generate, KV cache)"),
                              ("reward", "scoring (the reward on the decoded text)"),
                              ("update", "update (mopd.pg_update: forward + backward)")])


@dataclass
class Config(BenchConfig):  # the options shared with bench_mopd.py: BenchConfig above
    # model, batch and lengths
    n: int = 4                     # samples per prompt (the GRPO group)


LIMITS = {**BENCH_LIMITS, "> 0": "n"}


def main(argv=None):
    args = parse_config(Config, argv, limits=LIMITS)
    require_trl(args)
    R = args.prompts * args.n
    tokens_per_step = R * args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); {load_label()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(os.path.join(tmp, "policy"), args, args.seed)
        prompts = make_prompts(256, args.prompt_len, args.vocab, args.seed)
        ours = [ours_rl(model_dir, args, prompts)]

        def make_trainer(callback):
            from datasets import Dataset
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl import GRPOConfig, GRPOTrainer

            def even_token_reward(completions, **kw):
                return [even_fraction(c) for c in completions]
            cfg = GRPOConfig(**trl_common_args(os.path.join(tmp, "trl_out"), args, R), num_generations=args.n,
                             num_iterations=1, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                             learning_rate=3e-4, use_vllm=False)
            return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               reward_funcs=[even_token_reward], args=cfg,
                               train_dataset=Dataset.from_dict({"prompt": prompts}),
                               processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[callback])

        import train_teacher_rl
        with instrumented((train_teacher_rl, "pg_update", "update")):
            trl_times, trl_lens, flops, trl_gen = run_alternating(make_trainer, ours, args)
        check_lengths(ours, trl_lens, args.new_tokens)
        kernel_s = sampling_kernels_alone(model_dir, args, args.prompts, args.n, statistics.median(f for f, _ in flops))
    P = matmul_params(args)
    seq = args.prompt_len + args.new_tokens - 1  # positions the training forward sees per row
    work = [("sampling", 2 * P * (args.prompts * args.prompt_len + R * args.new_tokens)),
            ("training forward + backward", 6 * P * R * seq)]
    reads = [("sampling", 4 * P * args.new_tokens)]  # the prefill, then new_tokens - 1 decode steps
    kernels = [("sampling", kernel_s)]
    trl_name = f"TRL {_trl_version()} GRPOTrainer" if trl_times else ""
    ckpt = "on" if args.trl_grad_ckpt else "off"
    return print_results(
        f"RL step: ours vs TRL GRPOTrainer ({args.prompts} prompts x {args.n} samples, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, {num_params(args) / 1e6:.2f}M-param Qwen3, CPU fp32, "
        f"{torch.get_num_threads()} threads)", trl_name, trl_times, trl_gen, ours, tokens_per_step, work, flops,
        [f"TRL: GRPOConfig(num_generations={args.n}, per_device_train_batch_size={R}, "
         f"gradient_accumulation_steps=1, num_iterations=1, beta=0, loss_type='dapo', epsilon=0.2, "
         f"epsilon_high=0.28, max_completion_length={args.new_tokens}, generation_kwargs={{min_new_tokens: "
         f"{args.new_tokens}}}, use_cpu, bf16=False, gradient_checkpointing={ckpt}, no vLLM). "
         f"{len(ours[0].times)} timed steps each after {args.warmup} warm-up, alternating in one process; "
         f"{load_label()} at the end."], reads, kernels)


def _trl_version():
    import trl
    return trl.__version__


if __name__ == "__main__":
    cli(main)
