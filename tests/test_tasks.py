"""Tests for tasks.py: toy domains, the toy tokenizer, real-domain loading and rewards, and
the code sandbox against hostile snippets. Every sandbox test is bounded in time."""

import json
import os
import random
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tasks  # noqa: E402
from tasks import Example  # noqa: E402


# -----------------------------------------------------------------------------
# Toy domains

def test_toy_domain_list():
    assert tasks.TOY_DOMAINS[:3] == ["rev", "sort", "inc"] and len(tasks.TOY_DOMAINS) == 9
    assert len(set(tasks.TOY_DOMAINS)) == 9


@pytest.mark.parametrize("name,digits,answer", [
    ("rev", "48310", "01384"), ("sort", "48310", "01348"), ("sum", "48310", "16"),
    ("sum", "999999", "54"), ("max", "48310", "8"), ("min", "48310", "0"), ("odd", "48310", "2"), ("odd", "2468", "0"),
    ("inc", "48390", "59401"), ("uniq", "48348", "483"), ("uniq", "123", "123"), ("rot", "48310", "83104"),
])
def test_toy_answers(name, digits, answer):
    ex = tasks._toy_example(name, digits)
    assert ex.prompt == f"{name} {digits}=" and ex.answer == answer and ex.domain == name


def test_toy_outputs_differ_across_domains():
    # The point of the design: one input, eight different correct behaviours.
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
    with pytest.raises(ValueError, match="rev, sort, inc, odd"):  # lists what exists
        tasks.get_domains("rev,nope")
    for bad in ["", "toy:0", "toy:10", "rev,rev", "math:", "chess:x.jsonl"]:
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


# -----------------------------------------------------------------------------
# Sandbox

@pytest.fixture(scope="module")
def report():
    return tasks.sandbox_report()


def _timed(code, **kw):
    t = time.time()
    ok, out = tasks.run_sandboxed(code, **kw)
    return ok, out, time.time() - t


def _live_processes(uid=None, cmdline_tag=None):
    """Pids of live (non-zombie) processes with this real uid, or with this text in argv."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if status["State"].split()[0] == "Z":
            continue
        if (uid is not None and int(status["Uid"].split()[0]) == uid) or (cmdline_tag and cmdline_tag in cmdline):
            found.append(pid)
    return found


def test_sandbox_runs_correct_code():
    ok, out, dt = _timed("import json\nprint(json.dumps({'a': sum(range(10))}))")
    assert ok and out.strip() == '{"a": 45}' and dt < 5
    ok, out, _ = _timed("raise SystemExit(3)")
    assert not ok


def test_sandbox_infinite_loop_is_killed():
    ok, out, dt = _timed("while True:\n    pass", timeout_s=1.0)
    assert not ok and "timeout" in out and dt < 4
    ok, out, dt = _timed("import time\ntime.sleep(60)", timeout_s=1.0)  # idle, so only wall-clock catches it
    assert not ok and dt < 4


def test_sandbox_fork_bomb(report):
    code = ("import os\nprint('uid', os.getuid(), flush=True)\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass")
    ok, out, dt = _timed(code, timeout_s=1.5)
    assert not ok and dt < 6
    if not report["uid_dropped"]:
        pytest.skip("not root: the bomb's processes cannot be told apart by uid here")
    uid = int(out.split()[1])
    assert uid >= tasks.SANDBOX_UID_BASE and _live_processes(uid=uid) == []  # all of it is gone


def test_sandbox_kills_processes_that_escape_the_group(report):
    if not (report["uid_dropped"] or report["pid_namespace"]):
        pytest.skip("no uid change and no PID namespace: a setsid() grandchild can survive here")
    tag = f"0.{random.randrange(10**9, 10**10)}"  # `sleep 600 0.<digits>`: findable in /proc
    code = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n"
            f"    os.execv('/bin/sleep', ['sleep', '600', '{tag}'])\ntime.sleep(0.3)\nprint('parent done')")
    ok, out, dt = _timed(code, timeout_s=3)
    assert ok and "parent done" in out and dt < 5
    assert _live_processes(cmdline_tag=tag) == []


def test_sandbox_hides_other_processes(report):
    if not report["pid_namespace"]:
        pytest.skip("no PID namespace here: other processes' command lines are visible")
    ok, out, _ = _timed(f"import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
                        f"print(os.path.exists('/proc/{os.getpid()}'))")
    assert ok and out.split("\n")[:2] == ["[1, 2]", "False"]


def test_sandbox_huge_allocation():
    ok, out, dt = _timed("x = bytearray(8 << 30)\nprint('allocated')", mem_mb=512)
    assert not ok and "MemoryError" in out and "allocated" not in out and dt < 5
    ok, out, dt = _timed("chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))", mem_mb=256)
    assert not ok and dt < 8


def test_sandbox_output_is_bounded():
    ok, out, dt = _timed("while True:\n    print('x' * 1000)", timeout_s=5, fsize_mb=1, max_output=4096)
    assert not ok and len(out) < 4096 + 100 and dt < 6


def test_sandbox_cannot_write_outside_its_dir(report):
    if not report["filesystem_readonly_outside_workdir"]:
        pytest.skip("no mount namespace here: the sandbox can write where its user can")
    tag = uuid.uuid4().hex
    repo = Path(tasks.__file__).resolve().parent
    targets = [f"/tmp/mopd_evil_{tag}", str(repo / f"evil_{tag}"), f"/dev/shm/evil_{tag}", f"/var/tmp/evil_{tag}"]
    code = (f"import os\nprint('cwd', os.getcwd())\nopen('mine.txt', 'w').write('ok')\n"
            f"print('own dir writable', open('mine.txt').read())\n"
            f"for p in {targets!r}:\n    try:\n        open(p, 'w').write('pwned')\n        print('WROTE', p)\n"
            f"    except OSError as e:\n        print('denied', p, e.errno)\n")
    mounts_before = open("/proc/self/mountinfo").read()
    ok, out, dt = _timed(code)
    written = [p for p in targets if os.path.exists(p)]
    for p in written:  # clean up before failing
        os.unlink(p)
    assert ok and "own dir writable ok" in out and "WROTE" not in out and out.count("denied") == len(targets)
    assert written == []
    workdir = next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("cwd "))
    assert not os.path.exists(workdir)  # its temp dir is gone too
    assert open("/proc/self/mountinfo").read() == mounts_before  # the read-only remounts stayed inside


def test_sandbox_cannot_read_parent_environment(monkeypatch, report):
    secret = "mopd-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("MOPD_TEST_SECRET", secret)
    code = (f"import os\nprint('env', dict(os.environ))\n"
            f"for pid in [os.getppid(), {os.getpid()}]:\n    try:\n"
            f"        print(open(f'/proc/{{pid}}/environ').read())\n"
            f"    except OSError as e:\n        print('denied', pid, e.errno)\n")
    ok, out, _ = _timed(code)
    assert out.startswith("env {") and secret not in out and "MOPD_TEST_SECRET" not in out
    if report["uid_dropped"]:
        assert ok and out.count("denied") == 2


def test_sandbox_has_no_network(report):
    if not report["network_isolated"]:
        pytest.skip("network namespaces are not permitted on this platform")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                f"    print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e.errno)\n")
        ok, out, dt = _timed(code)
        assert ok and "blocked" in out and "CONNECTED" not in out and dt < 5
    finally:
        server.close()


def test_sandbox_runs_concurrently():
    results = [None] * 4

    def work(i):
        results[i] = tasks.run_sandboxed(f"print({i} * 11)")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert results == [(True, f"{i * 11}\n") for i in range(4)]


_UNPRIVILEGED_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import tasks
tag = sys.argv[2]
report = tasks.sandbox_report()
ok, out = tasks.run_sandboxed("import os\nprint(dict(os.environ))\nopen('mine', 'w').write('x')\nprint('own ok')\n"
                              "print(open('/proc/%d/environ').read())" % os.getpid())
blocked, _ = tasks.run_sandboxed("open('/tmp/mopd_evil_%s', 'w').write('x')" % tag)
print(json.dumps({"report": report, "ok": ok, "out": out, "wrote_outside": blocked}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an unprivileged user")
def test_sandbox_as_unprivileged_caller(tmp_path):
    # Most users run as themselves, not root: no uid to drop to, so the protections come from
    # an unprivileged user namespace where the kernel allows one. Check that path as nobody.
    import shutil
    import subprocess
    python = "/usr/bin/python3"
    if not (shutil.which("setpriv") and os.path.exists(python)):
        pytest.skip("needs setpriv and /usr/bin/python3")
    import tempfile
    tag, secret = uuid.uuid4().hex, uuid.uuid4().hex
    # a copy of tasks.py that nobody can read (the clone itself may sit in a 0700 directory)
    repo = tempfile.mkdtemp(prefix="mopd_tasks_", dir="/tmp")
    os.chmod(repo, 0o755)
    shutil.copy(tasks.__file__, repo)
    os.chmod(os.path.join(repo, "tasks.py"), 0o644)
    try:
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                              _UNPRIVILEGED_SCRIPT, repo, tag], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "MOPD_TEST_SECRET": secret}, cwd="/")
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    evil = f"/tmp/mopd_evil_{tag}"
    exists = os.path.exists(evil)
    if exists:
        os.unlink(evil)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["report"]["uid_dropped"] is False and "own ok" in r["out"] and secret not in r["out"]
    if r["report"]["filesystem_readonly_outside_workdir"]:
        assert not r["wrote_outside"] and not exists
    if r["report"]["pid_namespace"]:
        assert not r["ok"]  # the caller's /proc/<pid>/environ does not exist in the sandbox
    print(r["report"])
