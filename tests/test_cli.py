"""
The command line of every script (config.py): --help written from each config dataclass,
--key=value == --key value, and every bad input one line "error: ..." on stderr, exit 2, no
traceback, nothing written. Most cases call main() in-process through config.cli (fast); a
few run the real scripts as subprocesses, to prove the exit status and the bare stderr.
"""
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
SCRIPTS = ["train_mopd", "train_teacher_rl", "train_sft", "merge", "evaluate", "rollout", "plan_memory"]
BENCHES = ["bench_rl", "bench_mopd", "bench_kl", "bench_sampling"]  # bench/*.py: the same command line


def _module(script):
    return importlib.import_module(script)


def _parse(script, argv):
    mod = _module(script)
    return config.parse_config(mod.Config, argv, getattr(mod, "PRESETS", None), getattr(mod, "LIMITS", None))

# ---- --help ---------------------------------------------------------------------------------

def _expected_groups(cls):
    """The test's own reading of a dataclass's source, line by line, and of its bases' (a base
    first; a field redeclared in a subclass keeps its base's header, and its base's comment
    unless it has its own): {field: (header, comment)}."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        header, last, indent = "", None, None
        for line in inspect.getsource(klass).splitlines()[2:]:  # after "@dataclass" and "class Config:"
            col = len(line) - len(line.lstrip())
            m = re.match(r"\s*(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
            if m and (indent is None or col == indent):
                indent, last = col, m[1]
                comment = (m[2] or "").strip()
                out[last] = (out[last][0], comment or out[last][1]) if last in out else (header, comment)
            elif line.strip().startswith("#") and indent is not None and col > indent and last:
                out[last] = (out[last][0], (out[last][1] + " " + line.strip()[1:].strip()).strip())
            elif line.strip().startswith("#"):
                header, last = line.strip()[1:].strip(), None
    return out


def _shown(v):
    return str(v).lower() if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else \
        "(none)" if v == [] else repr(v)


@pytest.mark.parametrize("script", SCRIPTS + BENCHES)
def test_help_lists_every_field_with_default_and_comment_grouped(script, capsys):
    mod = _module(script)
    with pytest.raises(SystemExit) as e:
        config.cli(lambda: mod.main(["--steps=0", "--help"]))  # --help wins over anything else
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert out.startswith(mod.__doc__.strip().split("\n\n")[0])
    flat = " ".join(out.split())
    headers = [i for i, l in enumerate(lines) if l and not l.startswith(" ")]
    expected = _expected_groups(mod.Config)
    assert list(expected) == [f.name for f in dataclasses.fields(mod.Config)]
    defaults = mod.Config()
    for name, (header, comment) in expected.items():
        at = [i for i, l in enumerate(lines) if l.startswith(f"  --{name} ")]
        assert len(at) == 1, name
        assert f" = {_shown(getattr(defaults, name))}" in lines[at[0]], (name, lines[at[0]])
        assert " ".join(comment.split()) in flat, (name, comment)
        group = [lines[i] for i in headers if i < at[0]][-1]  # the nearest line above that is not indented
        assert group == header if header else group.startswith("usage: "), (name, header, group)
    assert "  --threads INT = 0" in out and "  --help" in out
    for preset in getattr(mod, "PRESETS", {}):
        assert re.search(rf"^  {re.escape(preset)}: ", out, re.M), preset
    if not getattr(mod, "PRESETS", None):
        assert "presets: none" in out

# ---- the convention -------------------------------------------------------------------------

SPACED = {  # valid --key=value options per script; each must parse the same as --key value
    "train_mopd": ["--preset=tiny", "--steps=5", "--loss=topk", "--resume=true", "--lr=0.001", "--teacher_dtype=bfloat16"],
    "train_teacher_rl": ["--preset=tiny", "--domains=rev,sort", "--domain_weights=1,2", "--bf16=true", "--eps_high=0.3"],
    "train_sft": ["--preset=tiny", "--noise=0.5", "--init=x", "--device=cpu"],
    "merge": ["--mode=average", "--base=B", "--teacher=rev=T", "--out=O", "--lambdas=0.5,1"],
    "evaluate": ["--out=O", "--model=A=.", "--model=B C=.", "--limit=3", "--aggregate=README.md"],
    "rollout": ["--model=.", "--prompt=what is 2+3?", "--prompt=hi", "--n=2", "--dtype=float32", "--no_chat_template=true"],
    "plan_memory": ["--world_size=16", "--dry_run=true", "--mfu=0.5", "--config=."],
}


def _spaced(argv):
    out = []
    for a in argv:
        k, _, v = a.partition("=")
        out += [k] if v == "true" else [k, v]  # a bool: the bare --flag
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_key_space_value_is_key_equals_value(script, monkeypatch):
    monkeypatch.chdir(ROOT)  # the paths above are relative to it
    a, b = _parse(script, SPACED[script]), _parse(script, _spaced(SPACED[script]))
    assert a == b and a != _module(script).Config()


@dataclass
class Demo:
    name: str = "x"                # a name
    # numbers
    k: int = 1                     # how many
                                   # (a continued comment)
    on: bool = False
    files: list[str] = field(default_factory=list)  # several; repeat


def test_lists_bools_threads_and_the_source_notes():
    cfg = config.parse_config(Demo, ["--files", "a", "b", "--on", "--files=c", "--k", "-3"])
    assert cfg == Demo(files=["a", "b", "c"], on=True, k=-3)
    assert config.parse_config(Demo, ["--on", "false", "--name", "y"]) == Demo(on=False, name="y")
    assert config.source_notes(Demo) == [("", [("name", "a name")]),
                                         ("numbers", [("k", "how many (a continued comment)"), ("on", ""),
                                                      ("files", "several; repeat")])]
    n = torch.get_num_threads()
    try:
        config.parse_config(Demo, ["--threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
    with pytest.raises(ValueError, match=r"^--k: expected a value \(--k=VALUE or --k VALUE\)$"):
        config.parse_config(Demo, ["--k"])


@dataclass
class DemoMore(Demo):
    extra: int = 0                 # new, before any header: the first group
    # numbers
    big: int = 9                   # joins the base's group of this header
    k: int = 2                     # redeclared: keeps its place, takes this comment
    on: bool = True
    # more
    z: str = ""


def test_source_notes_walk_the_base_classes():
    """A config declared once in a base (train_utils.OnPolicyConfig): the subclass's new fields join
    the base's groups by header, a redeclared field keeps its place and (without a comment of its
    own) its base's comment, and --help shows the subclass's defaults."""
    assert config.source_notes(DemoMore) == [
        ("", [("name", "a name"), ("extra", "new, before any header: the first group")]),
        ("numbers", [("k", "redeclared: keeps its place, takes this comment"), ("on", ""),
                     ("files", "several; repeat"), ("big", "joins the base's group of this header")]),
        ("more", [("z", "")])]
    text = config.help_text(DemoMore)
    assert "  --k INT = 2 " in text and "  --on BOOL = true" in text
    assert config.parse_config(DemoMore, ["--k=5", "--big", "1"]) == DemoMore(k=5, big=1)

# ---- bad input: one line, exit 2, nothing written ---------------------------------------------

NOTOK = "none of tokenizer.json, vocab.json, tokenizer.model"
ARCH = "unsupported architectures=['GPT2LMHeadModel']; supported: ['LlamaForCausalLM', 'Qwen3ForCausalLM', " \
       "'Qwen3MoeForCausalLM']"
MOPD = ["--init={base}", "--out_dir={out}", "--domains=rev,sort", "--teacher=rev={rev},sort={sort}"]
MERGE = ["--mode=average", "--base={base}", "--teacher=rev={rev},sort={sort}", "--out={out}"]
EVAL = ["--domains=rev,sort", "--base={base}", "--teacher=rev={rev},sort={sort}", "--out={out}"]
NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is False)"

BAD = [  # (script, argv, the one line on stderr)
    ("train_mopd", MOPD + ["--ckpt_every=0"], "--ckpt_every=0: must be >= 1"),
    ("train_mopd", MOPD + ["--eval_every=0"], "--eval_every=0: must be >= 1"),
    ("train_mopd", MOPD + ["--micro_batch=0"], "--micro_batch=0: must be >= 1"),
    ("train_mopd", MOPD + ["--steps=0"], "--steps=0: must be >= 1"),
    ("train_mopd", MOPD + ["--steps", "-5"], "--steps=-5: must be >= 1"),
    ("train_mopd", MOPD + ["--prompts_per_step=0"], "--prompts_per_step=0: must be >= 1"),
    ("train_mopd", MOPD + ["--lr=-1"], "--lr=-1.0: must be > 0"),
    ("train_mopd", MOPD + ["--teacher_dtype=float99"], "--teacher_dtype=float99: must be one of float32, bfloat16, float16"),
    ("train_mopd", MOPD + ["--loss=nope"], "--loss=nope: must be one of pg, topk, reverse_kl, forward_kl, jsd"),
    ("train_mopd", MOPD + ["--device=cuda"], "--device=cuda: " + NO_GPU),
    ("train_mopd", MOPD + ["--device=gpu"], "--device=gpu: expected auto, cpu, mps, cuda or cuda:N"),
    ("train_mopd", MOPD + ["--domain_weights=a,b"], "--domain_weights=a,b: expected comma-separated numbers (e.g. 0.5,1.0)"),
    ("train_mopd", MOPD + ["--domain_weights=1"], "--domain_weights=1: need 2 non-negative weights for domains ['rev', 'sort']"),
    ("train_mopd", MOPD + ["--stepz=3"], "--stepz: unknown config key (did you mean --steps?); python train_mopd.py --help lists the keys"),
    ("train_mopd", MOPD + ["--steps=abc"], "--steps=abc: expected a value of type int"),
    ("train_mopd", MOPD + ["--steps"], "--steps: expected a value (--steps=VALUE or --steps VALUE)"),
    ("train_mopd", MOPD + ["--resume=maybe"], "--resume=maybe: expected a value of type bool (true or false)"),
    ("train_mopd", MOPD + ["steps=3"], "'steps=3': expected --key=value or --key value; python train_mopd.py --help lists the keys"),
    ("train_mopd", MOPD + ["--preset=huge"], "--preset=huge: unknown preset; presets: toy, worked, tiny, smol, qwen3-30b-a3b-8xh100"),
    ("train_mopd", MOPD + ["--threads=-1"], "--threads=-1: must be >= 0"),
    ("train_mopd", MOPD + ["--teacher=rev"], "--teacher=rev: teacher 'rev': expected DOMAIN=DIR"),
    ("train_mopd", MOPD + ["--init={notok}"], "--init={notok}: no tokenizer files in it (" + NOTOK + ")"),
    ("train_mopd", MOPD + ["--init={gpt2}"], "{gpt2}/config.json: " + ARCH),
    ("train_mopd", MOPD + ["--teacher=rev={notok},sort={sort}"], "--teacher=rev={notok}: no tokenizer files in it (" + NOTOK + ")"),
    ("train_teacher_rl", ["--init={base}", "--out_dir={out}", "--micro_batch=0"], "--micro_batch=0: must be >= 1"),
    ("train_teacher_rl", ["--init={notok}", "--out_dir={out}"], "--init={notok}: no tokenizer files in it (" + NOTOK + ")"),
    ("train_sft", ["--out_dir={out}", "--steps=0"], "--steps=0: must be >= 1"),
    ("train_sft", ["--out_dir={out}", "--noise=2"], "--noise=2.0: must be in [0, 1]"),
    ("train_sft", ["--out_dir={out}", "--init={notok}", "--domains=rev"], "--init={notok}: no tokenizer files in it (" + NOTOK + ")"),
    ("merge", [], "--mode: required"),
    ("merge", ["--mode=nope", *MERGE[1:]], "--mode=nope: must be one of average, task_arithmetic"),
    ("merge", [MERGE[0], *MERGE[2:]], "--base: required"),
    ("merge", [*MERGE[:2], MERGE[3]], "--teacher: required"),
    ("merge", MERGE[:3], "--out: required"),
    ("merge", MERGE + ["--lambdas=a,b"], "--lambdas=a,b: expected comma-separated numbers (e.g. 0.5,1.0)"),
    ("merge", MERGE + ["--val_n=0"], "--val_n=0: must be >= 1"),
    ("merge", MERGE + ["--teacher=rev"], "--teacher=rev: teacher 'rev': expected DOMAIN=DIR"),
    ("merge", MERGE + ["--teacher=rev={tmp}/nope"], "--teacher=rev={tmp}/nope: no such checkpoint directory"),
    ("merge", MERGE + ["--base={notok}"], "--base={notok}: no tokenizer files in it (" + NOTOK + ")"),
    ("merge", ["--mode=task_arithmetic", "--base={base}", "--teacher=rev={rev},sort={sort}", "--out={out}", "--domains=rev,inc"],
     "--domains=rev,inc: domains ['inc', 'rev'] do not match the teachers ['rev', 'sort']"),
    ("train_mopd", MOPD + ["--rollout_engine=vllm"], "--rollout_engine=vllm: vllm is not installed (pip install -r requirements-vllm.txt)"),
    ("train_mopd", MOPD + ["--teacher_engine=vllm"], "--teacher_engine=vllm: vllm is not installed (pip install -r requirements-vllm.txt)"),
    ("train_mopd", MOPD + ["--rollout_engine=sglang"], "--rollout_engine=sglang: must be one of native, vllm"),
    ("evaluate", [], "--out: required"),
    ("evaluate", ["--out={out}"], "--domains: required (or --aggregate FILE...)"),
    ("evaluate", [*EVAL[:1], *EVAL[2:]], "--base: required (or --aggregate FILE...)"),
    ("evaluate", EVAL + ["--model=MOPD"], "--model=MOPD: expected LABEL=PATH"),
    ("evaluate", EVAL + ["--model=MOPD={tmp}/nope"], "--model=MOPD={tmp}/nope: {tmp}/nope: no such file or directory"),
    ("evaluate", ["--out={out}", "--aggregate", "{tmp}/nope.json"], "--aggregate={tmp}/nope.json: no such file or directory"),
    ("evaluate", EVAL + ["--limit=-1"], "--limit=-1: must be >= 0"),
    ("evaluate", EVAL + ["--teacher=rev={rev}"], "--teacher=rev={rev}: no teacher for domain(s) ['sort']"),
    ("evaluate", EVAL + ["--base={notok}"], "--base={notok}: no tokenizer files in it (" + NOTOK + ")"),
    ("rollout", [], "--model: required"),
    ("rollout", ["--model", "{base}"], "--prompt: required"),
    ("rollout", ["--model={tmp}/nope", "--prompt=hi"], "--model={tmp}/nope: no such file or directory"),
    ("rollout", ["--model={base}", "--prompt=hi", "--dtype=float99"], "--dtype=float99: must be one of auto, float32, bfloat16, float16"),
    ("rollout", ["--model={base}", "--prompt=hi", "--n=0"], "--n=0: must be >= 1"),
    ("rollout", ["--model={base}", "--prompt=hi", "--n", "two"], "--n=two: expected a value of type int"),
    ("rollout", ["--model={base}", "--prompt=hi", "--max_new_tokens=0"], "--max_new_tokens=0: must be >= 1"),
    ("rollout", ["--model={base}", "--prompt=hi", "--temperature=-1"], "--temperature=-1.0: must be >= 0"),
    ("rollout", ["--model={base}", "--prompt=hi", "--top_p=2"], "--top_p=2.0: must be in (0, 1]"),
    ("rollout", ["--model={base}", "--prompt=hi", "--top_k=-1"], "--top_k=-1: must be >= 0"),
    ("rollout", ["--model={base}", "--prompt=hi", "--device=cuda"], "--device=cuda: " + NO_GPU),
    ("rollout", ["--model={notok}", "--prompt=hi"], "--model={notok}: no tokenizer files in it (" + NOTOK + ")"),
    ("rollout", ["--model={gpt2}", "--prompt=hi"], "{gpt2}/config.json: " + ARCH),
    ("plan_memory", ["--world_size=0"], "--world_size=0: must be >= 1"),
    ("plan_memory", ["--mfu=2"], "--mfu=2.0: must be in (0, 1]"),
    ("plan_memory", ["--gpu_gib=0"], "--gpu_gib=0.0: must be > 0"),
    ("plan_memory", ["--seq_len=64k"], "--seq_len=64k: expected a value of type int"),
    ("plan_memory", ["--dry_run=maybe"], "--dry_run=maybe: expected a value of type bool (true or false)"),
    ("plan_memory", ["--world_sise=8"], "--world_sise: unknown config key (did you mean --world_size?); "
                                        "python plan_memory.py --help lists the keys"),
    ("plan_memory", ["--model=llama-9000"], "--model=llama-9000: unknown; built in: qwen3-30b-a3b (or --config=PATH)"),
    ("plan_memory", ["--config={tmp}/nope.json"], "--config={tmp}/nope.json: no such file or directory"),
    ("plan_memory", ["--config={gpt2}"], "{gpt2}/config.json: " + ARCH),
]


@pytest.fixture(scope="module")
def dirs(toy, tmp_path_factory):
    """The toy checkpoints, one without its tokenizer files, one of an unsupported architecture."""
    from model import TOKENIZER_FILES
    root = tmp_path_factory.mktemp("cli")
    notok, gpt2 = str(root / "notok"), str(root / "gpt2")
    shutil.copytree(toy["base"], notok)
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(notok, f)):
            os.remove(os.path.join(notok, f))
    shutil.copytree(toy["base"], gpt2)
    with open(os.path.join(gpt2, "config.json")) as f:
        c = json.load(f)
    with open(os.path.join(gpt2, "config.json"), "w") as f:
        json.dump({**c, "architectures": ["GPT2LMHeadModel"]}, f)
    return {**toy, "notok": notok, "gpt2": gpt2, "tmp": str(root)}


def _tree_hash(*paths):
    h = hashlib.sha256()
    for p in paths:
        for d, sub, files in sorted(os.walk(p)):
            sub.sort()
            for f in sorted(files):
                h.update(os.path.relpath(os.path.join(d, f), p).encode())
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


@pytest.mark.parametrize("script,argv,line", BAD, ids=[f"{s}:{' '.join(a[len(MOPD):] if s == 'train_mopd' else a)}"
                                                      for s, a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(script, argv, line, dirs, tmp_path, capsys):
    if "cuda" in line and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    paths = {**dirs, "out": str(tmp_path / "out")}
    argv = [a.format(**paths) for a in argv]
    before = _tree_hash(dirs["base"], dirs["rev"], dirs["sort"], dirs["notok"], dirs["gpt2"])
    mod = _module(script)
    with pytest.raises(SystemExit) as e:
        config.cli(lambda: mod.main(argv))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: " + line.format(**paths)]
    assert os.listdir(tmp_path) == []  # no out dir, no .log, no results
    assert _tree_hash(dirs["base"], dirs["rev"], dirs["sort"], dirs["notok"], dirs["gpt2"]) == before


def test_real_scripts_exit_2_with_one_line_and_no_traceback(tmp_path):
    """The scripts as a user runs them (subprocesses, in parallel): --help exits 0; bad input
    exits 2 with exactly one line on stderr, before any checkpoint is looked at."""
    cases = [  # three, each a few seconds of imports (torch): the in-process cases above cover the rest
        (["train_mopd.py", "--help"], 0, None),
        (["train_mopd.py", "--micro_batch", "0"], 2, "error: --micro_batch=0: must be >= 1"),
        (["merge.py", "--mode", "average", "--base", "B", "--teacher", "rev=T", "--out", str(tmp_path / "o"),
          "--lambdas", "a,b"], 2, "error: --lambdas=a,b: expected comma-separated numbers (e.g. 0.5,1.0)"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _, _ in cases]
    for (argv, code, line), p in zip(cases, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == code, (argv, err)
        if line is None:
            assert err == "" and out.startswith("Stage 3: MOPD") and "  --micro_batch INT = 256" in out
        else:
            assert err.splitlines() == [line] and "Traceback" not in err, (argv, err)
    assert os.listdir(tmp_path) == []


RUNS = sorted(f for f in os.listdir(os.path.join(ROOT, "runs")) if f.endswith(".sh") and f not in ("args.sh", "seeds.sh"))


@pytest.mark.parametrize("script", RUNS)
def test_run_scripts_take_help_and_refuse_arguments(script, tmp_path):
    """runs/*.sh read their settings from the environment, so `--help` prints the header and an
    argument is refused (exit 2, one line) before anything runs: `bash runs/study.sh --help`
    must not start hours of training. Run from an empty directory, which must stay empty."""
    path = os.path.join(ROOT, "runs", script)
    header = [line[2:] for line in open(path).read().splitlines()[1:4]]
    r = subprocess.run(["bash", path, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.splitlines()[:3] == header, (script, r.stdout, r.stderr)
    r = subprocess.run(["bash", path, "--steps=2"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == "", (script, r.stdout, r.stderr)
    assert r.stderr.splitlines() == [f"error: {path} takes no arguments, got '--steps=2': its settings are "
                                     f"environment variables (see {path} --help)"]
    assert os.listdir(tmp_path) == [] and not os.path.exists(os.path.join(ROOT, "out", "study.txt"))


@pytest.mark.parametrize("script,env,message", [
    ("study.sh", {"STAGES": "worked bogus"}, "STAGES: no stage bogus"),
    ("mixture.sh", {"PRESET": "digits"}, "PRESET=digits"),
    ("worked.sh", {"PRESET": "digits"}, "PRESET=digits"),
    ("estimators.sh", {"OTHER": "yes"}, "OTHER=yes"),
    ("estimators.sh", {"OTHER": "next", "SEED_LIST": "0"}, "SEED_LIST needs >= 2 seeds"),
])
def test_run_scripts_refuse_bad_settings(script, env, message, tmp_path):
    """A bad setting of a runs/*.sh stops it in one line, exit 2, before anything is written:
    a study that would run for hours with a stage misspelt, or with its other-origin teachers
    the same seed's own (OTHER=next with one seed), never starts."""
    out = tmp_path / "out"
    e = dict(os.environ, OUT=str(out), DOCS=str(tmp_path / "docs"), EST=str(tmp_path / "est"), **env)
    r = subprocess.run(["bash", os.path.join(ROOT, "runs", script)], env=e, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and r.stdout == "", (script, r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_no_module_of_ours_shadows_an_installed_package():
    """Every script runs with this directory first on sys.path, so a top-level module of ours
    named like an installed package hides that package from every library that imports it:
    kernels.py did so to Hugging Face's `kernels` (transformers >= 5.25 requires and imports
    it), and from here every `from transformers import ...ForCausalLM` failed. No module at the
    top of this repository may share its name with an installed distribution's package."""
    from importlib.metadata import packages_distributions
    ours = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    installed = packages_distributions()
    assert {m: installed[m] for m in sorted(ours) if m in installed} == {}
    # and the import that failed works (transformers' own model classes, from this directory)
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM  # noqa: F401


def test_estimators_other_origin_teachers_are_the_next_seeds(tmp_path):
    """runs/estimators.sh OTHER=next: seed s's other-origin arm distils from the teachers of the seed
    after s in SEED_LIST (cyclically: another S0, never s's own), and its evaluation lists those
    teachers. Every command the script would run is recorded by a stand-in for python (PY), so the
    plumbing is checked in a second, without training anything."""
    log, fake = tmp_path / "commands.txt", tmp_path / "fakepy"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    e = dict(os.environ, OUT=str(out), DOCS=str(tmp_path / "docs"), PY=str(fake), OTHER="next", SEED_LIST="3 0 7",
             PRESET="worked", VARIANTS="pg", PARALLEL="4")
    r = subprocess.run(["bash", os.path.join(ROOT, "runs", "estimators.sh")], env=e, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    commands = log.read_text().splitlines()
    for seed, other in (("3", "0"), ("0", "7"), ("7", "3")):
        teachers = ",".join(f"{d}={out}/seed{other}/teacher_{d}" for d in ("add", "mul", "isort"))
        arm = [c for c in commands if f"--out_dir={out}/seed{seed}/mopd_pg_other " in c]
        assert len(arm) == 1 and f"--teacher={teachers} " in arm[0] and f"--seed={seed} " in arm[0], arm
        ev = [c for c in commands if c.startswith("evaluate.py") and f"--out={out}/seed{seed}/results " in c]
        assert len(ev) == 1 and all(f"--model=other-origin teacher[{d}]={out}/seed{other}/teacher_{d} " in ev[0]
                                    for d in ("add", "mul", "isort")), ev
    # every seed's teachers are trained (first pass) before any other-origin arm reads them (second pass)
    first_arm = min(i for i, c in enumerate(commands) if "mopd_pg_other" in c)
    assert max(i for i, c in enumerate(commands) if "/teacher_" in c and c.startswith("train_teacher_rl.py")) < first_arm
