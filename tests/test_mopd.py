"""MOPD: the objective's forms, teacher routing/validation, and train_mopd.py end to end."""
import json
import os
import shutil

import pytest
import torch
from conftest import killed_after_step

from mopd import aggregate, mopd_advantage, pg_token_loss


def test_mopd_advantage_hand_case():
    t = torch.tensor([[-1.0, -9.0, -0.1]])
    s = torch.tensor([[-2.0, -1.0, -8.0]])
    a, hit = mopd_advantage(t, s, clip=5.0)
    assert a.tolist() == [[1.0, -5.0, 5.0]] and hit.tolist() == [[False, True, True]]


def test_pg_expected_gradient_is_reverse_kl_gradient():
    """E_{y~pi}[ grad of -A(y) log pi(y) ], A = log pi_T(y) - sg[log pi(y)], = grad KL(pi || pi_T)."""
    torch.manual_seed(0)
    V, N = 6, 200_000
    z = torch.randn(V, dtype=torch.float64, requires_grad=True)
    log_t = torch.log_softmax(torch.randn(V, dtype=torch.float64), -1)
    exact = torch.autograd.grad((torch.softmax(z, -1) * (torch.log_softmax(z, -1) - log_t)).sum(), z)[0]
    y = torch.multinomial(torch.softmax(z, -1).detach(), N, replacement=True)
    logp = torch.log_softmax(z, -1)[y].view(N, 1)
    mask = torch.ones(N, 1, dtype=torch.bool)
    adv, _ = mopd_advantage(log_t[y].view(N, 1), logp, clip=50.0)
    loss, _ = pg_token_loss(logp, logp.detach(), adv, mask, "band", 0.5, 2.0)
    est = torch.autograd.grad(aggregate(loss, mask, "seq-mean-token-mean"), z)[0]
    # est is the mean of N per-sample gradients -A_i (onehot(y_i) - softmax(z)): its standard error
    # per component is their std / sqrt(N) (~1e-3 here). 5 se: a seeded draw, but any seed passes
    # except with probability ~V * P(|Z| > 5) = 3e-6, while 0.9 * exact is ~25 se away
    per_sample = -adv * (torch.nn.functional.one_hot(y, V) - torch.softmax(z, -1).detach())
    se = per_sample.std(0) / N**0.5
    assert ((est - exact).abs() <= 5 * se).all(), ((est - exact) / se)
    # and it is not the forward-KL gradient (the direction matters)
    fwd = torch.autograd.grad((log_t.exp() * (log_t - torch.log_softmax(z, -1))).sum(), z)[0]
    assert ((est - fwd).abs() > 10 * se).any()


def test_distill_forms_hand_case():
    """Eq. 5 and the exact reverse KL on a 3-token vocabulary, computed by hand."""
    import vocab_kernels as kernels
    ps = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    pt = torch.tensor([0.2, 0.7, 0.1], dtype=torch.float64)
    # hidden = log p, weight = identity: logits = log p, so softmax(logits) = p exactly
    h, W = ps.log().view(1, 1, 3), torch.eye(3, dtype=torch.float64)
    rev = kernels.kl(h, W, pt.log().view(1, 1, 3), W, kind="reverse").item()
    assert rev == pytest.approx(sum(ps[i] * (ps[i] / pt[i]).log() for i in range(3)).item(), rel=1e-9)
    ids, lp = kernels.teacher_topk(pt.log().view(1, 1, 3), W, k=2)
    assert ids[0, 0].tolist() == [1, 0]
    eq5 = kernels.topk_kl(h, W, ids, lp).item()
    by_hand = sum(ps[v] * (ps[v] / pt[v]).log() - ps[v] + pt[v] for v in (1, 0)).item()
    assert eq5 == pytest.approx(by_hand, rel=1e-9)


# ---- teachers ---------------------------------------------------------------------------

def test_routing_sends_each_prompt_to_its_own_teacher(toy, monkeypatch):
    import train_mopd
    from teachers import Teachers
    calls = []
    real = Teachers.score

    def spy(self, domain, tokens, mask, what="logprobs", *a, **k):
        calls.append((domain, what, tokens.clone()))
        return real(self, domain, tokens, mask, what, *a, **k)
    monkeypatch.setattr(Teachers, "score", spy)
    seen = []
    real_route = train_mopd.route

    def route_spy(row_dom):
        seen.append(list(row_dom))
        return real_route(row_dom)
    monkeypatch.setattr(train_mopd, "route", route_spy)
    train_mopd.main(["--preset=tiny", f"--init={toy['base']}", f"--out_dir={toy['base']}_route", "--steps=1",
                     "--domains=rev,sort", f"--teacher=rev={toy['rev']},sort={toy['sort']}", "--eval_every=100"])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(toy["base"])
    scored = [(d, t) for d, w, t in calls if w == "logprobs"]
    assert {d for d, _ in scored} == {"rev", "sort"}
    for d, t in scored:  # every row a teacher scored is a prompt of that teacher's domain
        for row in t:
            assert tok.decode(row, skip_special_tokens=True).startswith(d + " ")
    assert sum(len(t) for _, t in scored) == len(seen[0])  # each row scored exactly once
    # a full-distribution loss: one prefill per teacher and micro-batch gives both what the loss
    # needs and the log-probs for the KL estimate (no second pass)
    calls.clear()
    out = f"{toy['base']}_route_topk"
    train_mopd.main(["--preset=tiny", f"--init={toy['base']}", f"--out_dir={out}", "--steps=1", "--loss=topk",
                     "--topk=8", "--exact_kl_rows=0", "--domains=rev,sort", f"--teacher=rev={toy['rev']},sort={toy['sort']}",
                     "--eval_every=100"])
    assert sorted(w for _, w, _ in calls) == [("topk", "logprobs")] * 2
    assert sum(len(t) for _, _, t in calls) == 8  # every row once
    row = json.loads(open(out + ".log/metrics.jsonl").readline())
    assert row["kl_est"] != 0 and all(m["kl_est"] != 0 for m in row["by_domain"].values())


def test_teacher_score_matches_its_own_model(toy):
    import vocab_kernels as kernels
    from model import Transformer
    from teachers import Teachers
    T = Teachers({"rev": toy["rev"]}, offload=True)
    tokens = torch.randint(3, 40, (3, 9))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :4] = False
    m = Transformer.from_pretrained(toy["rev"])
    with torch.no_grad():
        ref = kernels.token_logprobs_ref(m(tokens[:, :-1], return_hidden=True), m.lm_head_weight, tokens[:, 1:],
                                         mask=mask)
    got = T.score("rev", tokens, mask)
    assert torch.allclose(got, ref, atol=1e-5) and (got[0, :4] == 0).all()
    ids, lp = T.score("rev", tokens, mask, "topk", k=5)
    assert ids.shape == (3, 8, 5) and (lp[mask] <= 0).all()
    assert all(not p.requires_grad for p in T.get("rev").parameters())


def test_vocab_mismatch_and_unknown_domain_errors(toy, tmp_path):
    import train_mopd
    from teachers import Teachers
    bad = str(tmp_path / "bad_tok")
    shutil.copytree(toy["rev"], bad)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # same vocab, another eos
        cfg = json.load(open(os.path.join(bad, name)))
        cfg["eos_token"] = "<pad>"
        json.dump(cfg, open(os.path.join(bad, name), "w"))
    common = ["--preset=tiny", f"--init={toy['base']}", f"--out_dir={tmp_path}/o", "--domains=rev,sort"]
    with pytest.raises(ValueError, match=r"teacher 'rev' \(.*bad_tok\) vs the student .*eos_token_id 0 != 2"):
        train_mopd.main(common + [f"--teacher=rev={bad},sort={toy['sort']}"])
    tj = json.load(open(os.path.join(toy["rev"], "tokenizer.json")))
    tj["model"]["vocab"]["@"] = tj["model"]["vocab"].pop("+")
    bad2 = str(tmp_path / "bad_vocab")
    shutil.copytree(toy["rev"], bad2)
    json.dump(tj, open(os.path.join(bad2, "tokenizer.json"), "w"))
    with pytest.raises(ValueError, match="tokenizers differ"):
        train_mopd.main(common + [f"--teacher=rev={bad2},sort={toy['sort']}"])
    with pytest.raises(ValueError, match=r"no teacher for domain\(s\) \['sort'\]; teachers exist for \['rev'\]"):
        train_mopd.main(common + [f"--teacher=rev={toy['rev']}"])
    with pytest.raises(ValueError, match=r"no teacher for domain\(s\) \['max'\]"):
        Teachers({"rev": toy["rev"]}).score("max", torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))


@pytest.mark.parametrize("loss", ["pg", "topk", "reverse_kl", "jsd"])
def test_train_mopd_runs_three_steps(toy, tmp_path, loss):
    import train_mopd
    out = str(tmp_path / "s")
    train_mopd.main(["--preset=tiny", f"--init={toy['base']}", f"--out_dir={out}", "--domains=rev,sort",
                     f"--teacher=rev={toy['rev']},sort={toy['sort']}", f"--loss={loss}", "--topk=8"])
    rows = [json.loads(l) for l in open(out + ".log/metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for d, m in r["by_domain"].items():
            assert m["kl_exact"] >= 0 and "kl_est" in m and 0 <= m["reward"] <= 1
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


def test_orm_mixing_and_resume_bit_identical(toy, tmp_path):
    """Kill a MOPD run (with ORM mixing) after step 2, resume: identical to the run never killed."""
    import train_mopd
    from model import Transformer
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--preset=tiny", f"--init={toy['base']}", "--domains=rev,sort", "--n=2", "--orm_alpha=0.5",
              f"--teacher=rev={toy['rev']},sort={toy['sort']}", "--steps=4"]
    train_mopd.main(common + [f"--out_dir={a}"])
    with killed_after_step(2):
        train_mopd.main(common + [f"--out_dir={b}"])
    train_mopd.main(common + [f"--out_dir={b}", "--resume=true"])
    wa, wb = Transformer.from_pretrained(a).state_dict(), Transformer.from_pretrained(b).state_dict()
    w0 = Transformer.from_pretrained(toy["base"]).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], w0[k]) for k in wa)
    with pytest.raises(SystemExit, match="needs --n > 1"):
        train_mopd.main(["--orm_alpha=0.5", "--n=1"])


def test_merge_and_evaluate_end_to_end(toy, tmp_path):
    import evaluate
    import merge
    teachers = f"rev={toy['rev']},sort={toy['sort']}"
    merge.main(["--mode=average", f"--base={toy['base']}", f"--teacher={teachers}", f"--out={tmp_path}/avg"])
    merge.main(["--mode=task_arithmetic", f"--base={toy['base']}", f"--teacher={teachers}", f"--out={tmp_path}/ta",
                "--lambdas=0.5,1.0", "--val_n=8"])
    evaluate.main(["--domains=rev,sort", f"--base={toy['base']}", f"--teacher={teachers}", "--limit=8",
                   f"--model=Weight average={tmp_path}/avg", f"--model=Task arithmetic={tmp_path}/ta",
                   f"--out={tmp_path}/results"])
    res = json.load(open(f"{tmp_path}/results.json"))
    assert set(res["accuracy"]) >= {"S0", "Weight average", "Task arithmetic", "RL teacher (own domain)"}
    assert "| Task arithmetic |" in open(f"{tmp_path}/results.md").read()
    assert os.path.exists(f"{tmp_path}/results.png")


def test_teacher_scoring_runs_in_micro_batches(toy, tmp_path, monkeypatch):
    """The PG signal's teacher prefill takes micro_batch rows at a time (a prefill over all of a
    rank's rows is ~48 GB of MoE token copies at the 30B preset), and the chunks together are the
    one-forward result: the same kl_est (it is computed from log pi_T of every sampled token)."""
    import train_mopd
    from teachers import Teachers
    sizes, real = [], Teachers.score

    def spy(self, domain, tokens, *a, **k):
        sizes.append(len(tokens))
        return real(self, domain, tokens, *a, **k)
    common = ["--preset=tiny", f"--init={toy['base']}", "--domains=rev,sort", "--steps=1", "--exact_kl_rows=0",
              f"--teacher=rev={toy['rev']},sort={toy['sort']}", "--eval_every=1000", "--ckpt_every=1000"]
    monkeypatch.setattr(Teachers, "score", spy)
    kl = {}
    for mb in (3, 256):
        sizes.clear()
        out = str(tmp_path / f"mb{mb}")
        train_mopd.main(common + [f"--out_dir={out}", f"--micro_batch={mb}"])
        kl[mb] = json.loads(open(out + ".log/metrics.jsonl").readline())["kl_est"]
        assert max(sizes) <= mb and sum(sizes) == 8, (mb, sizes)  # the tiny preset's 8 rows, each scored once
    assert abs(kl[3] - kl[256]) < 1e-5, kl  # fp32 rounding of smaller matmuls only


def test_adaptive_mixture_math():
    from train_mopd import MIX_DECAY, adaptive_mixture, update_gap
    names = ["a", "b", "c"]
    assert adaptive_mixture({}, names, 0.25) == [1.0, 1.0, 1.0]  # no estimate yet: uniform
    w = adaptive_mixture({"a": 0.3, "b": 0.1, "c": -0.02}, names, 0.25)  # a negative estimate is a gap of 0
    assert w == pytest.approx([0.25 / 3 + 0.75 * 0.75, 0.25 / 3 + 0.75 * 0.25, 0.25 / 3]) and sum(w) == pytest.approx(1)
    gap = {}
    update_gap(gap, {"a": {"kl_est": 0.4}})
    update_gap(gap, {"a": {"kl_est": 0.2}, "b": {"kl_est": 0.1}})
    assert gap == pytest.approx({"a": MIX_DECAY * 0.4 + (1 - MIX_DECAY) * 0.2, "b": 0.1})


def test_adaptive_mixture_samples_the_domain_behind_and_resumes_exactly(toy, tmp_path, monkeypatch):
    """--domain_mix=adaptive: rev's teacher is S0 itself (no gap: KL 0), sort's a perturbed S0.
    From step 2 on, sort gets most prompts and rev about its floor; killed after step 2 and
    resumed, the run is the one never killed (the gaps are replayed from the metrics log)."""
    import train_mopd
    from model import Transformer
    seen = []
    real = train_mopd.sample_and_reward

    def spy(model, tok, domains, weights, cfg, step, engine=None):
        out = real(model, tok, domains, weights, cfg, step, engine)
        seen.append((step, [e.domain for e in out[1]]))
        return out
    monkeypatch.setattr(train_mopd, "sample_and_reward", spy)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--preset=tiny", f"--init={toy['base']}", "--domains=rev,sort", "--prompts_per_step=32",
              f"--teacher=rev={toy['base']},sort={toy['sort']}", "--steps=4", "--domain_mix=adaptive",
              "--mix_floor=0.2", "--exact_kl_rows=0"]
    train_mopd.main(common + [f"--out_dir={a}"])
    rows = [json.loads(line) for line in open(a + ".log/metrics.jsonl")]
    for r in rows[1:]:
        assert r["mix"]["sort"] > 0.8 and r["mix"]["rev"] < 0.2, r["mix"]  # rev's gap ~0: its floor, 0.1
    counts = [doms.count("rev") for step, doms in seen if step >= 1]
    assert sum(counts) < 0.25 * 3 * 32, counts  # uniform would give ~48 of 96
    with killed_after_step(2):
        train_mopd.main(common + [f"--out_dir={b}"])
    train_mopd.main(common + [f"--out_dir={b}", "--resume=true"])
    rb = [json.loads(line) for line in open(b + ".log/metrics.jsonl")]
    assert [r["mix"] for r in rb] == [r["mix"] for r in rows]
    wa, wb = Transformer.from_pretrained(a).state_dict(), Transformer.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
