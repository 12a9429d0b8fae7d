"""Tests for sandbox.py: isolation of one run against hostile snippets, the bound on a run's
total memory, and the judge (run_tests): what tests can use and what the program cannot
forge. Every test is bounded in time."""

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
import sandbox  # noqa: E402


# -----------------------------------------------------------------------------
# Sandbox

@pytest.fixture(scope="module")
def report():
    return sandbox.sandbox_report()


def _timed(code, **kw):
    t = time.time()
    ok, out = sandbox.run_sandboxed(code, **kw)
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
    assert uid >= sandbox.SANDBOX_UID_BASE and _live_processes(uid=uid) == []  # all of it is gone


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
    repo = Path(sandbox.__file__).resolve().parent
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


def test_sandbox_sees_only_system_files(report):
    if not report["filesystem_minimal"]:
        pytest.skip("no mount namespace here: the code sees the host's files")
    repo = str(Path(sandbox.__file__).resolve().parent)
    ok, out, _ = _timed(f"import os\nprint(sorted(os.listdir('/')))\nprint(os.listdir('/tmp') == [os.path.basename(os.getcwd())])\n"
                        f"print(os.path.exists({repo!r}), os.path.exists('/home'), os.path.exists('/var'))")
    assert ok and set(eval(out.splitlines()[0])) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc",
                                                     "sbin", "tmp", "usr"}, out
    assert out.splitlines()[1:3] == ["True", "False False False"], out


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
        results[i] = sandbox.run_sandboxed(f"print({i} * 11)")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert results == [(True, f"{i * 11}\n") for i in range(4)]


_UNPRIVILEGED_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import sandbox
tag = sys.argv[2]
report = sandbox.sandbox_report()
ok, out = sandbox.run_sandboxed("import os\nprint(dict(os.environ))\nopen('mine', 'w').write('x')\nprint('own ok')\n"
                                "print(open('/proc/%d/environ').read())" % os.getpid())
blocked, _ = sandbox.run_sandboxed("open('/tmp/mopd_evil_%s', 'w').write('x')" % tag)
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
    # a copy of sandbox.py that nobody can read (the clone itself may sit in a 0700 directory)
    repo = tempfile.mkdtemp(prefix="mopd_sandbox_", dir="/tmp")
    os.chmod(repo, 0o755)
    shutil.copy(sandbox.__file__, repo)
    os.chmod(os.path.join(repo, "sandbox.py"), 0o644)
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


# -----------------------------------------------------------------------------
# The total memory bound

# Eight processes that each take and touch 400 MB and hold it: 3.2 GB without a total bound.
_ALLOCATORS = """
import os, time
print('uid', os.getuid(), flush=True)
for i in range(8):
    if os.fork() == 0:
        try:
            held = b'x' * (400 << 20)
            print('held', i, flush=True)
        except MemoryError:
            print('refused', i, flush=True)
        time.sleep(60)
        os._exit(0)
time.sleep(60)
"""


def _peak_rss_per_uid(stop, peak):
    """Until stop is set: the largest total RSS of the processes of one sandbox uid."""
    while not stop.is_set():
        total = {}
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
                uid = int(status["Uid"].split()[0])
                if uid >= sandbox.SANDBOX_UID_BASE and "VmRSS" in status:
                    total[uid] = total.get(uid, 0) + int(status["VmRSS"].split()[0]) * 1024
            except (OSError, KeyError, ValueError):
                pass
        peak[0] = max([peak[0], *total.values()])
        time.sleep(0.02)


@pytest.mark.parametrize("bound", ["active", "rlimits"])
def test_total_memory_of_a_run_is_bounded(bound, monkeypatch, report):
    if bound == "rlimits":  # the fallback, as on a machine without a writable cgroup
        monkeypatch.setattr(sandbox, "_cgroup_parents", lambda: None)
    mem_mb, stats, peak, stop = 512, {}, [0], threading.Event()
    text = sandbox.memory_bound(mem_mb)
    assert ("cgroup" in text) if bound == "active" and sandbox._cgroup_parents() else "RLIMIT_NPROC=4 x RLIMIT_AS=128MiB" in text
    sampler = threading.Thread(target=_peak_rss_per_uid, args=(stop, peak))
    sampler.start()
    try:
        ok, out, dt = _timed(_ALLOCATORS, timeout_s=6, mem_mb=mem_mb, stats=stats)
    finally:
        stop.set()
        sampler.join()
    assert not ok and dt < 20
    print(f"{text}: peak total RSS {peak[0] / 2**20:.0f} MiB, cgroup peak {stats.get('memory_peak_bytes')}, "
          f"{out.count('held')} held, {out.count('refused')} refused")
    if stats.get("memory_peak_bytes") is not None:
        # The kernel's own count of the run's cgroup, page cache included. (Summed RSS is no
        # snapshot here: the OOM killer's victim is read before it dies, the next one after.)
        assert mem_mb << 19 < stats["memory_peak_bytes"] <= mem_mb << 20  # reached, never passed
    else:  # no cgroup: RLIMIT_AS = 128 MiB refuses every 400 MB, and only 3 children start
        assert out.count("held") == 0 and out.count("refused") <= sandbox.FALLBACK_NPROC - 1
        if report["uid_dropped"]:  # the run's processes are the ones of its uid: their sum
            # (an upper bound only: on an idle machine the refused children can be gone before
            # the sampler's first look, so "it saw something" is timing, not a property)
            assert peak[0] <= mem_mb << 20
    # and as a code reward, the same program gets nothing
    assert sandbox.run_tests(_ALLOCATORS, "assert add(1, 2) == 3", timeout_s=4, mem_mb=mem_mb)[0] is False


def test_report_says_what_bounds_memory(report):
    assert report["memory_bound"] == sandbox.memory_bound()
    assert report["memory_bound"].startswith(("cgroup v2", "cgroup v1", "RLIMIT_NPROC"))


# -----------------------------------------------------------------------------
# The judge: what tests can use through the data-only channel

_HONEST = '''
import math
from collections import Counter, namedtuple
from fractions import Fraction
Point = namedtuple("Point", "x y")
LIMIT = 10

class Stack:
    def __init__(self):
        self.items = []
    def push(self, x):
        self.items.append(x)
    def pop(self):
        return self.items.pop()
    def __len__(self):
        return len(self.items)
    def __iter__(self):
        return iter(self.items)
    def __getitem__(self, i):
        return self.items[i]
    def __str__(self):
        return "Stack(%d)" % len(self.items)

def evens(n):
    for i in range(0, n, 2):
        yield i

def sort_in_place(xs):
    xs.sort()

def counts(s):
    return Counter(s)

def safe_div(a, b, *, default=None):
    if b == 0:
        raise ZeroDivisionError("b is 0")
    return a / b

def fact(n):
    return 1 if n < 2 else n * fact(n - 1)

def kinds():
    return (None, True, 1.5, float("inf"), b"ab", {1, 2}, frozenset({3}), 2 + 3j, Fraction(1, 3), Point(1, 2), range(3))

def area(r):
    return math.pi * r * r

def size(stack):
    return len(stack.items)

def norm2(p):
    return p.x ** 2 + p.y ** 2
'''

_HONEST_TESTS = '''
s = Stack()
s.push(1); s.push(2)
assert len(s) == 2 and list(s) == [1, 2] and s[0] == 1 and str(s) == "Stack(2)" and s.items == [1, 2]
assert s.pop() == 2 and size(s) == 1
s.items = [7]
assert s.pop() == 7
assert list(evens(7)) == [0, 2, 4, 6] and 4 in evens(5)
xs = [3, 1, 2]
sort_in_place(xs)
assert xs == [1, 2, 3]
assert counts("aab") == {"a": 2, "b": 1}
assert safe_div(1, 4) == 0.25 and safe_div(1, b=2, default=0) == 0.5
try:
    safe_div(1, 0)
    assert False
except ZeroDivisionError:
    pass
assert fact(30) == 265252859812191058636308480000000 and fact(500) > 10 ** 1000
assert kinds() == (None, True, 1.5, float("inf"), b"ab", {1, 2}, frozenset({3}), 2 + 3j, Fraction(1, 3), (1, 2), range(3))
assert LIMIT == 10 and math.isclose(area(1), 3.141592653589793)
p = Point(1, 2)
assert p == (1, 2) and p.x == 1 and norm2(p) == 5 and counts("abb").most_common(1) == [("b", 2)]
'''


def test_judge_runs_honest_tests_through_the_channel():
    ok, out = sandbox.run_tests(_HONEST, _HONEST_TESTS)
    assert ok, out


@pytest.mark.parametrize("program,tests", [
    ("class P:\n    pass\ndef make():\n    return P()", "assert make() == make()"),  # objects are not data
    ("class Yes:\n    def __bool__(self):\n        return True\n    def __len__(self):\n        return 1\n"
     "def yes():\n    return Yes()", "assert yes()"),  # nor truth values (not even by way of len())
    ("def f():\n    raise SystemExit(0)", "f()"),  # the program's SystemExit is an error here
    ("def f(g):\n    return g(1)", "assert f(lambda x: x) == 1"),  # the tests' functions stay in the tests
    ("x = 1", "assert missing_name == 1"),
])
def test_judge_refuses_what_is_not_data(program, tests):
    ok, out = sandbox.run_tests(program, tests)
    assert not ok and "Error" in out


def test_judge_and_program_cannot_reach_each_other(report):
    if not report["verdict_isolated"]:
        pytest.skip("no uid change and no PID namespace: the program could trace the judge here")
    # The program sees no other process, and no file or command line holds the tests' text.
    program = ("import glob\nseen = sorted(int(p) for p in __import__('os').listdir('/proc') if p.isdigit())\n"
               "found = []\nfor p in glob.glob('/tmp/mopd_*/*') + glob.glob('/proc/[0-9]*/cmdline') + ['main.py']:\n"
               "    try:\n        found += [p] if 'secret-test-text' + '-' in open(p, errors='replace').read() else []\n"
               "    except OSError:\n        pass\n"
               "def look():\n    return [seen, found]\n")
    ok, out = sandbox.run_tests(program, f"# secret-test-text-{uuid.uuid4().hex}\nassert look() == [[1, 2], []], look()")
    assert ok, out
