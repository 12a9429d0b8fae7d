"""
Nothing already written is lost, and every way of losing it is one line on stderr (config.cli):
an output directory that is a source, a fresh run into a used OUT_DIR (and merge.py / evaluate.py
over what their --out holds), two runs into one OUT_DIR (the lock), divergence (NaN/Inf), a
changed config on resume and the old checkpoint format, leftovers of interrupted saves and a full
disk (while saving, and while logging), SFT's own checkpoints and bit-identical resume, truncated or mismatched teachers in SFT/merge/MOPD, prompts longer than the context,
Ctrl-C, an unusable parent of OUT_DIR. Each case checks the exit status, the exact line, and
that no file it was given changed (hashes of every file before and after).
"""
import errno
import fcntl
import glob
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import killed_after_step

import checkpoint
import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RL = ["--preset=tiny", "--domains=rev"]


def _cli(script, argv):
    """(exit status, stderr lines) of `python SCRIPT.py ARGV` run in-process through config.cli."""
    mod = importlib.import_module(script)
    try:
        config.cli(lambda: mod.main(argv))
    except SystemExit as e:
        return e.code
    return 0


def _run(script, argv, capsys):
    capsys.readouterr()
    code = _cli(script, argv)
    return code, capsys.readouterr().err.splitlines()


def _snap(*roots):
    """{path: sha256} of every file under each root (a file root: itself), and every directory."""
    out = {}
    for root in roots:
        if os.path.isfile(root):
            out[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
        for d, subs, files in os.walk(root):
            out[d] = "dir"
            for f in files:
                p = os.path.join(d, f)
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _log(out):
    return [json.loads(l) for l in open(out + ".log/metrics.jsonl")]


def _step(out):
    return torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)["step"]


@pytest.fixture(scope="module")
def rl_run(toy, tmp_path_factory):
    """A finished 2-step RL run (a checkpoint every step): OUT_DIR and OUT_DIR.log."""
    import train_teacher_rl
    out = str(tmp_path_factory.mktemp("rl_run") / "out")
    train_teacher_rl.main(TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--steps=2"])
    return out


def _copy_run(src, tmp_path, log=True, ckpt=True):
    out = str(tmp_path / "out")
    if ckpt:
        shutil.copytree(src, out)
    if log:
        shutil.copytree(src + ".log", out + ".log")
    return out

# ---- 1. an output directory that is one of the run's sources --------------------------------

@pytest.mark.parametrize("case", ["mopd_init", "mopd_teacher", "rl_parent_of_init", "sft_teacher", "merge_base",
                                  "merge_teacher"])
def test_out_dir_that_is_a_source_is_refused(case, toy, capsys):
    base, rev, sort = toy["base"], toy["rev"], toy["sort"]
    teachers = f"--teacher=rev={rev},sort={sort}"
    script, argv, line = {
        "mopd_init": ("train_mopd", ["--preset=tiny", f"--init={base}", f"--out_dir={base}", "--domains=rev,sort",
                                     teachers], f"--out_dir={base} is the same directory as --init={base}"),
        "mopd_teacher": ("train_mopd", ["--preset=tiny", f"--init={base}", f"--out_dir={rev}", "--domains=rev,sort",
                                        teachers], f"--out_dir={rev} is the same directory as --teacher=rev={rev}"),
        "rl_parent_of_init": ("train_teacher_rl", TINY_RL + [f"--init={base}", f"--out_dir={os.path.dirname(base)}"],
                              f"--out_dir={os.path.dirname(base)} contains --init={base}"),
        "sft_teacher": ("train_sft", ["--preset=tiny", f"--init={base}", "--data=teachers", f"--out_dir={sort}",
                                      "--domains=rev,sort", teachers],
                        f"--out_dir={sort} is the same directory as --teacher=sort={sort}"),
        "merge_base": ("merge", ["--mode=average", f"--base={base}", teachers, f"--out={base}"],
                       f"--out={base} is the same directory as --base={base}"),
        "merge_teacher": ("merge", ["--mode=average", f"--base={base}", teachers, f"--out={rev}/"],
                          f"--out={rev}/ is the same directory as --teacher=rev={rev}"),
    }[case]
    flag = "--out" if script == "merge" else "--out_dir"
    before = _snap(os.path.dirname(base))
    assert _run(script, argv, capsys) == (2, [f"error: {line}: saving would replace or alter it; choose another {flag}"])
    assert _snap(os.path.dirname(base)) == before

# ---- 2. a fresh run into an OUT_DIR that holds a run; merge.py / evaluate.py over their --out --

@pytest.mark.parametrize("held", ["checkpoint", "metrics", "staging"])
def test_fresh_run_into_a_used_out_dir_is_refused(held, rl_run, toy, tmp_path, capsys):
    out = _copy_run(rl_run, tmp_path, ckpt=held != "metrics")
    if held == "staging":  # killed between replace_dir's renames: the complete checkpoint is OUT_DIR.staging
        os.rename(out, out + ".staging")
    what = {"checkpoint": "a checkpoint at step 2, ", "metrics": "", "staging": f"a complete {out}.staging, "}[held]
    before = _snap(str(tmp_path))
    assert _run("train_teacher_rl", TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}"], capsys) == (2, [
        f"error: --out_dir={out} already holds a run ({what}{out}.log/metrics.jsonl): --resume=true continues it, "
        "--overwrite=true replaces it"])
    assert _snap(str(tmp_path)) == before


def test_overwrite_replaces_the_old_run_only_once_the_new_one_starts(rl_run, toy, tmp_path, capsys):
    out = _copy_run(rl_run, tmp_path)
    before = _snap(str(tmp_path))
    common = TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--overwrite=true", "--steps=1"]
    # refused after start-up (an unknown domain): the old run is still whole
    code, err = _run("train_teacher_rl", common[:1] + common[2:] + ["--domains=nope"], capsys)
    assert code == 2 and err[0].startswith("error: unknown domain 'nope'")
    assert _snap(str(tmp_path)) == before
    assert _run("train_teacher_rl", common, capsys) == (0, [])
    assert _step(out) == 1 and [r["step"] for r in _log(out)] == [1]
    assert sorted(os.listdir(tmp_path)) == ["out", "out.log"]  # and the lock is gone


@pytest.mark.parametrize("held", ["files", "a file"])
def test_merge_over_an_out_that_holds_something_is_refused(held, toy, tmp_path, capsys):
    out = tmp_path / "out"
    if held == "files":  # an unrelated directory of the user's
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "data.csv").write_text("1,2\n")
        line = f"error: --out={out} already holds 2 files: --overwrite=true replaces it"
    else:
        out.write_text("mine")
        line = f"error: --out={out}: exists and is not a directory"
    argv = ["--mode=average", f"--base={toy['base']}", f"--teacher=rev={toy['rev']},sort={toy['sort']}", f"--out={out}"]
    before = _snap(str(tmp_path), os.path.dirname(toy["base"]))
    assert _run("merge", argv, capsys) == (2, [line])
    assert _snap(str(tmp_path), os.path.dirname(toy["base"])) == before
    if held == "files":  # said so: replaced, once the merged checkpoint is complete
        assert _run("merge", argv + ["--overwrite=true"], capsys)[0] == 0
        assert "config.json" in os.listdir(out) and "notes.txt" not in os.listdir(out)
        assert os.listdir(tmp_path) == ["out"]  # no temporary directory left beside it


@pytest.mark.parametrize("how", ["aggregate", "table"])
def test_evaluate_over_results_already_there_is_refused(how, toy, tmp_path, capsys):
    seed0 = tmp_path / "seed0.json"
    seed0.write_text(json.dumps({"domains": ["a"], "accuracy": {"S0": {"a": 0.2}},
                                 "normalised": {"S0": {"a": 0.0, "score": 0.0}}}))
    out = str(tmp_path / "results")
    for ext in (".json", ".md"):
        with open(out + ext, "w") as f:
            f.write(f"last week's {ext}")
    argv = {"aggregate": ["--aggregate", str(seed0)],
            "table": ["--domains=rev,sort", f"--base={toy['base']}", f"--teacher=rev={toy['rev']},sort={toy['sort']}"]
            }[how] + [f"--out={out}"]
    before = _snap(str(tmp_path))
    assert _run("evaluate", argv, capsys) == (2, [
        f"error: --out={out} already holds results ({out}.json, {out}.md): --overwrite=true replaces them"])
    assert _snap(str(tmp_path)) == before
    if how == "aggregate":  # said so: replaced, each file whole
        assert _run("evaluate", argv + ["--overwrite=true"], capsys)[0] == 0
        assert json.load(open(out + ".json"))["seeds"] == 1 and "| S0 |" in open(out + ".md").read()
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

# ---- 3. two runs into one OUT_DIR -----------------------------------------------------------

def test_a_second_run_into_a_locked_out_dir_fails_at_once(rl_run, toy, tmp_path, capsys):
    out = _copy_run(rl_run, tmp_path)
    with open(out + ".lock", "w") as held:  # the first run, as OUT_DIR.lock's holder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        before = _snap(str(tmp_path))
        argv = TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--resume=true", "--steps=3",
                          "--resume_override=steps"]
        assert _run("train_teacher_rl", argv, capsys) == (2, [
            f"error: --out_dir={out}: another run is writing it ({out}.lock is held by pid 4242); wait for it, "
            "or choose another --out_dir"])
        assert _snap(str(tmp_path)) == before
    # a lock file left by a run that crashed (nobody holds it) stops nobody
    assert os.path.exists(out + ".lock")
    assert _run("train_teacher_rl", TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--resume=true",
                                               "--steps=2"], capsys) == (0, [])
    assert not os.path.exists(out + ".lock")

# ---- 4. divergence ----------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["train_sft", "train_teacher_rl"])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(script, toy, tmp_path, capsys, monkeypatch):
    import tasks
    monkeypatch.setattr(tasks, "toy_reward", lambda response, ex: float(len(response) % 2))  # RL: real updates
    out = str(tmp_path / "out")
    argv = {"train_sft": ["--preset=tiny", "--domains=rev,sort", "--ckpt_every=1", "--eval_every=100"],
            "train_teacher_rl": TINY_RL}[script] + [f"--init={toy['base']}", f"--out_dir={out}", "--steps=6",
                                                    "--lr=1e9"]
    code, err = _run(script, argv, capsys)
    assert code == 2 and len(err) == 1, err
    m = re.fullmatch(rf"error: step (\d+): loss=(\S+) grad_norm=(\S+): diverged; last good checkpoint: "
                     rf"step (\d+) in {re.escape(out)}", err[0])
    assert m, err[0]
    n, saved = int(m[1]), int(m[4])
    assert n == saved + 1 and {m[2], m[3]} & {"nan", "inf", "-inf"}
    assert _step(out) == saved and [r["step"] for r in _log(out)] == list(range(1, saved + 1))
    from model import Transformer
    assert all(torch.isfinite(p).all() for p in Transformer.from_pretrained(out).parameters())


def test_save_checkpoint_refuses_non_finite_weights(rl_run, tmp_path, capsys):
    from model import Transformer
    out = _copy_run(rl_run, tmp_path)
    model = Transformer.from_pretrained(out)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = _snap(str(tmp_path))
    assert _run_fn(lambda: checkpoint.save_checkpoint(out, model, out, {"step": 3, "config": {}}), capsys) == (2, [
        f"error: step 3: parameter layers.1.mlp.up_proj.weight is not finite: refusing to save it; last good "
        f"checkpoint: step 2 in {out}"])
    assert _snap(str(tmp_path)) == before


def _run_fn(fn, capsys):
    capsys.readouterr()
    try:
        config.cli(fn)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.splitlines()

# ---- 5. resume: the same run, or a clear error ------------------------------------------------

@pytest.mark.parametrize("args,line", [
    (["--lr=0.001"], "--resume: {out} was trained with --lr=0.0003; now --lr=0.001: the resumed run would not continue "
                     "it; give the old values, or --resume_override=lr to accept the change"),
    (["--seed=1", "--steps=4"], "--resume: {out} was trained with --steps=2, --seed=0; now --steps=4, --seed=1: the "
                                "resumed run would not continue it; give the old values, or "
                                "--resume_override=steps,seed to accept the change"),
    (["--domains=sort"], "--resume: {out} was trained with --domains=rev; now --domains=sort: the resumed run would "
                         "not continue it; give the old values, or --resume_override=domains to accept the change"),
    (["--resume_override=stepz"], "--resume_override=stepz: unknown config key 'stepz'"),
    (["--overwrite=true"], "--resume=true and --overwrite=true: choose one (continue the run in {out}, or replace it)"),
    ("old format", "{out}/trainer_state.pt: a checkpoint of an old format (no optimizer/ beside it) cannot be "
                   "resumed; start a new run from its weights with --init={out} and another --out_dir"),
])
def test_resume_refuses_what_would_not_be_the_same_run(args, line, rl_run, toy, tmp_path, capsys):
    out = _copy_run(rl_run, tmp_path)
    if args == "old format":  # before optimizer/: AdamW's state inside trainer_state.pt, and no `start`
        state = torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)
        torch.save({"step": state["step"], "optimizer": {}}, os.path.join(out, "trainer_state.pt"))
        shutil.rmtree(os.path.join(out, "optimizer"))
        args = []
    before = _snap(str(tmp_path))
    argv = TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--resume=true", "--steps=2"] + args
    assert _run("train_teacher_rl", argv, capsys) == (2, ["error: " + line.format(out=out)])
    assert _snap(str(tmp_path)) == before


def test_resume_may_change_bookkeeping_and_what_is_overridden(rl_run, toy, tmp_path, capsys):
    out = _copy_run(rl_run, tmp_path)
    before = _snap(str(tmp_path))
    common = TINY_RL + [f"--init={os.path.relpath(toy['base'])}", f"--out_dir={out}/", "--resume"]  # same dirs
    assert _run("train_teacher_rl", common + ["--steps=2", "--eval_every=7", "--ckpt_every=5", "--eval_limit=3",
                                              "--device=cpu"], capsys) == (0, [])
    assert _snap(str(tmp_path)) == before  # a finished run: nothing to do, nothing touched
    assert _run("train_teacher_rl", common + ["--steps=3", "--resume_override=steps"], capsys) == (0, [])
    assert _step(out) == 3 and [r["step"] for r in _log(out)] == [1, 2, 3]

# ---- 6. leftovers of interrupted saves, a full disk ------------------------------------------

def test_leftovers_are_removed_at_the_next_start(rl_run, toy, tmp_path, capsys):
    out = _copy_run(rl_run, tmp_path)
    for name in ("out.staging.tmp-abcd_123", "out.staging.old-zzzzzzzz", "out.old-x1y2z3w4", "out.tmp-00000000",
                 "out.staging", "out.old-backup"):  # the last one is not ours: it stays
        os.makedirs(tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
    before = _snap(out, out + ".log", str(tmp_path / "out.old-backup"))
    assert _run("train_teacher_rl", TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--resume=true",
                                               "--steps=2"], capsys) == (0, [])
    assert sorted(os.listdir(tmp_path)) == ["out", "out.log", "out.old-backup"]
    assert _snap(out, out + ".log", str(tmp_path / "out.old-backup")) == before


@pytest.mark.parametrize("write", ["weights", "trainer state"])
def test_a_full_disk_removes_the_partial_staging_and_keeps_the_checkpoint(write, rl_run, toy, tmp_path, capsys,
                                                                          monkeypatch):
    import safetensors.torch
    out = _copy_run(rl_run, tmp_path)
    before = _snap(out)

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    if write == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:  # the model is written; AdamW's state / trainer_state.pt are not
        monkeypatch.setattr(torch, "save", full)
    argv = TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--resume=true", "--steps=3",
                      "--resume_override=steps"]
    assert _run("train_teacher_rl", argv, capsys) == (2, [
        f"error: {out}: no space left on device while saving step 3: removed the partial {out}.staging; last "
        f"checkpoint: step 2 in {out}"])
    assert _snap(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out", "out.log"]  # no staging, no temporary directory, no lock


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_write_of_the_metrics_log_is_one_line_and_keeps_the_checkpoint(code, rl_run, toy, tmp_path, capsys,
                                                                                 monkeypatch):
    out = _copy_run(rl_run, tmp_path)
    before = _snap(out, out + ".log")
    real_write = os.write

    def write(fd, data):  # half of step 3's row reaches metrics.jsonl, then the disk is full (or fails)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            real_write(fd, data[:len(data) // 2])
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)
    argv = TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--resume=true", "--steps=3",
                      "--resume_override=steps"]
    why = {errno.ENOSPC: "no space left on device", errno.EIO: os.strerror(errno.EIO)}[code]
    assert _run("train_teacher_rl", argv, capsys) == (2, [
        f"error: {out}.log/metrics.jsonl: {why} while logging step 3; last checkpoint: step 2 in {out}"])
    assert _snap(out, out + ".log") == before  # the half row cut back out; step 2's checkpoint untouched
    assert sorted(os.listdir(tmp_path)) == ["out", "out.log"]  # no staging, no lock
    monkeypatch.setattr(os, "write", real_write)  # the disk has room again: --resume continues
    assert _run("train_teacher_rl", argv, capsys) == (0, [])
    assert _step(out) == 3 and [r["step"] for r in _log(out)] == [1, 2, 3]

# ---- 7. train_sft.py: checkpoints, and a bit-identical resume ---------------------------------

def test_sft_resume_is_bit_identical(tmp_path):
    import train_sft
    from model import Transformer
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--preset=tiny", "--domains=rev,sort", "--steps=4", "--ckpt_every=1", "--eval_every=2", "--eval_limit=8"]
    train_sft.main(common + [f"--out_dir={a}"])
    with killed_after_step(2):
        train_sft.main(common + [f"--out_dir={b}"])
    assert _step(b) == 2 and os.path.isdir(os.path.join(b, "optimizer"))
    train_sft.main(common + [f"--out_dir={b}", "--resume=true"])
    wa, wb = Transformer.from_pretrained(a).state_dict(), Transformer.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = _log(a), _log(b)
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"], r.get("eval")) for r in la] == [(r["loss"], r["grad_norm"], r.get("eval"))
                                                                        for r in lb]

# ---- 8. teachers: whole files and the student's tokenizer, before step 1 ---------------------

@pytest.mark.parametrize("script,fault", [("train_mopd", "truncated"), ("train_sft", "truncated"),
                                          ("merge", "truncated"), ("train_sft", "vocab"), ("merge", "vocab")])
def test_a_bad_teacher_is_found_before_step_1(script, fault, toy, tmp_path, capsys):
    bad = str(tmp_path / "bad")
    shutil.copytree(toy["rev"], bad)
    st = os.path.join(bad, "model.safetensors")
    if fault == "truncated":
        size = os.path.getsize(st)
        with open(st, "r+b") as f:
            f.truncate(size - 100)
        line = (f"error: --teacher=rev={bad}: {st}: truncated safetensors file ({size - 100} bytes; its header "
                f"says {size})")
    else:  # the same number of tokens, two of them swapped
        tj = json.load(open(os.path.join(bad, "tokenizer.json")))
        v = tj["model"]["vocab"]
        v["+"], v["-"] = v["-"], v["+"]
        json.dump(tj, open(os.path.join(bad, "tokenizer.json"), "w"))
        line = f"error: teacher 'rev' ({bad}) vs the student ({toy['base']}): tokenizers differ"
    out = str(tmp_path / "out")
    teachers = f"--teacher=rev={bad},sort={toy['sort']}"
    argv = {"train_mopd": ["--preset=tiny", f"--init={toy['base']}", f"--out_dir={out}", "--domains=rev,sort",
                           teachers],
            "train_sft": ["--preset=tiny", f"--init={toy['base']}", "--data=teachers", f"--out_dir={out}",
                          "--domains=rev,sort", teachers],
            "merge": ["--mode=average", f"--base={toy['base']}", teachers, f"--out={out}"]}[script]
    before = _snap(os.path.dirname(toy["base"]), bad)
    code, err = _run(script, argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(line), err
    assert _snap(os.path.dirname(toy["base"]), bad) == before
    assert os.listdir(tmp_path) == ["bad"]  # no out, no out.log (no teacher samples), no lock

# ---- 9. a prompt longer than the context -----------------------------------------------------

@pytest.mark.parametrize("script", ["train_teacher_rl", "train_sft"])
def test_a_prompt_longer_than_the_context_is_refused_at_load(script, toy, tmp_path, capsys):
    from checkpoint import load_tokenizer
    from rollout import encode_prompt
    data = tmp_path / "math.jsonl"
    long = "what is " + "1 + " * 40 + "1?"
    data.write_text(json.dumps({"prompt": "what is 1 + 1?", "answer": "2", "split": "eval"}) + "\n"
                    + json.dumps({"prompt": long, "answer": "41"}) + "\n")
    n = len(encode_prompt(load_tokenizer(toy["base"]), long))
    out = str(tmp_path / "out")
    argv = ["--preset=tiny", f"--init={toy['base']}", f"--out_dir={out}", f"--domains=math:{data}",
            "--max_new_tokens=8"]
    before = _snap(toy["base"], str(data))
    assert _run(script, argv, capsys) == (2, [
        f"error: {data}:2: prompt is {n} tokens; the context leaves room for 56 (max_position_embeddings 64 - "
        f"--max_new_tokens=8)"])
    assert _snap(toy["base"], str(data)) == before and sorted(os.listdir(tmp_path)) == ["math.jsonl"]

# ---- 10. Ctrl-C, and an out_dir that cannot be written ----------------------------------------

def test_ctrl_c_finishes_the_step_then_is_one_line(toy, tmp_path, capsys, monkeypatch):
    """SIGINT in the middle of step 2 (sent by the step itself): step 2 is finished, logged and
    saved, then the run stops; a KeyboardInterrupt from elsewhere (here: right after a save)
    says the same; a resume finishes the run."""
    import train_teacher_rl
    out = str(tmp_path / "out")
    argv = TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}", "--steps=4"]
    step_fn = train_teacher_rl.rl_step

    def interrupted_step(model, opt, tok, domains, weights, cfg, step, ref=None, engine=None):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, in the middle of step 2
        return step_fn(model, opt, tok, domains, weights, cfg, step, ref, engine)
    monkeypatch.setattr(train_teacher_rl, "rl_step", interrupted_step)
    assert _run("train_teacher_rl", argv, capsys) == (130, [
        f"error: interrupted after step 2 of 4; last checkpoint: step 2 in {out}"])
    assert _step(out) == 2 and [r["step"] for r in _log(out)] == [1, 2] and not os.path.exists(out + ".lock")
    monkeypatch.setattr(train_teacher_rl, "rl_step", step_fn)
    save = checkpoint.save_checkpoint

    def save_then_interrupt(path, model, tokenizer_dir, state, opt=None):
        save(path, model, tokenizer_dir, state, opt)
        if state["step"] == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_interrupt)
    assert _run("train_teacher_rl", argv + ["--resume=true"], capsys) == (130, [
        f"error: interrupted after step 3 of 4; last checkpoint: step 3 in {out}"])
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert _run("train_teacher_rl", argv + ["--resume=true"], capsys) == (0, [])
    assert _step(out) == 4 and [r["step"] for r in _log(out)] == [1, 2, 3, 4]


def test_sigint_in_a_real_run_is_one_line_and_exit_130(toy, tmp_path):
    """The script as a user runs it, interrupted by SIGINT (Ctrl-C) mid-run."""
    out = str(tmp_path / "out")
    p = subprocess.Popen([sys.executable, "train_teacher_rl.py", *TINY_RL, f"--init={toy['base']}",
                          f"--out_dir={out}", "--steps=10000", "--eval_every=10000"], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        t0 = time.time()
        while not (os.path.exists(out + ".log/metrics.jsonl") and len(open(out + ".log/metrics.jsonl").readlines())
                   >= 2) and time.time() - t0 < 240 and p.poll() is None:
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    m = re.fullmatch(rf"error: interrupted (?:after step (\d+) of 10000|before step 1); last checkpoint: "
                     rf"(?:step (\d+) in {re.escape(out)}(?:\.staging)?|none in {re.escape(out)})", lines[0])
    assert m, lines[0]
    assert not glob.glob(out + ".lock")


@pytest.mark.parametrize("case", ["parent is a file", "parent not writable"])
def test_an_out_dir_that_cannot_be_written_is_one_line(case, toy, tmp_path, capsys, monkeypatch):
    if case == "parent is a file":
        (tmp_path / "file").write_text("")
        out, line = str(tmp_path / "file" / "sub" / "out"), f"{tmp_path}/file is not a directory"
    else:
        monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path)))
        out, line = str(tmp_path / "ro" / "out"), f"cannot write in {tmp_path} (permission denied)"
    before = _snap(str(tmp_path))
    assert _run("train_teacher_rl", TINY_RL + [f"--init={toy['base']}", f"--out_dir={out}"], capsys) == (2, [
        f"error: --out_dir={out}: {line}"])
    assert _snap(str(tmp_path)) == before
