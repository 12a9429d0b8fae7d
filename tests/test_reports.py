"""The study reports' arithmetic (runs/*_report.py): budgets read from the runs' own logs."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs"))
import toy_report  # noqa: E402


def test_spend_counts_responses_and_tokens_from_cumulative_samples(tmp_path):
    run = tmp_path / "mopd"
    os.makedirs(str(run) + ".log")
    steps = [dict(step=1, samples=64, response_len=30.0), dict(step=2, samples=128, response_len=20.5),
             dict(step=3, samples=192, response_len=10.0, eval={"add": 0.5})]
    with open(os.path.join(str(run) + ".log", "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in steps)
    assert toy_report.spend(str(run)) == (192, 64 * 30 + 64 * 20.5 + 64 * 10)
    assert toy_report.add((1, 2), (3, 4), (5, 6)) == (9, 12)
