"""What a run shows while it works (issue 12): the one line per step (checkpoint.readout), the
fraction of GRPO groups without signal and the warning after NO_SIGNAL_STEPS such steps, the
teachers' time in score_s for every MOPD loss, and the progress bars (rollout.show_progress)."""
import json
import time

import pytest

import checkpoint


def _rows(out):
    return [json.loads(l) for l in open(out + ".log/metrics.jsonl")]


def _step_lines(text):
    return [l for l in text.splitlines() if l.startswith("step ")]


# ---- the line ---------------------------------------------------------------------------------

def test_readout_formats_each_kind_of_row():
    rl = {"step": 3, "time": 254.2, "reward": 0.265, "reward_by_domain": {"arith": 0.31, "if": 0.22},
          "no_signal_frac": 0.25, "loss": -0.0123, "ratio_mean": 1.0, "response_len": 187.25, "sample_s": 41.23,
          "reward_s": 0.3124, "update_s": 12.34, "eval_s": 180.4, "eval": {"arith": 0.3, "if": 0.21}}
    assert checkpoint.readout(rl, 300, ("reward", "no_signal_frac", "loss", "ratio_mean")) == (
        "step 3/300: reward 0.265 (arith=0.310 if=0.220) no_signal_frac 0.25 loss -0.0123 ratio_mean 1.0000 "
        "len 187.2 | time sample 41.2s reward 0.312s update 12.3s eval 180s | eval arith=0.300 if=0.210 (254s)")
    # MOPD: per-domain metrics under by_domain; the exact KL of one domain only (the other had no rows)
    mopd = {"step": 1, "time": 3.0, "reward": 0.5, "kl_est": 0.25, "loss": 0.1, "response_len": 8.0,
            "by_domain": {"rev": {"reward": 1.0, "kl_est": 0.2, "kl_exact": 0.3}, "sort": {"reward": 0.0, "kl_est": 0.3}},
            "sample_s": 1.0, "score_s": 2.0, "update_s": 3.0, "exact_kl_s": 0.5}
    assert checkpoint.readout(mopd, 10, ("reward", "kl_est", "kl_exact", "no_signal_frac", "loss")) == (
        "step 1/10: reward 0.500 (rev=1.000 sort=0.000) kl_est 0.2500 (rev=0.2000 sort=0.3000) kl_exact (rev=0.3000) "
        "loss 0.1000 len 8.0 | time sample 1.0s score 2.0s update 3.0s exact_kl 0.500s (3s)")
    one = {"step": 2, "time": 1.0, "kl_est": 0.25, "by_domain": {"rev": {"kl_est": 0.25, "kl_exact": 0.3}}}
    assert checkpoint.readout(one, 2, ("kl_est", "kl_exact")) == "step 2/2: kl_est 0.2500 kl_exact 0.3000 (1s)"


def test_rl_step_line_has_per_domain_rewards_and_phase_times(toy, tmp_path, capsys, monkeypatch):
    import tasks
    import train_teacher_rl
    monkeypatch.setattr(tasks, "toy_reward", lambda response, ex: float(len(response) % 2))  # rewards that vary
    out = str(tmp_path / "rl")
    train_teacher_rl.main(["--preset=tiny", f"--init={toy['base']}", f"--out_dir={out}", "--domains=rev,sort"])
    lines, rows = _step_lines(capsys.readouterr().out), _rows(out)
    assert len(lines) == len(rows) == 3
    for line, r in zip(lines, rows):
        assert set(r["reward_by_domain"]) == {"rev", "sort"}, r  # both domains drawn (seed 0), else this tests less
        per = " ".join(f"{d}={v:.3f}" for d, v in r["reward_by_domain"].items())
        assert f"step {r['step']}/3: reward {r['reward']:.3f} ({per}) no_signal_frac {r['no_signal_frac']:.2f} " in line
        assert f" len {r['response_len']:.1f} | time sample " in line
        for k in ("sample_s", "reward_s", "update_s") + (("eval_s",) if "eval" in r else ()):
            assert r[k] >= 0 and f" {k[:-2]} {checkpoint._seconds(r[k])}" in line, (k, line)
        assert ("| eval rev=" in line) == ("eval" in r)
        assert {"loss", "reward", "sample_s", "step_s", "tokens_per_s", "samples"} <= set(r)  # kept as before


# ---- GRPO groups without signal ----------------------------------------------------------------

def test_no_signal_frac_counts_all_equal_groups():
    from train_teacher_rl import no_signal_frac
    rewards = [1, 0, 0, 1,  1, 1, 1, 1,  0, 0, 0, 0,  0.5, 0.5, 0.5, 0.5,  0, 0, 0, 0.5]
    assert no_signal_frac(rewards, 4) == 3 / 5
    assert no_signal_frac(rewards, 2) == 7 / 10  # pairs: (1,0) (0,1) ... (0,0.5): three of ten differ
    assert no_signal_frac([0.0] * 8, 4) == 1.0 and no_signal_frac([0.0, 1.0] * 4, 4) == 0.0


def test_no_signal_warning_after_three_flat_steps_and_not_before(toy, tmp_path, capsys, monkeypatch):
    """Steps 1, 2 flat, 3 with signal, 4-7 flat: one warning, right after step 6's line."""
    import train_teacher_rl
    real = train_teacher_rl.sample_and_reward
    flat = {1: True, 2: True, 3: False, 4: True, 5: True, 6: True, 7: True}

    def rewards_of_step(model, tok, domains, weights, cfg, step, engine=None):
        roll, rows, rewards, t = real(model, tok, domains, weights, cfg, step, engine)
        rewards = [0.0] * len(rewards) if flat[step + 1] else [float(i == 0) for i in range(len(rewards))]
        return roll, rows, rewards, t
    monkeypatch.setattr(train_teacher_rl, "sample_and_reward", rewards_of_step)
    out = str(tmp_path / "rl")
    train_teacher_rl.main(["--preset=tiny", f"--init={toy['base']}", f"--out_dir={out}", "--domains=rev",
                           "--steps=7", "--eval_every=1000", "--ckpt_every=1000"])
    assert [r["no_signal_frac"] for r in _rows(out)] == [1, 1, 0.75, 1, 1, 1, 1]  # 4 groups of 4
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(("step ", "warning"))]
    warned = [i for i, l in enumerate(lines) if l.startswith("warning")]
    assert len(warned) == 1 and lines[warned[0] - 1].startswith("step 6/7:"), lines
    assert lines[warned[0]] == train_teacher_rl.no_signal_warning(3, 4)
    assert "--n" in lines[warned[0]] and "--temperature" in lines[warned[0]]


# ---- the teachers' time: score_s, for every loss ------------------------------------------------

SLOW = 0.5  # seconds added to every teacher forward


@pytest.mark.parametrize("loss", ["pg", "topk", "reverse_kl", "forward_kl", "jsd"])
def test_teacher_time_is_score_s_not_update_s_for_every_loss(loss, toy, tmp_path, capsys, monkeypatch):
    """Every teacher forward takes SLOW seconds more: score_s holds all of those of the loss (for
    pg before the update, for the others inside mopd.distill_update), update_s none, exact_kl_s
    those of the exact-KL metric; the step's line shows them, and the per-domain metrics."""
    import teachers as teachers_mod
    import train_mopd
    calls, in_exact = {"loss": 0, "exact": 0}, [False]
    real_load, real_exact = teachers_mod.load_frozen, train_mopd.exact_reverse_kl

    def slow_load(*a, **k):
        m = real_load(*a, **k)
        forward = m.forward

        def slow_forward(*a, **k):
            time.sleep(SLOW)
            calls["exact" if in_exact[0] else "loss"] += 1
            return forward(*a, **k)
        m.forward = slow_forward
        return m

    def exact_spy(*a, **k):
        in_exact[0] = True
        try:
            return real_exact(*a, **k)
        finally:
            in_exact[0] = False
    monkeypatch.setattr(teachers_mod, "load_frozen", slow_load)
    monkeypatch.setattr(train_mopd, "exact_reverse_kl", exact_spy)
    out = str(tmp_path / "m")
    train_mopd.main(["--preset=tiny", f"--init={toy['base']}", f"--out_dir={out}", "--domains=rev,sort",
                     f"--teacher=rev={toy['rev']},sort={toy['sort']}", f"--loss={loss}", "--topk=8", "--steps=1",
                     "--eval_every=1000"])
    (r,) = _rows(out)
    assert calls["loss"] == 2 and calls["exact"] == 2, calls  # one forward per domain for each
    assert SLOW * 2 <= r["score_s"] < SLOW * 3, r  # the loss's teacher forwards, not the exact KL's
    assert r["update_s"] < SLOW, r  # the update without its teacher forwards
    assert r["exact_kl_s"] >= SLOW * 2, r
    (line,) = _step_lines(capsys.readouterr().out)
    for k in ("reward", "kl_est", "kl_exact"):
        per = " ".join(f"{d}={m[k]:{'.3f' if k == 'reward' else '.4f'}}" for d, m in r["by_domain"].items())
        assert len(r["by_domain"]) == 2 and f" ({per})" in line, (k, line)
    assert f" score {r['score_s']:.1f}s update {checkpoint._seconds(r['update_s'])} exact_kl " in line, line


def test_orm_groups_without_signal_are_logged(toy, tmp_path):
    import train_mopd
    out = str(tmp_path / "m")
    train_mopd.main(["--preset=tiny", f"--init={toy['base']}", f"--out_dir={out}", "--domains=rev,sort",
                     f"--teacher=rev={toy['rev']},sort={toy['sort']}", "--n=2", "--orm_alpha=0.5", "--steps=1",
                     "--eval_every=1000", "--exact_kl_rows=0"])
    (r,) = _rows(out)
    assert 0 <= r["no_signal_frac"] <= 1 and "kl_exact" not in r["by_domain"]["rev"]

# ---- progress bars ---------------------------------------------------------------------------


def test_progress_bars_only_on_a_terminal_or_when_forced(toy, capsys, monkeypatch):
    """Under pytest stderr is not a terminal: no bar (a log file stays clean); MOPD_PROGRESS=1
    draws the eval and sampling bars on stderr, MOPD_PROGRESS=0 none."""
    from evaluate import evaluate
    from model import Transformer
    from rollout import show_progress
    from tasks import get_domains
    tok, model = checkpoint.load_tokenizer(toy["base"]), Transformer.from_pretrained(toy["base"])
    domains = get_domains("rev,sort")
    for env, shown in ((None, False), ("1", True), ("0", False)):
        if env is None:
            monkeypatch.delenv("MOPD_PROGRESS", raising=False)
        else:
            monkeypatch.setenv("MOPD_PROGRESS", env)
        capsys.readouterr()
        evaluate(model, tok, domains, 8, limit=4)
        err = capsys.readouterr().err
        assert show_progress() == shown and ("eval:" in err and "sampling:" in err) == shown, (env, err)
        assert shown or err == ""
