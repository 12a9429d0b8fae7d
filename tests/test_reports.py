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


def test_estimator_merge_adds_arms_in_order_and_refuses_other_teachers():
    """--merge (runs/estimators_report.py): arms trained later join the committed per-seed file
    in the table's order; a run whose S0 or teachers evaluate differently is refused."""
    import pytest
    import estimators_report as er
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = json.load(open(os.path.join(root, "docs", "estimators_worked", "seed0.json")))
    acc = {k: v for k, v in old["results"]["accuracy"].items() if not k.startswith("MOPD")}
    new_acc = dict(acc, **{"MOPD topk16": {"add": 0.5, "mul": 0.5, "isort": 0.5}, "MOPD jsd": {"add": 0.25}})
    new = {"results": dict(old["results"], accuracy=new_acc,
                           normalised={k: {"score": i} for i, k in enumerate(new_acc)}),
           "curves": {"topk16": [{"step": 1}], "jsd": [{"step": 2}], "pg": [{"step": 3}]}}
    m = er.merge_seed(old, new)
    arms = [k for k in m["results"]["accuracy"] if k.startswith("MOPD")]
    assert arms == ["MOPD pg", "MOPD topk4", "MOPD topk16", "MOPD reverse_kl", "MOPD forward_kl", "MOPD jsd",
                    "MOPD pg, other-origin teachers"]
    keys = list(m["results"]["accuracy"])
    assert keys[:keys.index("MOPD pg")] == list(old["results"]["accuracy"])[:keys.index("MOPD pg")]
    assert m["results"]["accuracy"]["MOPD topk16"] == {"add": 0.5, "mul": 0.5, "isort": 0.5}
    assert m["results"]["accuracy"]["MOPD topk4"] == old["results"]["accuracy"]["MOPD topk4"]  # old arms kept
    assert m["results"]["normalised"]["MOPD jsd"] == new["results"]["normalised"]["MOPD jsd"]
    assert list(m["curves"]) == ["pg", "topk4", "topk16", "reverse_kl", "forward_kl", "jsd", "pg_other"]
    assert m["curves"]["pg"] == [{"step": 3}] and m["curves"]["topk4"] == old["curves"]["topk4"]  # new replaces
    assert list(m["results"]["accuracy"]) == list(m["results"]["normalised"])
    bad = json.loads(json.dumps(new))
    bad["results"]["accuracy"]["S0"]["add"] += 0.0025  # one more sample right: another S0
    with pytest.raises(ValueError, match="S0 differs"):
        er.merge_seed(old, bad)


def test_estimator_merge_replaces_other_origin_teachers_only_with_their_arm():
    """A new pg_other arm (e.g. OTHER=next: other teachers than the committed ones) brings its
    other-origin teachers' rows, replacing the committed ones; without that arm a changed
    other-origin teacher is refused like any other teacher."""
    import pytest
    import estimators_report as er
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = json.load(open(os.path.join(root, "docs", "estimators_worked", "seed0.json")))
    acc = {k: v for k, v in old["results"]["accuracy"].items() if not k.startswith("MOPD")}
    other = [k for k in acc if k.startswith(er.OTHER_TEACHER)]
    assert len(other) == 3
    acc[other[0]] = {"add": 0.125, "mul": 0.125, "isort": 0.125}
    new_acc = dict(acc, **{"MOPD pg, other-origin teachers": {"add": 0.75, "mul": 0.75, "isort": 0.75}})
    new = {"results": dict(old["results"], accuracy=new_acc, normalised={k: {"score": 0} for k in new_acc}),
           "curves": {"pg_other": [{"step": 1}]}}
    m = er.merge_seed(old, new)
    assert m["results"]["accuracy"][other[0]] == {"add": 0.125, "mul": 0.125, "isort": 0.125}
    assert m["results"]["accuracy"]["MOPD pg, other-origin teachers"]["add"] == 0.75
    assert m["curves"]["pg_other"] == [{"step": 1}] and m["curves"]["pg"] == old["curves"]["pg"]
    del new["curves"]["pg_other"], new["results"]["accuracy"]["MOPD pg, other-origin teachers"]
    with pytest.raises(ValueError, match="other-origin teacher"):
        er.merge_seed(old, new)


def test_reports_measure_s0_and_teachers_as_the_runs_evals_do():
    """runs/toy_report.py and runs/mixture_report.py normalise the runs' eval curves by S0 and the
    teachers measured with the runs' own eval settings: the worked toy's 64-token answers (the
    default preset's 12 would cut every worked answer short), and a smoke run's eval limit."""
    import train_mopd
    assert toy_report.eval_settings("worked") == {"max_new_tokens": 64, "limit": train_mopd.Config.eval_limit}
    assert toy_report.eval_settings("toy") == {"max_new_tokens": train_mopd.Config.max_new_tokens,
                                               "limit": train_mopd.Config.eval_limit}
    assert toy_report.eval_settings("worked", 4) == {"max_new_tokens": 64, "limit": 4}
    assert train_mopd.Config.max_new_tokens != 64


def test_mixture_samples_say_how_many_seeds_got_there():
    """A seed that never reached 90% is not averaged away: the mean of the seeds that did is
    marked with how many they were (a mean over the fast seeds alone would flatter the mixture)."""
    import mixture_report as mr
    assert mr.fmt([640, 1280, 1920]) == "1,280 ± 640"
    assert mr.fmt([640, None, 1920]) == "1,280 ± 905 (2 of 3 seeds)"
    assert mr.fmt([None, 1920, None]) == "1,920 (1 of 3 seeds)"
    assert mr.fmt([None, None]) == "never"
