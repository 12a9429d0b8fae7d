"""merge.py and evaluate.py: the merging formulas, the normalised score, seeds, sample efficiency."""
import json
import math

import pytest
import torch

from evaluate import aggregate, aggregate_runs, markdown, normalised, samples_to_reach
from merge import average, task_arithmetic
from model import ModelConfig, Transformer


def _model(seed):
    cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=4)
    return Transformer(cfg).init_weights(seed=seed)


def test_average_and_task_arithmetic():
    base, a, b = _model(0), _model(1), _model(2)
    k = "layers.0.mlp.up_proj.weight"
    avg = average([a, b])
    assert torch.allclose(avg[k], (a.state_dict()[k] + b.state_dict()[k]) / 2)
    ta = task_arithmetic(base, [a, b], 0.5)
    s0 = base.state_dict()[k]
    assert torch.allclose(ta[k], s0 + 0.5 * ((a.state_dict()[k] - s0) + (b.state_dict()[k] - s0)))
    assert all(torch.equal(v, base.state_dict()[n]) for n, v in task_arithmetic(base, [a, b], 0.0).items())


def test_normalised_score():
    base = {"a": 0.2, "b": 0.5}
    teacher = {"a": 0.9, "b": 0.7}
    per, mean = normalised({"a": 0.55, "b": 0.7}, base, teacher)
    assert per == pytest.approx({"a": 0.5, "b": 1.0}) and mean == pytest.approx(0.75)
    per, _ = normalised(teacher, base, teacher)
    assert per == pytest.approx({"a": 1.0, "b": 1.0})


def test_samples_to_reach(tmp_path):
    p = tmp_path / "m.jsonl"
    rows = [{"step": 1, "samples": 64, "eval": {"a": 0.3, "b": 0.5}},
            {"step": 2, "samples": 128, "eval": {"a": 0.85, "b": 0.55}},
            {"step": 3, "samples": 192, "eval": {"a": 0.5, "b": 0.69}}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # 90% of headroom: a needs 0.2 + 0.9 * 0.7 = 0.83, b needs 0.5 + 0.9 * 0.2 = 0.68
    assert samples_to_reach(p, {"a": 0.2, "b": 0.5}, {"a": 0.9, "b": 0.7}) == {"a": 128, "b": 192}


def test_aggregate_seeds_and_markdown(tmp_path):
    paths = []
    for i, x in enumerate((0.4, 0.6)):
        r = {"domains": ["a"], "accuracy": {"S0": {"a": 0.2}, "MOPD": {"a": x}},
             "normalised": {"S0": {"a": 0.0, "score": 0.0}, "MOPD": {"a": x, "score": x}}}
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    res = aggregate(paths)
    assert res["accuracy"]["MOPD"]["a"] == pytest.approx(0.5)
    assert res["sd"]["normalised"]["MOPD"]["score"] == pytest.approx(0.1414, abs=1e-3)
    text = markdown(res)
    assert "| MOPD | 0.500 ± 0.141 | 0.500 ± 0.141 |" in text and "2 seeds" in text
    # a seed whose normalised score is NaN (its teacher no better than S0): NaN, not a crash
    runs = [json.loads(p.read_text()) for p in paths]
    runs[1]["normalised"]["MOPD"]["score"] = float("nan")
    res = aggregate_runs(runs)
    assert math.isnan(res["sd"]["normalised"]["MOPD"]["score"]) and math.isnan(res["normalised"]["MOPD"]["score"])
    assert res["sd"]["normalised"]["MOPD"]["a"] == pytest.approx(0.1414, abs=1e-3)


def test_samples_option_reaches_every_row_and_the_results(toy, tmp_path, monkeypatch):
    """evaluate.py --samples=N: every checkpoint is scored with N samples per prompt, results.json
    records N, and --aggregate refuses seeds scored with different N."""
    import evaluate
    seen = []

    def fake(model, tok, domains, max_new_tokens, limit=None, samples=4, **kw):
        seen.append(samples)
        return {d.name: 0.5 for d in domains}
    monkeypatch.setattr(evaluate, "evaluate", fake)
    out = str(tmp_path / "res")
    evaluate.main(["--domains=rev,sort", f"--base={toy['base']}", f"--teacher=rev={toy['rev']},sort={toy['sort']}",
                   f"--model=MOPD={toy['base']}", "--limit=2", "--samples=3", f"--out={out}"])
    assert seen == [3] * 4  # S0, two teachers, MOPD
    res = json.load(open(out + ".json"))
    assert res["samples"] == 3
    other = dict(res, samples=4)
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"different numbers of samples per prompt \(\[3, 4\]\)"):
        aggregate([out + ".json", tmp_path / "other.json"])
