"""The shared policy-gradient update (mopd.py) and train_teacher_rl.py end to end."""
import json

import pytest
import torch
from conftest import killed_after_step

from mopd import aggregate, group_advantages, k3_kl, pg_token_loss


def test_group_advantages():
    r = [1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1]  # 3 groups of 4
    a = group_advantages(r, 4)
    g0 = torch.tensor([1., 0, 0, 1])
    assert torch.allclose(a[:4], (g0 - 0.5) / (g0.std() + 1e-6))
    assert torch.equal(a[4:8], torch.zeros(4))  # all-equal group: zero signal, row kept
    assert torch.allclose(group_advantages(r, 4, std_norm=False)[8:], torch.tensor([-.25, -.25, -.25, .75]))


def _one_token(z, y):
    return torch.log_softmax(z, -1)[y]


def test_pg_gradient_on_policy_is_reinforce():
    """ratio == 1: grad of the surrogate is -A * grad log pi(y) = -A * (onehot(y) - softmax(z))."""
    z = torch.tensor([0.3, -1.2, 0.8, 0.1], requires_grad=True)
    y, A = 2, 1.7
    logp = _one_token(z, y).view(1, 1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for mode, lo, hi in (("clip", 0.2, 0.28), ("band", 0.5, 2.0)):
        z.grad = None
        loss, frac = pg_token_loss(logp, logp.detach(), torch.tensor([[A]]), mask, mode, lo, hi)
        loss.sum().backward(retain_graph=True)
        expected = -A * (torch.nn.functional.one_hot(torch.tensor(y), 4) - torch.softmax(z.detach(), -1))
        assert torch.allclose(z.grad, expected, atol=1e-6), mode
        assert frac.item() == 0


def test_pg_clip_and_band_cut_the_gradient():
    z = torch.tensor([0.3, -1.2, 0.8, 0.1], requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    one = torch.tensor([[1.0]])

    def grad(old_shift, mode, lo, hi):
        z.grad = None
        logp = _one_token(z, 2).view(1, 1)
        loss, frac = pg_token_loss(logp, logp.detach() - old_shift, one, mask, mode, lo, hi)
        loss.sum().backward()
        return z.grad.clone(), frac.item()
    # ratio = e^0.5 = 1.65: above 1 + eps_high (clipped, A > 0), inside the (0.5, 2) band
    g, frac = grad(0.5, "clip", 0.2, 0.28)
    assert g.abs().max() == 0 and frac == 1
    g, frac = grad(0.5, "band", 0.5, 2.0)
    expected = -torch.exp(torch.tensor(0.5)) * (torch.nn.functional.one_hot(torch.tensor(2), 4)
                                                - torch.softmax(z.detach(), -1))
    assert torch.allclose(g, expected, atol=1e-6) and frac == 0  # w = sg[ratio] inside the band
    g, frac = grad(1.0, "band", 0.5, 2.0)  # ratio e^1 = 2.7: outside the band, dropped
    assert g.abs().max() == 0 and frac == 1


def test_moe_router_balancing_loss_is_trained(hf_dirs):
    """pg_update adds the router's load-balancing loss: with zero advantages only it moves the router."""
    from types import SimpleNamespace

    from model import Transformer
    from mopd import pg_update
    cfg = SimpleNamespace(temperature=1.0, ratio_mode="clip", eps_low=0.2, eps_high=0.28, loss_agg="token-mean",
                          kl_coef=0.0, max_new_tokens=8)
    tokens = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, 4:] = True
    for arch, moved in (("qwen3_moe", True), ("qwen3", False)):
        m = Transformer.from_pretrained(hf_dirs[arch]).train()
        batch = {"tokens": tokens, "mask": mask, "old_logp": torch.zeros(4, 9)}
        pg_update(m, batch, lambda r, logp, w: torch.zeros_like(logp), cfg, micro_batch=3)
        grads = [p.grad.abs().sum().item() for p in m.parameters() if p.grad is not None]
        assert (sum(grads) > 0) == moved, arch
        if moved:
            assert m.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_aggregation_modes():
    loss = torch.tensor([[1., 2., 3., 0.], [4., 0., 0., 0.]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx(10 / (4 * 2))
    with pytest.raises(ValueError, match="loss_agg='nope'"):
        aggregate(loss, mask, "nope")


def test_k3_is_nonnegative_and_zero_on_equal():
    a, b = torch.randn(100), torch.randn(100)
    assert (k3_kl(a, b) >= 0).all() and torch.equal(k3_kl(a, a), torch.zeros(100))


# ---- the script, end to end on a tiny S0 --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    import train_sft
    out = str(tmp_path_factory.mktemp("rl") / "base")
    train_sft.main(["--preset=tiny", f"--out_dir={out}", "--domains=rev,sort", "--steps=10"])
    return out


def _weights(d):
    from model import Transformer
    return Transformer.from_pretrained(d).state_dict()


def test_rl_runs_and_logs(tiny_base, tmp_path):
    import train_teacher_rl
    out = str(tmp_path / "t")
    train_teacher_rl.main(["--preset=tiny", f"--init={tiny_base}", f"--out_dir={out}", "--domains=rev,sort",
                           "--kl_coef=0.01"])
    rows = [json.loads(l) for l in open(out + ".log/metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert set(rows[-1]["eval"]) == {"rev", "sort"}
    # sampler and trainer compute the same log-probs: the importance weight is 1, up to two fp32
    # evaluations (KV cache vs one forward) of log-probs of a few units each: ~1e-6 per token at
    # worst (measured: mean |ratio - 1| ~1e-7). A trainer temperature off by 0.1% moves the mean
    # by ~2e-5, 1% by ~2e-4 (a bound of 1e-4 would miss the first)
    assert all(abs(r["ratio_mean"] - 1) < 1e-5 for r in rows)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoTokenizer.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out)  # the teacher is an ordinary HF directory


def test_rl_resume_is_bit_identical(tiny_base, tmp_path, monkeypatch):
    """Kill a run after step 2, resume it: the same weights and losses as the run never killed."""
    import tasks
    import train_teacher_rl
    # the tiny S0 never answers right; a reward on the response's length gives real updates
    monkeypatch.setattr(tasks, "toy_reward", lambda response, ex: float(len(response) % 2))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--preset=tiny", f"--init={tiny_base}", "--domains=rev", "--steps=4"]
    train_teacher_rl.main(common + [f"--out_dir={a}"])
    with killed_after_step(2):
        train_teacher_rl.main(common + [f"--out_dir={b}"])
    train_teacher_rl.main(common + [f"--out_dir={b}", "--resume=true"])
    wa, wb, w0 = _weights(a), _weights(b), _weights(tiny_base)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], w0[k]) for k in wa)  # the updates were not no-ops
    la = [json.loads(l) for l in open(a + ".log/metrics.jsonl")]
    lb = [json.loads(l) for l in open(b + ".log/metrics.jsonl")]
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_recovers_a_checkpoint_left_in_staging(tiny_base, tmp_path):
    """A crash between replace_dir's two renames leaves only OUT_DIR.staging: resume uses it."""
    import os

    import train_teacher_rl
    out = str(tmp_path / "r")
    common = ["--preset=tiny", f"--init={tiny_base}", "--domains=rev", f"--out_dir={out}"]
    train_teacher_rl.main(common + ["--steps=2"])
    os.rename(out, out + ".staging")
    train_teacher_rl.main(common + ["--steps=3", "--resume=true", "--resume_override=steps"])
    assert [json.loads(l)["step"] for l in open(out + ".log/metrics.jsonl")] == [1, 2, 3]
    assert torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)["step"] == 3


def test_bad_config_is_a_clear_error(tiny_base, tmp_path):
    import train_teacher_rl
    with pytest.raises(SystemExit, match="FSDP options: run under torchrun"):
        train_teacher_rl.main([f"--init={tiny_base}", "--bf16=true"])
    with pytest.raises(ValueError, match="--stepz: unknown config key"):
        train_teacher_rl.main(["--stepz=3"])
    with pytest.raises(ValueError, match="--steps=abc: expected a value of type int"):
        train_teacher_rl.main(["--steps=abc"])
    with pytest.raises(ValueError, match="unknown domain 'nope'; toy domains: rev, sort"):
        train_teacher_rl.main([f"--init={tiny_base}", "--domains=nope", f"--out_dir={tmp_path}/o"])


@pytest.mark.parametrize("script,args,match", [
    # eps_* are distances from 1 under clip but the band's ends under band: clip's defaults
    # as a band would drop every token with ratio ~1, zeroing every gradient
    ("rl", ["--ratio_mode=band"], r"--ratio_mode=band .* needs eps_low < 1 < eps_high .* got --eps_low=0.2 --eps_high=0.28"),
    ("mopd", ["--eps_low=1.2"], r"needs eps_low < 1 < eps_high .* got --eps_low=1.2 --eps_high=2.0"),
    ("rl", ["--eps_low=0"], r"--ratio_mode=clip .* got --eps_low=0.0 --eps_high=0.28"),
    ("rl", ["--eps_high=-1"], r"--ratio_mode=clip .* got --eps_low=0.2 --eps_high=-1.0"),
    ("rl", ["--ratio_mode=ppo"], r"--ratio_mode=ppo: must be one of clip, band"),
    ("mopd", ["--loss_agg=mean"], r"--loss_agg=mean: must be one of token-mean, seq-mean-token-mean"),
    ("rl", ["--temperature=0"], r"--temperature=0.0: must be > 0"),
    ("mopd", ["--top_p=0"], r"--top_p=0.0: must be in \(0, 1\]"),
    ("rl", ["--n=1"], r"--n=1: GRPO needs >= 2 samples per prompt"),
])
def test_objective_traps_are_refused_before_step_1(script, args, match):
    import train_mopd
    import train_teacher_rl
    main = {"rl": train_teacher_rl.main, "mopd": train_mopd.main}[script]
    with pytest.raises(ValueError, match=match):
        main(args + ["--init=/nonexistent"])  # refused before the checkpoint is even looked at
    # the defaults of each script pass the same checks (they fail later, at the missing --init)
    with pytest.raises(SystemExit, match="--init=/nonexistent: no such checkpoint"):
        main(["--init=/nonexistent"])


def test_a_config_trap_is_one_line_and_exit_2():
    import os
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "train_teacher_rl.py", "--ratio_mode=band"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: --ratio_mode=band keeps tokens with eps_low <= pi/mu <= eps_high, so it needs eps_low < 1 < eps_high "
        "(e.g. 0.5 and 2.0); got --eps_low=0.2 --eps_high=0.28"]


def test_k3_penalty_reaches_the_gradient(hf_dirs):
    """pg_update(kl_coef=c) with zero advantages: the gradient is exactly that of
    c * token-mean(k3(logp, ref_logp)); with c = 0 it is zero (a dead KL term would pass
    every end-to-end run, whose rewards dominate)."""
    from types import SimpleNamespace

    from model import Transformer
    from mopd import pg_update, policy_logprobs
    cfg = SimpleNamespace(temperature=1.0, ratio_mode="clip", eps_low=0.2, eps_high=0.28, loss_agg="token-mean",
                          max_new_tokens=8)
    tokens = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, 4:] = True
    m = Transformer.from_pretrained(hf_dirs["qwen3"]).train()
    with torch.no_grad():
        logp0 = policy_logprobs(m, tokens, mask)
    ref = logp0 + torch.linspace(-0.5, 0.5, 9)  # the reference disagrees, by token
    batch = {"tokens": tokens, "mask": mask, "old_logp": logp0, "ref_logp": ref}

    def grads(c):
        m.zero_grad(set_to_none=False)
        out = pg_update(m, batch, lambda r, logp, w: torch.zeros_like(logp), cfg, micro_batch=3, kl_coef=c)
        return [p.grad.clone() for p in m.parameters()], out
    g0, _ = grads(0.0)
    assert all(g.abs().max() == 0 for g in g0)
    g, out = grads(0.5)
    m.zero_grad(set_to_none=False)
    logp = policy_logprobs(m, tokens, mask)
    (0.5 * (k3_kl(logp, ref) * mask).sum() / mask.sum()).backward()
    want = [p.grad.clone() for p in m.parameters()]
    for a, b in zip(g, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(a.abs().max() > 0 for a in g) and out["kl"] > 0


@pytest.mark.parametrize("packed", [0, 20])
@pytest.mark.parametrize("ratio_mode,eps_low,eps_high", [("clip", 0.2, 0.28), ("band", 0.5, 2.0)])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_pg_update_is_the_gradient_of_the_batch_loss(ratio_mode, eps_low, eps_high, loss_agg, packed, monkeypatch):
    """pg_update (the loss fused into the log-prob kernel, micro-batch by micro-batch, padding
    trimmed) gives the gradient of the plain whole-batch loss: MOPD's advantage, which depends
    on log pi_theta, ratios on both sides of the clip / band, a k3 penalty, rows of different
    lengths; packed: rows grouped by length into micro-batches of <= 20 padded tokens
    (micro_batch_tokens; here [0], [2, 4], [1, 3]: non-contiguous rows). The truth is the plain loss on a float64 copy of the model; ours may miss it by
    twice what the plain loss in fp32 does (tests/test_kernels.py's errors())."""
    from types import SimpleNamespace

    from test_kernels import check
    import vocab_kernels as kernels
    from model import ModelConfig, Transformer
    from mopd import mopd_advantage, pg_update
    mcfg = ModelConfig(arch="qwen3", vocab_size=256, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=8)
    cfg = SimpleNamespace(temperature=0.9, ratio_mode=ratio_mode, eps_low=eps_low, eps_high=eps_high,
                          loss_agg=loss_agg, max_new_tokens=8, micro_batch_tokens=packed)
    g = torch.Generator().manual_seed(5)
    R, L = 5, 12
    tokens = torch.randint(0, 256, (R, L), generator=g)
    mask = torch.zeros(R, L - 1, dtype=torch.bool)
    for r, n in enumerate((8, 3, 6, 1, 5)):  # response lengths; rows are right-padded
        mask[r, 3:3 + n] = True
    models = {dt: Transformer(mcfg).init_weights(seed=0).to(dt).train() for dt in (torch.float64, torch.float32)}
    with torch.no_grad():
        m = models[torch.float64]
        lp0 = kernels.token_logprobs_ref(m(tokens[:, :-1], return_hidden=True), m.lm_head_weight, tokens[:, 1:],
                                         cfg.temperature, mask).float()
    old = lp0 + torch.randn(R, L - 1, generator=g) * 0.6 * mask  # off-policy: ratios from ~0.3 to ~3
    t_logp = lp0 + torch.randn(R, L - 1, generator=g) * 2 * mask  # the teacher, sometimes past the clip of 5
    ref = lp0 + torch.randn(R, L - 1, generator=g) * 0.5 * mask
    kl_coef = 0.3

    def plain(model):
        dt = next(model.parameters()).dtype
        o, t, rf = old.to(dt), t_logp.to(dt), ref.to(dt)
        lp = kernels.token_logprobs_ref(model(tokens[:, :-1], return_hidden=True), model.lm_head_weight,
                                        tokens[:, 1:], cfg.temperature, mask)
        adv = mopd_advantage(t, lp, 5.0)[0]
        tl = pg_token_loss(lp, o, adv, mask, ratio_mode, eps_low, eps_high)[0] + kl_coef * k3_kl(lp, rf) * mask
        # the three aggregations, written out (not through mopd.aggregate)
        if loss_agg == "token-mean":
            loss = tl.sum() / mask.sum()
        elif loss_agg == "seq-mean-token-mean":
            loss = (tl.sum(1) / mask.sum(1)).mean()
        else:
            loss = tl.sum() / (cfg.max_new_tokens * R)
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))], lp.detach()
    (truth, lp64), (fp32, _) = plain(models[torch.float64]), plain(models[torch.float32])
    model = models[torch.float32]
    model.zero_grad(set_to_none=True)
    batch = {"tokens": tokens, "mask": mask, "old_logp": old, "ref_logp": ref}
    monkeypatch.setattr(kernels, "auto_chunk_size", lambda *a, **k: 3)  # several chunks per micro-batch
    logp = torch.zeros(R, L - 1)
    out = pg_update(model, batch, lambda r, logp, w: mopd_advantage(t_logp[r, :w], logp, 5.0)[0], cfg,
                    micro_batch=2, kl_coef=kl_coef, logp_out=logp)
    ours = [torch.tensor(out["loss"])] + [p.grad for p in model.parameters()]
    check(ours, (truth, fp32), mcfg.vocab_size)
    assert 0 < out["clip_frac"] < 1 and out["kl"] > 0  # both sides of the trust region were exercised
    torch.testing.assert_close(logp, lp64.float(), rtol=0, atol=1e-5)  # logp_out: log pi_theta, every row
    if packed:
        from mopd import micro_batches
        assert [g.tolist() for g in micro_batches(mask, 2, packed)] == [[0], [2, 4], [1, 3]]


def test_micro_batches_pack_rows_by_length_within_the_budget():
    from mopd import micro_batches
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(40, 99, dtype=torch.bool)
    for r, n in enumerate(torch.randint(1, 90, (40,), generator=g).tolist()):
        mask[r, 8:8 + n] = True
    mask[7] = False  # a row with no response token
    width = lambda rows: int(mask[rows].any(0).nonzero().max()) + 2 if mask[rows].any() else 2  # noqa: E731
    for budget, cap in [(300, 64), (1000, 64), (1000, 3), (50, 64)]:
        groups = micro_batches(mask, cap, budget)
        assert sorted(r for grp in groups for r in grp.tolist()) == list(range(40))  # each row once
        for grp in groups:
            assert len(grp) <= cap and (len(grp) == 1 or len(grp) * width(grp) <= budget), (budget, grp)
        if budget == 1000 and cap == 64:
            assert len(groups) < 40 // 3  # packed: far fewer passes than rows
    assert micro_batches(mask, 16, 0) == [slice(0, 16), slice(16, 32), slice(32, 40)]


def test_reference_log_probs_run_in_micro_batches(tiny_base, monkeypatch):
    """RL's KL reference pass takes micro_batch rows per forward; the chunks equal one forward."""
    import mopd
    import train_teacher_rl
    from model import Transformer
    ref = Transformer.from_pretrained(tiny_base).eval()
    sizes, seen, real = [], {}, train_teacher_rl.policy_logprobs

    def spy(model, tokens, *a, **k):
        if model is ref:
            sizes.append(len(tokens))
        return real(model, tokens, *a, **k)

    def update_spy(model, batch, *a, **k):
        seen["batch"] = batch
        return mopd.pg_update(model, batch, *a, **k)
    monkeypatch.setattr(train_teacher_rl, "policy_logprobs", spy)
    monkeypatch.setattr(train_teacher_rl, "pg_update", update_spy)
    from tasks import get_domains
    from transformers import AutoTokenizer
    cfg = train_teacher_rl.Config(init=tiny_base, domains="rev", prompts_per_step=3, n=2, max_new_tokens=6,
                                  micro_batch=4, kl_coef=0.01)
    model = Transformer.from_pretrained(tiny_base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    train_teacher_rl.rl_step(model, opt, AutoTokenizer.from_pretrained(tiny_base), get_domains("rev"), [1.0],
                             cfg, 0, ref)
    assert sizes == [4, 2]  # 6 rows, micro_batch 4
    b = seen["batch"]
    with torch.no_grad():
        whole = real(ref, b["tokens"], b["mask"], cfg.temperature)
    torch.testing.assert_close(b["ref_logp"], whole, rtol=0, atol=1e-5)  # fp32 rounding of a smaller matmul
    assert (b["ref_logp"] != 0).sum() == b["mask"].sum()


def test_trainers_adamw_is_fused_and_the_same_update(hf_dirs):
    """train_utils.adamw, every trainer's optimizer: fused on one process's CPU model, and its
    steps are torch's default AdamW's to fp32 rounding (weight decay, both betas, several steps)."""
    import copy
    from model import Transformer
    from train_utils import adamw
    a = Transformer.from_pretrained(hf_dirs["qwen3"])
    b = copy.deepcopy(a)
    opt_a = adamw(a, 1e-2, 0.1, betas=(0.9, 0.99))
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), foreach=True)
    assert opt_a.defaults["fused"] is True
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    moved = 0.0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), Transformer.from_pretrained(hf_dirs["qwen3"]).parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (pa - p0).abs().max().item())
    assert moved > 1e-2  # the steps did move the weights (lr 1e-2, 3 steps)
