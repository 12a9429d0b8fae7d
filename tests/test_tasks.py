"""Tests for tasks.py: toy domains, the toy tokenizer, real-domain loading and rewards, and
the code reward against hostile programs (the sandbox itself: tests/test_sandbox.py)."""

import json
import os
import random
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tasks  # noqa: E402
from tasks import Example  # noqa: E402


# -----------------------------------------------------------------------------
# Toy domains

def test_toy_domain_list():
    assert tasks.TOY_DOMAINS[:3] == ["rev", "sort", "inc"] and len(tasks.TOY_DOMAINS) == 17
    assert len(set(tasks.TOY_DOMAINS)) == 17 and tasks.TOY_DOMAINS[-1] == "sum"  # opt-in: last, past toy:16


@pytest.mark.parametrize("name,digits,answer", [
    ("rev", "48310", "01384"), ("sort", "48310", "01348"), ("sum", "48310", "16"),
    ("sum", "999999", "54"), ("max", "48310", "8"), ("min", "48310", "0"), ("odd", "48310", "2"), ("odd", "2468", "0"),
    ("inc", "48390", "59401"), ("uniq", "48348", "483"), ("uniq", "123", "123"), ("rot", "48310", "83104"),
    ("desc", "48310", "84310"), ("dec", "48390", "37289"), ("rotr", "48310", "04831"), ("comp", "48310", "51689"),
    ("swap", "48310", "08314"), ("swap", "123", "321"), ("even", "48310", "3"), ("even", "1357", "0"),
    ("dbl", "48315", "86620"), ("tail", "48310", "8310"),
])
def test_toy_answers(name, digits, answer):
    ex = tasks._toy_example(name, digits)
    assert ex.prompt == f"{name} {digits}=" and ex.answer == answer and ex.domain == name


def test_toy_outputs_differ_across_domains():
    # The point of the design: one input, a different correct behaviour per domain.
    answers = {tasks._toy_example(n, "48310").answer for n in tasks.TOY_DOMAINS}
    assert len(answers) == len(tasks.TOY_DOMAINS)


def test_toy_reward():
    ex = tasks._toy_example("rev", "48310")
    assert tasks.toy_reward("01384", ex) == 1.0
    assert tasks.toy_reward(" 01384\n", ex) == 1.0  # surrounding whitespace ignored
    for wrong in ["01348", "0138", "013840", "01384 01384", "", "rev 48310=01384", "O1384"]:
        assert tasks.toy_reward(wrong, ex) == 0.0, wrong


def test_toy_eval_split_is_fixed_and_held_out():
    doms = tasks.get_domains("toy:8")
    again = tasks.get_domains(",".join(tasks.TOY_DOMAINS))
    for d, d2 in zip(doms, again):
        assert len(d.eval_set) == tasks.EVAL_SIZE
        assert [e.prompt for e in d.eval_set] == [e.prompt for e in d2.eval_set]  # deterministic
        assert len({e.prompt for e in d.eval_set}) == tasks.EVAL_SIZE
        assert all(tasks.is_toy_eval(e.meta["digits"]) for e in d.eval_set)
        assert all(d.reward(d.demo(e), e) == 1.0 for e in d.eval_set)
        eval_prompts = {e.prompt for e in d.eval_set}
        rng = random.Random(0)
        train = [d.sample(rng) for _ in range(5000)]
        assert not any(tasks.is_toy_eval(e.meta["digits"]) for e in train)
        assert not eval_prompts & {e.prompt for e in train}
        assert len({e.prompt for e in train}) > 4000  # fresh examples, not a tiny pool
        lens = {len(e.meta["digits"]) for e in train}
        assert lens == set(range(tasks.TOY_MIN_DIGITS, tasks.TOY_MAX_DIGITS + 1))
        assert all(e.domain == d.name and e.prompt.startswith(d.name + " ") for e in train)
    # same seed, same stream
    assert [doms[0].sample(random.Random(7)).prompt for _ in range(3)] == \
           [doms[0].sample(random.Random(7)).prompt for _ in range(3)]


def test_toy_eval_inputs_shared_across_domains():
    doms = tasks.get_domains("rev,sort,sum")
    digits = [[e.meta["digits"] for e in d.eval_set] for d in doms]
    assert digits[0] == digits[1] == digits[2]


# -----------------------------------------------------------------------------
# Worked toy domains: long answers whose steps compound

def _true_answer(name, inp):
    if name == "add":
        a, b = inp.split("+")
        return int(a) + int(b)
    if name == "mul":
        a, m = inp.split("x")
        return int(a) * int(m)
    return "".join(sorted(inp))


@pytest.mark.parametrize("name,inp,style,response", [
    ("add", "483+295", 0, "3+5=8,8+9=17,4+2+1=7:778"),
    ("add", "483+295", 1, "5+3=8,9+8=17,2+4+1=7:778"),
    ("add", "95+17", 0, "5+7=12,9+1+1=11:112"),
    ("mul", "4831x7", 0, "1x7=7,3x7=21,8x7+2=58,4x7+5=33:33817"),
    ("mul", "4831x7", 1, "7x1=7,7x3=21,7x8+2=58,7x4+5=33:33817"),
    ("isort", "4831", 0, "4,48,348,1348:1348"),
    ("isort", "4831", 1, "1,13,138,1348:1348"),
    ("isort", "3131", 0, "3,13,133,1133:1133"),
])
def test_worked_solutions(name, inp, style, response):
    assert tasks.worked_solution(name, inp, style) == (response, response.rsplit(":", 1)[1])


@pytest.mark.parametrize("name", tasks.WORKED_DOMAINS)
def test_worked_domain_answers_lengths_and_split(name):
    d = tasks.get_domains(name)[0]
    rng = random.Random(0)
    train = [d.sample(rng) for _ in range(3000)]
    for ex in train[:500] + d.eval_set:
        want = _true_answer(name, ex.meta["input"])
        assert (int(ex.answer) if name != "isort" else ex.answer) == want
        r = d.demo(ex)
        assert d.reward(r, ex) == 1.0 and r.endswith(":" + ex.answer)
        # one step per digit of the (first) number, each step on the previous step's result
        assert r.count(",") + 1 == tasks.worked_steps(ex)
        assert ex.prompt == f"{name} {ex.meta['input']}="
    # answers are long (20-50 tokens), both styles occur and differ, and every prompt + answer + <eos>
    # fits the worked presets' context (128) and answer budget (64)
    lens = [len(d.demo(e)) for e in train]
    assert 15 <= min(lens) and max(lens) <= 50 and sum(lens) / len(lens) >= 25
    assert {e.meta["style"] for e in train} == {0, 1}
    ex = train[0]
    other = Example(ex.prompt, ex.answer, name, {**ex.meta, "style": 1 - ex.meta["style"]})
    assert d.demo(other) != d.demo(ex) or len(set(ex.meta["digits"])) == 1
    assert max(len(e.prompt) + 1 for e in train) + 50 + 1 <= 128
    # held out by the CRC rule on the input; the eval set is fixed
    assert len(d.eval_set) == tasks.EVAL_SIZE == len({e.prompt for e in d.eval_set})
    assert all(tasks.is_toy_eval(e.meta["input"]) for e in d.eval_set)
    assert not any(tasks.is_toy_eval(e.meta["input"]) for e in train)
    assert [e.prompt for e in d.eval_set] == [e.prompt for e in tasks.get_domains(name)[0].eval_set]


@pytest.mark.parametrize("name", tasks.WORKED_DOMAINS)
def test_a_slip_compounds(name):
    """A slip at step i leaves steps < i as they were, changes step i, and (nearly always) the
    final answer: the later steps build on the wrong value."""
    d, rng = tasks.get_domains(name)[0], random.Random(1)
    wrong = total = 0
    for _ in range(300):
        ex = d.sample(rng)
        steps = tasks.worked_steps(ex)
        i = rng.randrange(1, steps)
        good = d.demo(ex).split(":")[0].split(",")
        bad, answer = tasks.worked_solution(name, ex.meta["input"], ex.meta["style"], slip=i, rng=rng)
        bad_steps = bad.split(":")[0].split(",")
        assert bad_steps[:i] == good[:i] and len(bad_steps) == len(good)
        total += 1
        if bad_steps[i] != good[i]:
            wrong += answer != ex.answer
            assert d.reward(bad, ex) == float(answer == ex.answer)
    assert wrong >= 0.8 * total


def test_worked_reward_reads_the_text_after_the_last_colon():
    ex = tasks.worked_domain("add").eval_set[0]
    assert tasks.worked_reward(f"x:{ex.answer}", ex) == 1.0
    assert tasks.worked_reward(f"{ex.answer}\n", ex) == 1.0  # no worked steps: the answer alone counts
    assert tasks.worked_reward(f"1+1=2:{ex.answer}:9", ex) == 0.0
    assert tasks.worked_reward(f"{ex.answer}:", ex) == 0.0


def test_noisy_demos_of_worked_domains_slip():
    import train_sft
    for name in tasks.WORKED_DOMAINS:
        d, rng = tasks.get_domains(name)[0], random.Random(2)
        exs = [d.sample(rng) for _ in range(400)]
        assert all(train_sft.noisy_answer(e, rng, 0.0) == d.demo(e) for e in exs)
        wrong = sum(d.reward(train_sft.noisy_answer(e, rng, 1.0), e) == 0 for e in exs)
        assert wrong >= 0.7 * len(exs)


def test_noisy_toy_demos_take_another_trained_domains_answer():
    # S0's interference comes from the skills it is taught: a noisy demo of `rev` in a toy:3
    # run is sort's or inc's answer, never that of a domain S0 never sees (e.g. the opt-in sum)
    import train_sft
    trained = ["rev", "sort", "inc"]
    d, rng = tasks.toy_domain("rev"), random.Random(3)
    exs = [d.sample(rng) for _ in range(600)]
    assert all(train_sft.noisy_answer(e, rng, 0.0, trained) == e.answer for e in exs)
    got = [train_sft.noisy_answer(e, rng, 1.0, trained) for e in exs]
    sort_, inc = (tasks.TOY_OPS[n][1] for n in ("sort", "inc"))
    assert all(g in (sort_(e.meta["digits"]), inc(e.meta["digits"])) for g, e in zip(got, exs))
    assert sum(g == inc(e.meta["digits"]) for g, e in zip(got, exs)) > 200  # both occur
    alone = [train_sft.noisy_answer(e, rng, 1.0, ["rev"]) for e in exs]  # no other trained domain:
    assert sum(a != e.answer for a, e in zip(alone, exs)) > 500          # any other toy domain's answer


# -----------------------------------------------------------------------------
# Toy tokenizer

def _toy_texts():
    texts = []
    for d in tasks.get_domains("toy:8"):
        rng = random.Random(1)
        for ex in d.eval_set[:20] + [d.sample(rng) for _ in range(20)]:
            texts += [ex.prompt, ex.answer]
    return texts


def test_toy_tokenizer_is_char_level_and_small():
    tok = tasks.toy_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) < 64
    for text in _toy_texts():
        ids = tok.encode(text)
        assert len(ids) == len(text)  # one token per char, no <bos>/<eos> added
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    ids = [tok.bos_token_id] + tok.encode("rev 123=") + tok.encode("321") + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "rev 123=321"
    assert tok.decode(tok.encode("a, b. c")) == "a, b. c"  # no space clean-up


def test_saved_toy_tokenizer_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer
    tasks.save_toy_tokenizer(str(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(tmp_path))
    tok, auto = tasks.toy_tokenizer(), AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2)
    assert len(auto) == len(tok) and auto.get_vocab() == tok.get_vocab()
    for text in _toy_texts() + ["sort 0=<eos>", "unknown ~ char"]:
        assert auto.encode(text) == tok.encode(text)
        assert auto.decode(auto.encode(text)) == tok.decode(tok.encode(text))


# -----------------------------------------------------------------------------
# get_domains and JSONL loading

def test_get_domains_spec():
    assert [d.name for d in tasks.get_domains("rev,sort,sum")] == ["rev", "sort", "sum"]
    assert [d.name for d in tasks.get_domains(["max", "odd, inc"])] == ["max", "odd", "inc"]
    assert [d.name for d in tasks.get_domains("toy:3")] == ["rev", "sort", "inc"]
    assert [d.name for d in tasks.get_domains("toy:17")] == tasks.TOY_DOMAINS  # the last one, opt-in sum, included
    with pytest.raises(ValueError, match="rev, sort, inc, odd"):  # lists what exists
        tasks.get_domains("rev,nope")
    for bad in ["", "toy:0", "toy:18", "rev,rev", "math:", "chess:x.jsonl"]:
        with pytest.raises(ValueError):
            tasks.get_domains(bad)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _math_rows(n):
    return [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]


def test_real_domain_split_and_spec(tmp_path):
    _write(tmp_path / "m.jsonl", _math_rows(300))
    (d,) = tasks.get_domains("math:m.jsonl", data_dir=str(tmp_path))
    assert d.name == "math" and 0 < len(d.eval_set) <= tasks.EVAL_SIZE
    (d2,) = tasks.get_domains(f"gsm=math:{tmp_path / 'm.jsonl'}")
    assert d2.name == "gsm" and [e.prompt for e in d2.eval_set] == [e.prompt for e in d.eval_set]
    eval_prompts = {e.prompt for e in d.eval_set}
    rng = random.Random(0)
    train = {d.sample(rng).prompt for _ in range(3000)}
    assert not train & eval_prompts and len(train) + len(eval_prompts) == 300
    with pytest.raises(ValueError, match="unique"):
        tasks.get_domains("math:m.jsonl,math:m.jsonl", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no such file"):
        tasks.get_domains("math:missing.jsonl", data_dir=str(tmp_path))


def test_explicit_split_field(tmp_path):
    rows = _math_rows(10)
    for i, r in enumerate(rows):
        r["split"] = "eval" if i < 3 else "train"
    rows.append(dict(rows[0], split="train"))  # a duplicate of an eval prompt must not train
    (d,) = tasks.get_domains(f"math:{_write(tmp_path / 's.jsonl', rows)}")
    assert [e.prompt for e in d.eval_set] == [r["prompt"] for r in rows[:3]]
    rng = random.Random(0)
    assert {d.sample(rng).prompt for _ in range(500)} == {r["prompt"] for r in rows[3:10]}


def test_bad_jsonl_is_a_clear_error(tmp_path):
    good = json.dumps(_math_rows(1)[0])
    p = _write(tmp_path / "bad.jsonl", [good, good, '{"prompt": "x", "answer": '])
    with pytest.raises(ValueError, match=rf"{p}:3: malformed JSON"):
        tasks.load_jsonl(str(p), "math")
    p = _write(tmp_path / "nofield.jsonl", [good, {"prompt": "x"}])
    with pytest.raises(ValueError, match=rf"{p}:2: missing field 'answer'"):
        tasks.load_jsonl(str(p), "math")
    p = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=rf"{p}:1: expected a JSON object"):
        tasks.load_jsonl(str(p), "math")
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(good.encode() + b"\n" + '{"prompt": "caf\u00e9", "answer": "1"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=rf"{p}:2: not valid UTF-8"):
        tasks.load_jsonl(str(p), "math")
    p = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="empty dataset"):
        tasks.load_jsonl(str(p), "math")
    p = _write(tmp_path / "split.jsonl", [dict(_math_rows(1)[0], split="test")])
    with pytest.raises(ValueError, match=rf"{p}:1: field 'split'"):
        tasks.load_jsonl(str(p), "math")
    p = _write(tmp_path / "if.jsonl", [{"prompt": "x", "constraints": [{"type": "haiku"}]}])
    with pytest.raises(ValueError, match=r"if.jsonl:1: constraints\[0\]: unknown constraint type 'haiku'; "
                                         r"known: min_words, max_words, keywords"):
        tasks.load_jsonl(str(p), "if")
    p = _write(tmp_path / "if2.jsonl", [{"prompt": "x", "constraints": [{"type": "min_words"}]}])
    with pytest.raises(ValueError, match=r"if2.jsonl:1: constraints\[0\] \(min_words\): parameter 'n'"):
        tasks.load_jsonl(str(p), "if")
    p = _write(tmp_path / "code.jsonl", [{"prompt": "x", "tests": "assert f() == 1", "entry_point": "1f"}])
    with pytest.raises(ValueError, match=r"code.jsonl:1: field 'entry_point'"):
        tasks.load_jsonl(str(p), "code")


# -----------------------------------------------------------------------------
# Math

def test_math_reward():
    ex = Example("What is 6*7?", "42", "math")
    right = ["The answer is \\boxed{42}.", "$\\boxed{42}$", "so it is 42", "\\boxed{42.0}",
             "first \\boxed{41}, on second thought \\boxed{42}", tasks.math_demo(ex)]
    wrong = ["\\boxed{41}", "", "no idea", "\\boxed{42} no wait \\boxed{43}", "x" * 100_000,
             "\\boxed{" * 500, "\\boxed{42", "}}}}{{{{\\frac\\frac\\sqrt"]
    for r in right:
        assert tasks.math_reward(r, ex) == 1.0, r
    for r in wrong:
        assert tasks.math_reward(r, ex) == 0.0, r[:50]
    half = Example("q", "\\frac{1}{2}", "math")
    assert tasks.math_reward("\\boxed{0.5}", half) == tasks.math_reward("\\boxed{\\frac12}", half) == 1.0
    assert tasks.math_reward("\\boxed{2}", half) == 0.0
    poly = Example("q", "x^2+1", "math")
    assert tasks.math_reward("\\boxed{1 + x^2}", poly) == 1.0 and tasks.math_reward("\\boxed{x^2}", poly) == 0.0


def test_math_reward_in_worker_thread():
    # math-verify's SIGALRM timeouts would raise outside the main thread; we must not.
    ex, out = Example("q", "\\sqrt{2}", "math"), []
    t = threading.Thread(target=lambda: out.append(tasks.math_reward("\\boxed{\\sqrt{2}}", ex)))
    t.start()
    t.join(30)
    assert out == [1.0]


# -----------------------------------------------------------------------------
# Instruction following

IF_CASES = [  # (constraint, satisfying response, violating response)
    ({"type": "min_words", "n": 5}, "one two three four five", "one two three four"),
    ({"type": "max_words", "n": 3}, "one two three", "one two three four"),
    ({"type": "keywords", "words": ["apple", "Pear"]}, "An apple and a pear.", "An apple and a pineapple."),
    ({"type": "forbidden_words", "words": ["very"]}, "It is everything.", "It is Very good."),
    ({"type": "keyword_count", "word": "yes", "n": 2}, "yes, yes!", "yes, yesterday"),
    ({"type": "json"}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ({"type": "bullets", "n": 2}, "Intro\n* one\n* two", "* one\n* two\n- three"),
    ({"type": "lowercase"}, "all quiet here.", "All quiet here."),
    ({"type": "uppercase"}, "ALL QUIET.", "ALL QUIEt."),
    ({"type": "starts_with", "phrase": "Dear Sir"}, "dear sir, hello", "Hello, dear sir"),
    ({"type": "ends_with", "phrase": "Any questions?"}, "Done. Any questions?", "Any questions? Done."),
    ({"type": "paragraphs", "n": 2}, "First.\n\nSecond.", "First.\nStill first."),
    ({"type": "no_commas"}, "No commas here.", "One, two."),
    ({"type": "title"}, "<<My Poem>>\nroses", "My Poem\nroses"),
    ({"type": "quoted"}, '"all of it"', '"half" of it'),
    ({"type": "placeholders", "n": 2}, "Send to [name] at [address].", "Send to [name]."),
    ({"type": "highlights", "n": 2}, "This is *key* and *also key*.", "This is **bold** only *once*."),
    ({"type": "postscript", "marker": "P.S."}, "Hi.\n\nP.S. bye", "Hi. bye"),
]


@pytest.mark.parametrize("constraint,good,bad", IF_CASES, ids=[c[0]["type"] for c in IF_CASES])
def test_if_constraint(constraint, good, bad):
    assert tasks.check_constraints(good, [constraint]) == [True]
    assert tasks.check_constraints(bad, [constraint]) == [False]


def test_if_covers_every_constraint_type():
    assert {c[0]["type"] for c in IF_CASES} == set(tasks.IF_CONSTRAINTS) and len(tasks.IF_CONSTRAINTS) >= 8


def test_if_reward_is_fraction_met(tmp_path):
    row = {"prompt": "Write about fruit.", "solution": "apples are great.",
           "constraints": [{"type": "lowercase"}, {"type": "keywords", "words": ["apples"]},
                           {"type": "min_words", "n": 10}]}
    (ex,) = tasks.load_jsonl(str(_write(tmp_path / "if.jsonl", [row])), "if")
    assert tasks.if_reward("apples are great.", ex) == pytest.approx(2 / 3)
    assert tasks.if_reward("apples apples apples apples apples apples apples apples apples apples", ex) == 1.0
    assert tasks.if_reward("Bananas.", ex) == 0.0
    assert tasks.if_reward("", ex) == 0.0 and tasks.if_reward("  \n", ex) == 0.0
    assert tasks.if_demo(ex) == "apples are great."


# -----------------------------------------------------------------------------
# Code

def test_extract_code():
    assert tasks.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nthanks") == "def f():\n    return 1\n"
    two = "```python\nx = 1\n```\nbetter:\n```py\nx = 2\n```"
    assert tasks.extract_code(two) == "x = 2\n"
    assert tasks.extract_code("def f(): return 1") == "def f(): return 1"
    mixed = "```js\nlet x = 1;\n```\nprose\n```python\ny = 3\n```\n```text\nout\n```"
    assert tasks.extract_code(mixed) == "y = 3\n"
    assert tasks.extract_code("```\nz = 1\n```") == "z = 1\n"
    assert tasks.extract_code("text\n```python\ndef g():\n    return 2") == "def g():\n    return 2"  # cut off


def test_code_reward(tmp_path):
    rows = [{"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0",
             "solution": "def add(a, b):\n    return a + b"},
            {"prompt": "Write inc(x).", "entry_point": "inc", "solution": "def inc(x):\n    return x + 1",
             "tests": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0"}]
    add, inc = tasks.load_jsonl(str(_write(tmp_path / "c.jsonl", rows)), "code")
    assert tasks.code_reward(tasks.code_demo(add), add) == 1.0
    assert tasks.code_reward("Sure!\n```python\ndef add(a, b):\n    return a + b\n```", add) == 1.0
    assert tasks.code_reward("```python\ndef add(a, b):\n    return a - b\n```", add) == 0.0
    assert tasks.code_reward("def add(a, b) return", add) == 0.0  # syntax error
    assert tasks.code_reward("", add) == 0.0
    for hack in ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()", "raise SystemExit",
                 "def add(a, b):\n    import sys; sys.exit(0)"]:
        assert tasks.code_reward(hack, add) == 0.0, hack  # leaving before the tests end is a fail
    assert tasks.code_reward(tasks.code_demo(inc), inc) == 1.0
    assert tasks.code_reward("def inc(x):\n    return x", inc) == 0.0  # check(inc) is really called
    (bare,) = tasks.load_jsonl(str(_write(tmp_path / "bare.jsonl", [{"prompt": "p", "tests": "assert True"}])), "code")
    with pytest.raises(ValueError, match="no 'solution'"):
        tasks.code_demo(bare)


# Programs that try to get the code reward without a right add() (and a HumanEval-style
# inc()). The verdict must come from the tests alone: each of these scores 0.
_FIND_TOKENS = ("def tokens(text):\n    import re\n    return set(re.findall(r'[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f-]{27}', text))\n"
                "found = set()\n")
_FORGE_ATTACKS = {
    # the old hole: the nonce was in the program's own file; print it and leave
    "own_file_nonce": _FIND_TOKENS + (
        "import os, sys\nfor p in [sys.argv[0], 'main.py', __file__ if '__file__' in dir() else 'main.py'] + os.listdir('.'):\n"
        "    try:\n        found |= tokens(open(p).read())\n    except Exception:\n        pass\n"
        "for t in found:\n    print(t)\nimport sys; sys.stdout.flush()\nos._exit(0)\n"),
    "proc_self": _FIND_TOKENS + (
        "import os\nfor p in ['cmdline', 'environ', 'status', 'maps', 'mountinfo']:\n    for pid in ['self', '1', str(os.getppid())]:\n"
        "        try:\n            found |= tokens(open(f'/proc/{pid}/{p}', errors='replace').read())\n"
        "        except Exception:\n            pass\nfor t in found:\n    print(t)\nprint(found and 'P')\n"
        "import sys; sys.stdout.flush()\nos._exit(0)\n"),
    "write_every_fd": (
        "import os, sys\nsys.stdout.flush()\nfds = [int(f) for f in os.listdir('/proc/self/fd')] + list(range(256))\n"
        "for fd in fds:\n    for guess in [b'P', b'PASS\\n', b'1.0\\n', b'ok\\n', b'\\x01\\x00\\x00\\x00P']:\n"
        "        try:\n            os.set_blocking(fd, False)\n            os.write(fd, guess)\n"
        "            print('wrote to', fd, file=sys.stderr)\n        except OSError:\n            pass\nos._exit(0)\n"),
    "read_every_fd": _FIND_TOKENS + (
        "import os\nfor fd in range(256):\n    try:\n        os.set_blocking(fd, False)\n"
        "        found |= tokens(os.read(fd, 1 << 16).decode(errors='replace'))\n    except Exception:\n        pass\n"
        "for t in found:\n    print(t)\nimport sys; sys.stdout.flush()\nos._exit(0)\n"),
    "harness_source": (  # the harness's own code says how the verdict is given: try to give it
        "import os, re, sys\nrepo = {repo!r}\nsrc = ''\nfor f in ['sandbox.py', 'tasks.py']:\n    try:\n"
        "        src += open(os.path.join(repo, f)).read()\n    except OSError:\n        pass\n"
        "print('read', len(src))  # hidden from the program; it is public all the same\n"
        "for m in set(re.findall(r\"os\\.write\\(\\w+, (b'[^']*')\\)\", src)) | {\"b'P'\"}:\n"
        "    for fd in range(3, 256):\n        try:\n            os.write(fd, eval(m))\n        except OSError:\n            pass\n"
        "print('P')\nsys.stdout.flush()\nos._exit(0)\n"),
    "guessed_verdicts": ("print('P')\nprint('PASS')\nprint('OK')\nprint('1.0')\nprint('{\"passed\": true}')\n"
                         "import sys\nsys.stderr.write('passed\\n')\n"),
    "exit_before_tests": "import os\nos._exit(0)\n",
    "system_exit_0": "raise SystemExit(0)\n",
    "exit_in_function": "def add(a, b):\n    import sys\n    sys.exit(0)\n",
    "os_exit_in_function": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "patched_builtins_and_hooks": (
        "import builtins, sys, atexit, os\nbuiltins.AssertionError = type('AssertionError', (Exception,), {})\n"
        "builtins.len = lambda x: 3\nbuiltins.isinstance = lambda *a: True\nsys.excepthook = lambda *a: None\n"
        "atexit.register(os._exit, 0)\ndef add(a, b):\n    return None\n"),
    "trace_skips_asserts": (  # in-process tests can be jumped over by a trace function
        "import sys, linecache\ndef t(frame, event, arg):\n    if event == 'line':\n"
        "        if linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip().startswith('assert'):\n"
        "            try:\n                frame.f_lineno = frame.f_lineno + 1\n            except ValueError:\n                pass\n"
        "    return t\nsys.settrace(t)\nsys._getframe().f_trace = t\ndef add(a, b):\n    return 0\n"),
    "always_equal": ("class Anything:\n    def __eq__(self, other):\n        return True\n    __ne__ = lambda s, o: False\n"
                     "    __hash__ = object.__hash__\n    def __bool__(self):\n        return True\n"
                     "def add(a, b):\n    return Anything()\ndef inc(x):\n    return Anything()\n"),
    "int_subclass_equal": ("class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
                           "def add(a, b):\n    return I(7)\n"),
    "frames_and_memory": _FIND_TOKENS + (
        "import gc, sys, os\nf = sys._getframe()\nwhile f:\n    found |= tokens(repr(f.f_locals))\n    f = f.f_back\n"
        "for o in gc.get_objects():\n    try:\n        found |= tokens(repr(o)[:10000])\n    except Exception:\n        pass\n"
        "for t in found:\n    print(t)\nsys.stdout.flush()\nos._exit(0)\n"),
    "look_for_the_tests": (  # with the tests in hand, a lookup table would do
        "import os, re, glob\ntext = ''\nfor p in ['main.py'] + glob.glob('/tmp/mopd_*/*') + glob.glob('/proc/[0-9]*/cmdline'):\n"
        "    try:\n        text += open(p, errors='replace').read(100000)\n    except Exception:\n        pass\n"
        "table = {(int(a), int(b)): int(c) for a, b, c in re.findall(r'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', text)}\n"
        "print('found', table)\ndef add(a, b):\n    return table.get((a, b))\n"),
    "kill_everything": "import os, signal\nfor pid in [-1, 1, os.getppid()]:\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
                       "    except OSError:\n        pass\ndef add(a, b):\n    return 0\n",
}


@pytest.fixture(scope="module")
def code_examples(tmp_path_factory):
    rows = [{"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0",
             "solution": "def add(a, b):\n    return a + b"},
            {"prompt": "Write inc(x).", "entry_point": "inc", "solution": "def inc(x):\n    return x + 1",
             "tests": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0"}]
    return tasks.load_jsonl(str(_write(tmp_path_factory.mktemp("code") / "c.jsonl", rows)), "code")


@pytest.mark.parametrize("attack", sorted(_FORGE_ATTACKS))
def test_code_reward_cannot_be_forged(attack, code_examples):
    if attack == "look_for_the_tests" and not tasks.sandbox_report()["filesystem_minimal"]:
        pytest.skip("no mount namespace here: world-readable files (the data set too) are visible to the program")
    program = _FORGE_ATTACKS[attack].replace("{repo!r}", repr(str(Path(tasks.__file__).resolve().parent)))
    for ex in code_examples:
        assert tasks.code_reward(f"```python\n{program}```", ex) == 0.0, (attack, ex.meta.get("entry_point"))
    for ex in code_examples:  # and right after, a right answer still passes
        assert tasks.code_reward(tasks.code_demo(ex), ex) == 1.0


def test_code_reward_judges_with_its_own_builtins_and_modules(tmp_path):
    # MBPP-style tests use `math` without importing it: the program's import provides it. A
    # program that rebinds math, abs or len for the tests does not change what they mean.
    row = {"prompt": "Write area(r) of a circle.", "solution": "import math\ndef area(r):\n    return math.pi * r * r",
           "tests": "assert math.isclose(area(2), 12.566370614359172)\nassert abs(area(1) - 3.14159265) < 1e-6\n"
                    "assert len(str(area(0))) == 3"}
    (ex,) = tasks.load_jsonl(str(_write(tmp_path / "area.jsonl", [row])), "code")
    assert tasks.code_reward(tasks.code_demo(ex), ex) == 1.0
    cheat = ("class FakeMath:\n    pi = 3\n    @staticmethod\n    def isclose(*a, **k):\n        return True\n"
             "math = FakeMath()\ndef abs(x):\n    return 0\ndef len(x):\n    return 3\ndef area(r):\n    return 0.0\n")
    assert tasks.code_reward(cheat, ex) == 0.0
