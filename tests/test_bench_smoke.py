"""Smoke test of bench/bench_rl.py and bench/bench_mopd.py: our side only, a tiny config (TRL is not run);
their command line is every script's (config.py): --key=value or --key value, one-line errors."""
import os
import sys

import pytest

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

TINY = ["--vocab=64", "--hidden", "32", "--layers=1", "--heads=2", "--kv_heads=1", "--head_dim=16",
        "--intermediate=64", "--prompt_len=4", "--new_tokens", "5", "--steps=1", "--warmup=1", "--threads=1",
        "--skip_trl"]


def test_bench_rl_ours_runs(capsys):
    import bench_rl
    out = bench_rl.main(TINY + ["--prompts=2", "--n", "2"])  # asserts every completion has exactly 5 tokens
    assert list(out) == ["ours (train_teacher_rl.rl_step)"] and out["ours (train_teacher_rl.rl_step)"] > 0
    text = capsys.readouterr().out
    assert "| ours (train_teacher_rl.rl_step) |" in text
    assert "The kernels alone that give our sampler's bits (" in text and "take sampling 0." in text



@pytest.mark.parametrize("kernel_s,floor", [(4.0, "6.000"), (0.25, "3.000")])
def test_each_phases_floor_is_the_slowest_of_flops_bytes_and_kernels_alone(kernel_s, floor, capsys):
    """print_results: sampling's floor is the largest of its matmul time (1 s), its bytes at the
    bandwidth (0.5 s) and its kernels alone; the training phase's (2 s) adds to it."""
    import bench_rl
    bench_rl.print_results("t", "", [], [], [], 1, [("sampling", 1e9), ("training", 2e9)], [(1e9, 1e9)], [],
                           reads=[("sampling", 5e8)], kernels=[("sampling", kernel_s)])
    assert f"The floor, each phase at the slowest of these: {floor} s per step." in capsys.readouterr().out

def test_bench_mopd_ours_runs(capsys):
    import bench_mopd
    out = bench_mopd.main(TINY + ["--prompts=3", "--variants=pg:2,reverse_kl:0"])
    assert len(out) == 2 and all(v > 0 for v in out.values())
    text = capsys.readouterr().out
    assert "loss=pg, exact-KL metric on 2 rows" in text and "loss=reverse_kl, no exact-KL metric" in text


@pytest.mark.parametrize("script,argv,line", [
    ("bench_mopd", ["--variants=pg:x"], "--variants=pg:x: expected LOSS:ROWS,... with LOSS in pg,reverse_kl"),
    ("bench_rl", ["--n=0"], "--n=0: must be > 0"),
    ("bench_rl", ["--skip_trl=maybe"], "--skip_trl=maybe: expected a value of type bool (true or false)"),
    ("bench_kl", ["--tokens", "0"], "--tokens=0: must be >= 1"),
    ("ab_generate", ["--decode_gemm=packed,fast"], "--decode_gemm=packed,fast: expected A,B with each one of "
                                                   "packed, w_xt, auto"),
    ("ab_generate", ["--decode_gemm=packed,auto", "--cases=300:5"], "--cases=300:5: expected "
                                                                   "VOCAB:ROWS:NEW_TOKENS,... of positive integers"),
    ("bench_sampling", ["--repeat=2"], "--repeat: unknown config key (did you mean --repeats?); "
                                       "python bench/bench_sampling.py --help lists the keys"),
])
def test_bad_bench_options_are_one_line_exit_2(script, argv, line, capsys):
    import importlib
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        config.cli(lambda: mod.main(argv))
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == ["error: " + line]


def test_ab_generate_of_decode_gemm_choices_draws_the_same_tokens(capsys, monkeypatch):
    """bench/ab_generate.py --decode_gemm: this checkout's generate with the packed sgemm against
    decode_gemm's per-shape choice, which is bit-equal by construction: the same tokens and
    log-probs exactly, whatever the timing chose; the caller's DECODE_GEMM is left as it was."""
    import ab_generate
    import model
    monkeypatch.setattr(model, "DECODE_GEMM", "w_xt")
    out = ab_generate.main(["--decode_gemm=packed,auto", "--cases=300:5:6,500:16:4", "--repeats=1", "--threads=1"])
    assert model.DECODE_GEMM == "w_xt"
    assert [o[0] for o in out] == ["V=300 rows=5 new tokens=6", "V=500 rows=16 new tokens=4"]
    assert all(same and dlp == 0 for _, _, _, same, dlp in out)
    assert "A (packed)" in capsys.readouterr().out


def test_even_reward_reads_token_parity():
    import bench_rl
    tok = bench_rl.tokenizer(64)
    ids = [3, 4, 5, 6, 10]
    text = tok.decode(ids, skip_special_tokens=True)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert bench_rl.even_fraction(text) == 3 / 5


def test_char_tokenizer_covers_a_262k_vocabulary():
    """--vocab up to Gemma's 262,144: every id is one character that encodes back to itself
    (the UTF-16 surrogates, which are not characters, are skipped) and keeps its parity."""
    import bench_rl
    V = 262_144
    ids = list(range(3, V))
    text = "".join(bench_rl.char_of(i) for i in ids)
    assert len(text) == len(ids) and all(ord(bench_rl.char_of(i)) % 2 == i % 2 for i in (3, 4, 35326, 35327, V - 1))
    tok = bench_rl.tokenizer(V)
    assert len(tok) == V
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == text


def test_gpu_check_logic_runs_on_a_cpu(capsys):
    """bench/gpu_check.py's rows that have a CPU path (the bf16 sampler head and cached decode, the
    sampler against transformers) pass on a CPU at small shapes; the CUDA-only ones say skipped."""
    import gpu_check
    rows = gpu_check.main(["--device=cpu", "--small=true", "--only=head"]) + \
        gpu_check.main(["--device=cpu", "--small=true", "--only=sampler"]) + \
        gpu_check.main(["--device=cpu", "--small=true", "--only=fsdp"]) + \
        gpu_check.main(["--device=cpu", "--small=true", "--only=gemm"])
    status = {name.split(" ")[0]: ok for name, ok, _, _ in rows}
    assert status == {"head_logits": True, "sampler": True, "fsdp": "skipped", "lm-head": "skipped"}, rows
    assert "| head_logits bf16 + cached GQA decode | ok |" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["bench_rl", "bench_mopd"])
def test_bench_without_trl_says_how_to_install_it(script, monkeypatch, capsys):
    """TRL is the benches' peer, not a dependency of the project: where it is missing, one line
    names the requirements file (and --skip_trl), exit 2, before any step is timed."""
    import importlib
    import importlib.util
    mod = importlib.import_module(script)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    argv = [a for a in TINY if a != "--skip_trl"] + ["--prompts=2"]
    with pytest.raises(SystemExit) as e:
        config.cli(lambda: mod.main(argv))
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [
        "error: TRL is not installed: pip install -r requirements-bench.txt, or --skip_trl to time ours only"]


class _Kernels(__import__("torch").utils._python_dispatch.TorchDispatchMode):
    """Records the GEMM and attention ops that run under it, with their input shapes."""
    NAMES = ("aten.mm", "aten.addmm", "aten.matmul", "aten.linear", "mkl._mkl_linear", "aten.scaled_dot_product_attention")

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch
        name = str(func.overloadpacket)
        if name.startswith(self.NAMES):
            self.calls.append((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form,rows", [("packed", 5), ("w_xt", 5), ("auto", 1)])
def test_kernels_alone_replays_a_decode_steps_gemms_and_attention(form, rows, monkeypatch):
    """bench_sampling's floor (kernels_alone) times step_kernels: the same GEMMs (ops, shapes)
    and attention calls as a real decode step, each GEMM form (w_xt's blocks, a partial last
    one here) and one row (nothing packed, rollout.head_logits); its time covers every step."""
    import torch
    import bench_sampling
    import model as model_mod
    from model import KVCache, ModelConfig, Transformer
    from rollout import decode_step
    monkeypatch.setattr(model_mod, "DECODE_GEMM", form)
    monkeypatch.setattr(model_mod, "W_XT_BLOCK", 48)  # the lm_head (V = 100) in 3 blocks, the last partial
    cfg = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    used, slots = 7, 12
    with torch.inference_mode(), m.inference_weights(rows=rows):
        cache = KVCache(cfg, rows, slots, torch.float32, "cpu")
        cache.lengths = torch.full((rows,), used - 1)
        with _Kernels() as real:
            decode_step(m, torch.randint(0, 100, (rows,)), torch.full((rows,), used - 1), cache)
        gemms, attention = bench_sampling.step_kernels(m, rows, used, slots)
        with _Kernels() as replay:
            for f in gemms + attention:
                f()
    assert len(real.calls) >= 4 * cfg.num_layers + 1 + cfg.num_layers
    assert sorted(replay.calls) == sorted(real.calls)
    prompts = [[1, 2, 3]] * rows
    t, t_gemm, t_attn = bench_sampling.kernels_alone(m, prompts, n_new=4, flops=1e15, repeats=3)
    assert t_gemm > 0 and t_attn > 0 and t >= 3 * (t_gemm + t_attn)  # n_new - 1 decode steps


def test_target_lines_say_met_or_missed_and_whether_the_floor_allows_it():
    import bench_sampling
    row = lambda case, impl, ratio, flop: dict(case=case, impl=impl, ratio=ratio, flop=flop)  # noqa: E731
    tiny, smol = "tiny Qwen3, B=64", "SmolLM2-135M fp32, B=16"
    rows = [row(tiny, "transformers", 1.0, 0.1), row(tiny, "ours", 1.5, 0.2),
            row(tiny, "ours, compiled decode step", 1.6, 0.25), row(tiny, "kernels alone (a floor)", 2.4, 0.4),
            row(smol, "transformers", 1.0, 0.16), row(smol, "ours", 2.0, 0.41),
            row(smol, "kernels alone (a floor)", 3.0, 0.6)]
    assert bench_sampling.target_lines(rows) == [
        "Target tiny Qwen3, B=64 >= 3x transformers: missed (at 53% of the goal), best 1.60x "
        "(ours, compiled decode step); the kernels alone allow 2.40x: out of reach on this machine",
        "Target SmolLM2-135M fp32, B=16 >= 40% of the FLOP limit: met, best 41.0% (ours); "
        "the kernels alone allow 60.0%: within reach"]
    assert bench_sampling.target_lines(rows[:4])[0].startswith("Target tiny")  # a case not run: no line
    assert len(bench_sampling.target_lines(rows[:4])) == 1
