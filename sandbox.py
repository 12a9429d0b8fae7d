"""
Running untrusted Python code, and judging it by unit tests, without trusting it.

Two entry points:

- run_sandboxed(code): run `code` in an isolated child; (exited 0 in time, last output).
- run_tests(program, tests): the code reward's judge; True iff `tests` pass against the
  functions and classes `program` defines. The program cannot forge the verdict.

Isolation of one run (run_sandboxed; a small trusted bootstrap, _BOOTSTRAP, sets it up in
the child before the code starts):
- its own session (a process group we SIGKILL whole), a fresh temp dir as cwd, three
  environment variables (PATH, LANG, HOME), stdin from /dev/null, stdout+stderr in a file
  that RLIMIT_FSIZE caps; the code arrives through an unlinked file's descriptor, so no
  copy of it is left on the host's disk;
- new network, mount and PID namespaces (as root directly, otherwise inside a new user
  namespace where the kernel allows one): only a downed loopback; a root of its own (a
  chroot) with read-only, nosuid bind mounts of the system directories (/usr, /bin, /lib*,
  /etc, /dev) and the interpreter's prefix, a fresh /proc, and a size-limited noexec tmpfs
  at the temp dir's path as the only writable place: the repository, the data files, /tmp,
  /home are not there (where that root cannot be built: the whole tree, read-only); the
  code runs as PID 2 under a waiting PID 1, and when PID 1 ends the kernel kills
  everything left in the namespace, setsid() or not; the fresh /proc hides other processes;
- RLIMIT_CPU/AS/FSIZE/NPROC/NOFILE, CORE=0, no_new_privs, and, as root, a fresh unused
  uid/gid (SANDBOX_UID_BASE + random, no groups): no capabilities, a per-run RLIMIT_NPROC,
  other processes' /proc/<pid>/environ unreadable, and one kill(-1, SIGKILL) as that uid
  (_KILLER) ends all the run left behind, however fast it forks;
- a bound on the run's TOTAL memory, not just per process: a child cgroup of ours with the
  memory limit (cgroup v2 memory.max, else cgroup v1 memory.limit_in_bytes) and pids.max,
  joined by the bootstrap before anything else; where no cgroup controller is writable,
  RLIMIT_NPROC is lowered to FALLBACK_NPROC and RLIMIT_AS to mem_mb / FALLBACK_NPROC, so
  processes x address space <= mem_mb. memory_bound() says which one is active.
Each namespace and the cgroup is best effort (e.g. docker's default seccomp profile, no
unprivileged user namespaces, a read-only /sys/fs/cgroup); sandbox_report() says what this
machine gives. The sandbox uid must be able to execute the interpreter: the first of
sys.executable, /usr/bin/python3, /usr/local/bin/python3 that runs a probe is used.

The verdict (run_tests). Threat model: the program is adversarial Python with the full
power of its process: it can read anything its process can (its own files, argv, environ,
/proc/self/*, all of its memory, every interpreter frame, the harness's source, this file),
write to every descriptor it holds, replace builtins, install trace functions that skip
lines, return objects whose __eq__ is always True, fork, exit with any status at any time.
Nothing that runs in its process or that it can reach can be trusted, so nothing there
decides the verdict, and no secret is handed to it (a nonce in its file, argv, environment
or memory is one it can read and print). Instead:
- the program runs in one sandbox (the "program" side); the tests run in a second sandbox
  (the "judge" side) with its own uid, namespaces and cgroup, which the program can neither
  see, signal, trace nor read;
- the two talk through two pipes only: the judge asks for the program's global names,
  calls its functions and methods, gets attributes, iterates; the program answers with
  DATA: a JSON encoding of None, bool, int, float, str, bytes, complex, Fraction, Decimal,
  list, tuple, dict, set, frozenset, range, which the judge decodes into fresh builtin
  objects (an instance of a subclass, a Counter or a namedtuple, becomes the judge's own
  subclass of the builtin: ==, hash and the rest are the builtin's, only attribute look-ups
  such as .x or .most_common go to the program); anything else stays on the program side
  as an opaque handle. So every comparison, `in`, len() or truth test in the tests is
  computed by the judge on plain values: a handle raises on ==, !=, <, bool() (and never
  asks the program's __len__ for truth); exceptions come back as builtin Exception
  subclasses only (never SystemExit); arguments mutated in place (lists, dicts, sets,
  bytearrays) are copied back; the tests' own functions cannot be passed to the program;
- the judge binds the program's names into the tests' namespace, except names that shadow
  a builtin or a standard-library module (those stay the judge's own: `len`, `sorted`,
  `math`, ...), unless the name is the task's entry point;
- the verdict is a byte written by the judge, after the last test returned, into a pipe
  only the judge holds; passed = that byte arrived and the judge exited 0. The program
  never holds that pipe, cannot reach the judge, and has no secret to guess; printing,
  exiting early, writing to its descriptors or crashing can only make the judge fail.
- the program never sees the tests: they live in the judge's sandbox only, and (see the
  chroot above) the data files on the host are not in the program's view either.
What the program can still do: compute the right answers (or answers that happen to
satisfy weak tests), which is the point. Tests that use a name only the program defines
(other than builtins and stdlib modules) trust the program for it, as they must. The cost
is a second interpreter per judged program, started in parallel (~0.2 s a judgement here).

What is NOT covered:
- no seccomp filter: the code can make any system call its uid and namespaces allow, so a
  kernel bug reachable from an unprivileged process is a way out (the kernel is shared);
- no CPU or I/O share: RLIMIT_CPU bounds CPU seconds per process, the timeout bounds wall
  time, but during that time the run competes for every core and the disk with the host;
- timing and other side channels (cache, /proc/loadavg, /proc/meminfo, the host's kernel
  version, CPU model, the cgroup and mount names in /proc/self) stay visible; so do the
  system directories (world-readable files in /etc included);
- without a mount namespace the whole filesystem is visible read-write as the sandbox uid
  sees it (sandbox_report()'s filesystem_minimal): world-readable data files, tests
  included, can then be read by the program and answers looked up;
- without root and without user namespaces only rlimits, the clean environment and the
  process-group kill remain: the code can write where the caller can, read the caller's
  /proc/<pid>/environ, leave setsid() processes behind, and, as program and judge then share
  a uid and a PID namespace, trace the judge and forge the verdict (sandbox_report()'s
  verdict_isolated says whether this is the case);
- the fallback memory bound (no cgroup) counts address space, not use, so it is tighter
  for one process (mem_mb / FALLBACK_NPROC) than the cgroup's; not root, it is per uid:
  two concurrent runs of the same user may use each other's free RLIMIT_NPROC slots; page
  cache, tmpfs and kernel memory are only counted by the cgroup bound; cgroup v2 support
  needs a cgroup of ours where memory and pids can be enabled for children (it was only
  exercised through cgroup v1 here);
- tests are trusted code (they come from the data set); they run sandboxed all the same;
- semantics the data-only channel does not carry: tests that pass their own functions or
  objects to the program (a key= lambda), that check isinstance() against the program's
  classes, or that compare program objects (not their plain-data fields) fail.
"""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from functools import lru_cache

SANDBOX_UID_BASE = 1 << 30  # far above any uid a distribution or a subuid range hands out
FALLBACK_NPROC = 4          # RLIMIT_NPROC when no cgroup bounds the total memory

_BOOTSTRAP = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
try:
    for procs in cfg["cgroups"]:  # first of all: everything from here on counts against the run
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    chunks, fd = [], cfg["code_fd"]  # the code, from an unlinked file: no path to it anywhere
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    code = b"".join(chunks)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    work, uid, keep = cfg["work"], cfg["uid"], cfg["fds"]
    me, my_gid = os.getuid(), os.getgid()
    user = NEWUSER if uid is None else 0  # not root: a user namespace grants the right to the rest
    isolated = libc.unshare(user | NEWNS | NEWPID | NEWNET) == 0
    if not isolated:
        libc.unshare(user | NEWNET)  # at least the network, e.g. where mounts are not allowed
    if isolated and user:  # identity maps: same uid inside, and its rights there end at execve
        try:  # refused where user namespaces come without rights (e.g. AppArmor-restricted)
            maps = (("setgroups", "deny"), ("uid_map", "%d %d 1" % (me, me)), ("gid_map", "%d %d 1" % (my_gid, my_gid)))
            for name, text in maps:
                with open("/proc/self/" + name, "w") as f:
                    f.write(text)
        except OSError:
            pass
    # Mount only after making the whole tree private, so that nothing propagates to the host.
    # The code's view: a tmpfs root (over the temp dir) holding bind mounts of the system
    # directories and the interpreter's prefix (cfg["visible"]), /proc, and the code's own
    # tmpfs at the temp dir's path: the repository, the data, /tmp, /home are not there.
    # Where that root cannot be built, the host's tree, all of it read-only, is the view.
    # Everything but the code's tmpfs goes read-only once it is all in place.
    opts = "size=%dm,mode=700" % cfg["tmpfs_mb"] + (",uid=%d,gid=%d" % (uid, uid) if uid is not None else "")
    def mkdirs_like_host(path):  # work + path and its parents, with the host's owners and modes
        done = work
        for part in path.strip("/").split("/"):
            done += "/" + part
            if not os.path.lexists(done):
                os.mkdir(done)
                st = os.stat(done[len(work):])
                try:  # e.g. /root stays 0700 root: what the sandbox uid may enter is unchanged
                    os.chown(done, st.st_uid, st.st_gid)
                except OSError:
                    pass  # a user namespace maps no other owner
                os.chmod(done, st.st_mode & 0o7777)
    minimal = False
    if isolated and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0:
        code_point = work
        try:
            if libc.mount(b"sandbox-root", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755") != 0:
                raise OSError(ctypes.get_errno(), "no tmpfs for a root")
            minimal = True
            for d in cfg["visible"]:  # none inside another: nothing is created in a bind mount
                if os.path.islink(d):  # e.g. /bin -> usr/bin
                    mkdirs_like_host(os.path.dirname(d))
                    os.symlink(os.readlink(d), work + d)
                elif os.path.isdir(d):
                    mkdirs_like_host(d)
                    if libc.mount(d.encode(), (work + d).encode(), None, MS_BIND | MS_REC, None) != 0:
                        raise OSError(ctypes.get_errno(), "cannot bind " + d)
            mkdirs_like_host("/proc")
            mkdirs_like_host(work)
            code_point = work + work
        except OSError:
            if minimal:
                libc.umount2(work.encode(), 2)  # MNT_DETACH: the binds go with it
            minimal, code_point = False, work
        if libc.mount(b"sandbox", code_point.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts.encode()) != 0:
            if minimal:
                libc.umount2(work.encode(), 2)
            minimal = False
        else:
            for line in open("/proc/self/mountinfo"):
                fields = line.split()
                point = fields[4]  # mountinfo escapes space, tab, newline, backslash as octal
                for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                    point = point.replace(esc, ch)
                if point != code_point:
                    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
                    flags |= (MS_NODEV if "nodev" in fields[5] else 0) | (MS_NOEXEC if "noexec" in fields[5] else 0)
                    libc.mount(None, point.encode(), None, flags, None)  # best effort per mount
            if minimal:
                os.chroot(work)  # no way back out: no capability survives the execve below
            os.chdir(work)  # our cwd still pointed at the directory under the new mounts
    with open("main.py", "wb") as f:  # in the tmpfs, or (no mount namespace) in the 0700 temp dir
        f.write(code)
    if uid is not None:
        os.chown("main.py", uid, uid)
    if isolated:
        def exit_like(pid):  # wait for pid (reaping any other child meanwhile), exit as it did
            for fd in keep:  # the code's channels: EOF for the other side as soon as the code ends
                os.close(fd)
            while True:
                done, status = os.wait()
                if done == pid:
                    status = os.waitstatus_to_exitcode(status)
                    os._exit(status if status >= 0 else 128 - status)
        pid = os.fork()
        if pid:
            exit_like(pid)  # this process stays outside the new PID namespace
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
        # Now PID 1 of the new namespace: when it exits, the kernel kills all that is left in
        # it. Its own /proc keeps the command lines of the machine's other processes hidden.
        libc.mount(b"proc", b"/proc", b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        pid = os.fork()
        if pid:
            exit_like(pid)
        libc.prctl(1, signal.SIGKILL)
        # The code runs as PID 2: a PID 1 would ignore signals like SIGXCPU or its own SIGTERM.
    for name, soft, hard in cfg["limits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot give privileges back
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("could not drop privileges")
except BaseException as e:  # never run the untrusted code half-isolated
    sys.stderr.write("sandbox setup failed: %r\n" % (e,))
    os._exit(125)
os.execve(cfg["python"], [cfg["python"], "-I", "main.py"], cfg["env"])
"""

# Run as the sandbox uid: kill(-1) signals every process this uid may signal, i.e. every
# process of the uid, except itself. The guard makes sure it can never run as anyone else.
_KILLER = r"""
import os, sys
uid = int(sys.argv[1])
if uid >= %d and os.getuid() == uid and os.geteuid() == uid:
    try:
        os.kill(-1, 9)
    except ProcessLookupError:
        pass
""" % SANDBOX_UID_BASE

_uid_lock = threading.Lock()
_uids_taken: set[int] = set()


def _processes() -> list[tuple[int, str, int]]:
    """(real uid, state letter, threads) of every process on the machine."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
                found.append((int(status["Uid"].split()[0]), status["State"].split()[0], int(status["Threads"])))
            except (OSError, KeyError, ValueError):
                pass  # the process exited meanwhile
    return found


def _fresh_uid() -> int:
    # Unique per run (no process uses it now, and no concurrent run in this process took it),
    # so RLIMIT_NPROC and the final kill(-1) concern this run and nothing else.
    with _uid_lock:
        used, rng = {u for u, _, _ in _processes()} | _uids_taken, random.SystemRandom()
        while True:
            uid = SANDBOX_UID_BASE + rng.randrange(1 << 24)
            if uid not in used:
                _uids_taken.add(uid)
                return uid


# -----------------------------------------------------------------------------
# The total memory bound: one child cgroup per run

def _write(path: str, text: str):
    with open(path, "w") as f:
        f.write(text)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class _Cgroup:
    """A run's cgroup(s): v2 one directory; v1 one per hierarchy (memory, and pids if any)."""

    def __init__(self, version: int, dirs: dict[str, str]):
        self.version, self.dirs = version, dirs

    @staticmethod
    def create(parents: tuple, mem_bytes: int, nproc: int) -> "_Cgroup":
        version, bases = parents
        name = f"mopd_sandbox_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        group = _Cgroup(version, {})
        try:
            for controller, base in bases.items():
                path = os.path.join(base, name)
                os.mkdir(path)
                group.dirs[controller] = path
                if version == 2:
                    _write(f"{path}/memory.max", str(mem_bytes))
                    _write(f"{path}/pids.max", str(nproc))
                    for knob, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                        try:  # no swap to grow into; an OOM kill takes the whole run
                            _write(f"{path}/{knob}", value)
                        except OSError:
                            pass
                elif controller == "memory":
                    _write(f"{path}/memory.limit_in_bytes", str(mem_bytes))
                    try:  # memory+swap, where the kernel accounts swap
                        _write(f"{path}/memory.memsw.limit_in_bytes", str(mem_bytes))
                    except OSError:
                        pass
                else:
                    _write(f"{path}/pids.max", str(nproc))
        except BaseException:
            group.remove(time.monotonic() + 1)
            raise
        return group

    def procs_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in self.dirs.values()]

    def peak_bytes(self) -> int | None:
        d = self.dirs.get("memory")
        return _read_int(f"{d}/memory.peak" if self.version == 2 else f"{d}/memory.max_usage_in_bytes")

    def peak_pids(self) -> int | None:
        return _read_int(f"{self.dirs.get('pids', self.dirs.get('memory'))}/pids.peak")

    def _pids(self) -> list[int]:
        pids = set()
        for procs in self.procs_files():
            try:
                with open(procs) as f:
                    pids.update(int(p) for p in f.read().split())
            except (OSError, ValueError):
                pass
        return sorted(pids)

    def kill(self):
        if self.version == 2:
            try:
                _write(f"{self.dirs['memory']}/cgroup.kill", "1")
                return
            except OSError:
                pass  # before Linux 5.14: one by one
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self, deadline: float):
        # A cgroup can be removed once its processes are gone; dying ones need a moment.
        for path in list(self.dirs.values())[::-1]:
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break  # left behind: not worth failing the run for
                    self.kill()
                    time.sleep(0.01)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount point, root inside the filesystem, fs type, super options) of each mount."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields, after = left.split(), right.split()
            found.append((fields[4].replace("\\040", " "), fields[3], after[0], set(after[2].split(","))))
    return found


def _probe_cgroup(parents: tuple) -> tuple | None:
    try:
        _Cgroup.create(parents, 64 << 20, 8).remove(time.monotonic() + 1)
        return parents
    except OSError:
        return None


@lru_cache(maxsize=1)
def _cgroup_parents() -> tuple | None:
    """(2, {"memory": dir}) or (1, {"memory": dir[, "pids": dir]}): where this process may
    create child cgroups with a memory limit; None where it may not (then rlimits bound it)."""
    try:
        mine = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in (controllers.split(",") if controllers else [""]):
                    mine[c] = path
        mounts = _mounts()
    except (OSError, ValueError):
        return None

    def directory(point, root, path):
        rel = os.path.relpath(path, root) if path.startswith(root) else None
        return None if rel is None or rel.startswith("..") else os.path.normpath(os.path.join(point, rel))

    for point, root, fstype, _ in mounts:  # cgroup v2: memory and pids in one tree
        if fstype == "cgroup2" and "" in mine:
            d = directory(point, root, mine[""])
            try:
                with open(f"{d}/cgroup.controllers") as f:
                    available = f.read().split()
                if "memory" not in available or "pids" not in available:
                    continue
                with open(f"{d}/cgroup.subtree_control") as f:
                    enabled = f.read().split()
                if "memory" not in enabled or "pids" not in enabled:
                    _write(f"{d}/cgroup.subtree_control", "+memory +pids")  # EBUSY if d has processes
            except (OSError, TypeError):
                continue
            found = _probe_cgroup((2, {"memory": d}))
            if found:
                return found
    bases = {}
    for point, root, fstype, options in mounts:  # cgroup v1: one hierarchy per controller
        for controller in ("memory", "pids"):
            if fstype == "cgroup" and controller in options and controller in mine and controller not in bases:
                d = directory(point, root, mine[controller])
                if d and os.path.isdir(d) and _probe_cgroup((1, {controller: d})):
                    bases[controller] = d
    return (1, bases) if "memory" in bases else None


def memory_bound(mem_mb: int = 512, nproc: int = 32) -> str:
    """What bounds a run's total memory on this machine, in words."""
    parents = _cgroup_parents()
    if parents is None:
        n = min(nproc, FALLBACK_NPROC)
        return (f"RLIMIT_NPROC={n} x RLIMIT_AS={mem_mb // n}MiB = {n * (mem_mb // n)}MiB "
                f"(no writable cgroup memory controller)")
    version, bases = parents
    if version == 2:
        return f"cgroup v2 memory.max={mem_mb}MiB, pids.max={nproc} ({bases['memory']})"
    pids = f", pids.max={nproc}" if "pids" in bases else f", RLIMIT_NPROC={nproc}"
    return f"cgroup v1 memory.limit_in_bytes={mem_mb}MiB{pids} ({bases['memory']})"


# -----------------------------------------------------------------------------
# One sandboxed process

_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/dev")


def _visible(python: str) -> list[str]:
    """What the code sees of the host: the system directories and the interpreter's prefix
    (prefix/bin/python), outermost first, none inside another."""
    dirs = list(_SYSTEM_DIRS)
    for exe in (python, os.path.realpath(python)):
        prefix = os.path.dirname(os.path.dirname(exe))
        dirs.append(prefix if prefix.count("/") >= 1 and prefix != "/" else os.path.dirname(exe))
    out = []
    for d in sorted({os.path.normpath(d) for d in dirs if os.path.lexists(d)}, key=len):
        if d != "/" and not any(d == o or d.startswith(o + "/") for o in out):
            out.append(d)
    return out


class _Run:
    """The bootstrap started on `code`; wait() for it, then finish() kills what is left and
    cleans up. `fds` are descriptors handed to the code (they stay open across execve)."""

    def __init__(self, code, python, timeout_s, mem_mb, cpu_s, nproc, fsize_mb, fds=()):
        root = os.geteuid() == 0
        self.python, self.timeout_s, self.cgroup, self.proc = python, timeout_s, None, None
        self.uid = _fresh_uid() if root else None
        self.work = os.path.realpath(tempfile.mkdtemp(prefix="mopd_sandbox_"))
        self.out = tempfile.TemporaryFile()
        try:
            if self.uid is not None:  # the code's own dir where the mount namespace is unavailable
                os.chown(self.work, self.uid, self.uid)
            mb = 1 << 20
            parents = _cgroup_parents()
            if parents is not None:
                try:
                    self.cgroup = _Cgroup.create(parents, mem_mb * mb, nproc)
                except OSError as e:  # e.g. out of cgroups: this run gets the rlimit bound instead
                    sys.stderr.write(f"sandbox: no cgroup for this run ({e}); bounded by rlimits\n")
            if self.cgroup:
                as_mb = mem_mb  # the cgroup bounds the total; RLIMIT_AS makes one huge request a MemoryError
            else:  # processes x address space <= mem_mb
                nproc = min(nproc, FALLBACK_NPROC)
                as_mb = max(1, mem_mb // nproc)
            if self.uid is None:  # RLIMIT_NPROC counts all of our uid's tasks: allow nproc more than now
                me = os.getuid()
                nproc += sum(threads for u, _, threads in _processes() if u == me)
            cpu = max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s))
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": self.work}
            with tempfile.TemporaryFile() as source:
                source.write(code.encode("utf-8", "replace"))
                source.flush()
                cfg = {"work": self.work, "uid": self.uid, "python": python, "tmpfs_mb": max(fsize_mb, 1) * 4,
                       "env": env, "code_fd": source.fileno(), "fds": list(fds), "visible": _visible(python),
                       "cgroups": self.cgroup.procs_files() if self.cgroup else [],
                       # soft CPU limit sends SIGXCPU, the hard one a second later SIGKILL
                       "limits": [("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", cpu, cpu + 1),
                                  ("RLIMIT_AS", as_mb * mb, as_mb * mb), ("RLIMIT_FSIZE", fsize_mb * mb, fsize_mb * mb),
                                  ("RLIMIT_NPROC", nproc, nproc), ("RLIMIT_NOFILE", 256, 256)]}
                self.proc = subprocess.Popen([python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)], cwd=self.work,
                                             env=env, stdin=subprocess.DEVNULL, stdout=self.out,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             pass_fds=(source.fileno(), *fds))
        except BaseException:
            self.finish(0)
            raise

    def wait(self, timeout: float) -> bool:
        """True if the run ended within timeout seconds."""
        try:
            self.proc.wait(timeout=max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    def finish(self, max_output: int, stats: dict | None = None) -> tuple[int | None, str]:
        """Kill everything the run started; (exit status, None if it was still running; the
        last max_output characters of its output). Fills stats with the measured peaks."""
        try:
            returncode = self.proc.poll() if self.proc else None
            if self.proc:
                self._kill_everything()
            if stats is not None and self.cgroup:
                stats.update(memory_peak_bytes=self.cgroup.peak_bytes(), pids_peak=self.cgroup.peak_pids())
            size = self.out.seek(0, os.SEEK_END)
            self.out.seek(max(0, size - max_output))
            return returncode, self.out.read().decode("utf-8", "replace")
        finally:
            if self.cgroup:
                self.cgroup.remove(time.monotonic() + 10)
            self.out.close()
            shutil.rmtree(self.work, ignore_errors=True)
            if self.uid is not None:
                with _uid_lock:
                    _uids_taken.discard(self.uid)

    def _kill_everything(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session we created: main process and its children
        except (ProcessLookupError, PermissionError):
            pass
        if self.cgroup:
            self.cgroup.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # Whatever escaped the process group (setsid, daemons) still has the run's uid; the PID
        # namespace's teardown kills it too, but asynchronously. Return only once none of it is
        # alive: kill(-1) as that uid ends everything at once, and dying processes need a moment.
        uid, deadline = self.uid, time.monotonic() + 10
        while uid is not None and time.monotonic() < deadline and \
                any(u == uid and state != "Z" for u, state, _ in _processes()):
            try:
                subprocess.run([self.python, "-I", "-S", "-c", _KILLER, str(uid)], user=uid, group=uid,
                               extra_groups=[], env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30)
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.01)


def _run(code, python, timeout_s, mem_mb, cpu_s, nproc, fsize_mb, max_output, stats=None):
    run = _Run(code, python, timeout_s, mem_mb, cpu_s, nproc, fsize_mb)
    in_time = run.wait(timeout_s)
    returncode, text = run.finish(max_output, stats)
    if not in_time:
        text += f"\n[sandbox: killed after {timeout_s}s wall-clock timeout]"
    return in_time and returncode == 0, text


_python_lock = threading.Lock()
_python_cache: list[str] = []


def _sandbox_python() -> str:
    # The first interpreter that actually runs a probe inside the sandbox.
    with _python_lock:
        if _python_cache:
            return _python_cache[0]
        candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")]
        tried = []
        for exe in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
            ok, out = _run("print(6 * 7)", exe, 20.0, 512, None, 32, 16, 4096)
            if ok and out.strip() == "42":
                _python_cache.append(exe)
                return exe
            tried.append(f"{exe}: {out.strip()[-200:]!r}")
        raise RuntimeError("no python interpreter runs inside the sandbox; tried:\n  " + "\n  ".join(tried))


def run_sandboxed(code: str, timeout_s: float = 5.0, mem_mb: int = 512, cpu_s: float | None = None,
                  nproc: int = 32, fsize_mb: int = 16, max_output: int = 8192,
                  stats: dict | None = None) -> tuple[bool, str]:
    """Run python `code` in a sandboxed child; (exited with status 0 in time, last output).

    timeout_s is wall-clock, after which everything the run started is SIGKILLed; cpu_s
    (default timeout_s) is RLIMIT_CPU per process; mem_mb bounds the memory of the whole
    run, all its processes together (see memory_bound()); nproc caps the run's
    processes+threads (not root and no cgroup: nproc more than the user has now); fsize_mb
    caps every file written, stdout included; max_output is how many trailing characters of
    stdout+stderr come back. stats, if given, gets memory_peak_bytes and pids_peak where a
    cgroup measured them. Safe to call from several threads at once.
    """
    return _run(code, _sandbox_python(), timeout_s, mem_mb, cpu_s, nproc, fsize_mb, max_output, stats)


# -----------------------------------------------------------------------------
# The judge: tests in one sandbox, the program in another, plain data in between

# Shared by both sides: length-prefixed JSON messages and the plain-data encoding.
_WIRE = r'''
import builtins, json, os, struct, sys
try:
    sys.set_int_max_str_digits(0)  # big ints are data too
except AttributeError:
    pass
MAX_MESSAGE = 64 << 20


def send(fd, obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    view = memoryview(struct.pack("<I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the other side of the channel is gone")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(fd):
    (n,) = struct.unpack("<I", _read_exact(fd, 4))
    if n > MAX_MESSAGE:
        raise ValueError("a message of %d bytes is over the limit" % n)
    return json.loads(_read_exact(fd, n))


def encode(x, handle, keep_types=False):
    """JSON for plain data; {"h": handle(x)} for anything else. An instance of a subclass
    (Counter, a namedtuple) is its base type's data; with keep_types, {"sub": [that data,
    handle(x)]}, so that the other side can still reach its attributes."""
    if type(x).__dict__.get("_judge_wrapped"):  # the program's object, back where it came from
        return {"h": x.__dict__["_h"]}
    plain = _plain(x, handle, keep_types)
    if keep_types and type(x) not in _EXACT and type(plain) is dict and "h" not in plain:
        return {"sub": [plain, handle(x)]}
    return plain


_EXACT = (type(None), bool, int, float, str, list, tuple, set, frozenset, dict, bytes, bytearray, complex, range)


def _plain(x, handle, keep_types):
    if x is None or x is True or x is False:
        return x
    if isinstance(x, int):
        return int.__index__(x) if type(x) is int or not keep_types else {"i": int.__index__(x)}
    if isinstance(x, float):
        return float(float.__float__(x)) if type(x) is float or not keep_types else {"f": float.__float__(x)}
    if isinstance(x, str):
        return str.__str__(x) if type(x) is str or not keep_types else {"u": str.__str__(x)}
    if isinstance(x, (list, tuple, set, frozenset)):
        tag = "l" if isinstance(x, list) else "t" if isinstance(x, tuple) else "s" if isinstance(x, set) else "fs"
        base = list if tag == "l" else tuple if tag == "t" else set if tag == "s" else frozenset
        return {tag: [encode(v, handle, keep_types) for v in base.__iter__(x)]}
    if isinstance(x, dict):
        return {"d": [[encode(k, handle, keep_types), encode(v, handle, keep_types)] for k, v in dict.items(x)]}
    if isinstance(x, (bytes, bytearray)):
        return {"b" if isinstance(x, bytes) else "ba": bytes(x).hex()}
    if isinstance(x, complex):
        return {"c": [complex.__complex__(x).real, complex.__complex__(x).imag]}
    if isinstance(x, range):
        return {"r": [x.start, x.stop, x.step]}
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    if fractions and isinstance(x, fractions.Fraction):
        return {"q": [int(x.numerator), int(x.denominator)]}
    if decimal and isinstance(x, decimal.Decimal):
        return {"D": str(decimal.Decimal.__str__(x))}
    return {"h": handle(x)}


def decode(v, handle, wrap=None):
    """Fresh builtin objects from JSON; handle(n) for {"h": n}; wrap(data, n) for a subclass
    instance {"sub": [data, n]} (without wrap: the data). Anything unexpected raises."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is not dict or len(v) != 1:
        raise ValueError("not an encoded value: %.100r" % (v,))
    (tag, x), = v.items()
    if tag in ("l", "t", "s", "fs"):
        items = [decode(i, handle, wrap) for i in x]
        return {"l": list, "t": tuple, "s": set, "fs": frozenset}[tag](items)
    if tag == "d":
        return {decode(k, handle, wrap): decode(i, handle, wrap) for k, i in x}
    if tag in ("i", "f", "u"):
        return {"i": int, "f": float, "u": str}[tag](x)
    if tag == "sub":
        data = decode(x[0], handle, wrap)
        return wrap(data, int(x[1])) if wrap else data
    if tag in ("b", "ba"):
        return (bytes if tag == "b" else bytearray).fromhex(x)
    if tag == "c":
        return complex(float(x[0]), float(x[1]))
    if tag == "r":
        return range(int(x[0]), int(x[1]), int(x[2]))
    if tag == "q":
        import fractions
        return fractions.Fraction(int(x[0]), int(x[1]))
    if tag == "D":
        import decimal
        return decimal.Decimal(str(x))
    if tag == "h":
        return handle(int(x))
    raise ValueError("unknown tag %r" % (tag,))
'''

# The program's side: run the program, then answer the judge's requests until it hangs up.
# Preceded by a header that sets REQUESTS, REPLIES (descriptors) and PROGRAM (its source).
_PROGRAM_SIDE = _WIRE + r'''
import linecache, traceback, types
objects, handles = {}, {}  # handle -> object (kept alive), id(object) -> handle


def handle(x):
    h = handles.get(id(x))
    if h is None:
        h = handles[id(x)] = len(objects) + 1
        objects[h] = x
    return h


def dec(v):
    return decode(v, objects.__getitem__)


def enc(x):
    return encode(x, handle, keep_types=True)


ns = {"__name__": "__main__", "__builtins__": builtins}
linecache.cache["program.py"] = (len(PROGRAM), None, PROGRAM.splitlines(True), "program.py")
try:
    exec(compile(PROGRAM, "program.py", "exec"), ns)
except BaseException:  # SystemExit too: a program that stops before its end has failed
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
UNARY = {"len": len, "iter": iter, "next": next, "str": str, "repr": repr}
while True:
    try:
        req = recv(REQUESTS)
    except EOFError:
        os._exit(0)
    try:
        op, reply = req["op"], {}
        if op == "names":
            names = []
            for k, v in list(ns.items()):
                if not k.startswith("__"):
                    try:
                        names.append([k, {"mod": v.__name__} if isinstance(v, types.ModuleType) else enc(v)])
                    except Exception:
                        pass
            reply["r"] = names
        elif op == "call":
            target = objects[req["o"]]
            args = [dec(a) for a in req["a"]]
            kwargs = {k: dec(a) for k, a in req["k"].items()}
            reply["r"] = enc(target(*args, **kwargs))
            mutated = []  # in-place changes to list/dict/set/bytearray arguments go back
            for i, (sent, now) in enumerate(zip(req["a"], args)):
                if isinstance(now, (list, dict, set, bytearray)):
                    after = enc(now)
                    if after != sent:
                        mutated.append([i, after])
            if mutated:
                reply["m"] = mutated
        elif op == "get":
            reply["r"] = enc(getattr(objects[req["o"]], req["n"]))
        elif op == "set":
            setattr(objects[req["o"]], req["n"], dec(req["v"]))
            reply["r"] = None
        elif op == "getitem":
            reply["r"] = enc(objects[req["o"]][dec(req["k"])])
        else:
            reply["r"] = enc(UNARY[op](objects[req["o"]]))
    except BaseException as e:  # the program's error, SystemExit included, is the judge's exception
        try:
            reply = {"x": [type(e).__name__, str(e)[:2000]]}
        except BaseException:
            reply = {"x": ["Exception", "an exception whose message cannot be read"]}
    send(REPLIES, reply)
'''

# The judge's side: bind the program's names, run the tests, and only then write the verdict.
# Preceded by a header that sets REQUESTS, REPLIES, VERDICT (descriptors), ENTRY and TESTS.
_JUDGE_SIDE = _WIRE + r'''
import importlib, linecache, traceback
STDLIB = set(getattr(sys, "stdlib_module_names", ()))
remotes = {}


class ProgramError(Exception):
    """An exception of the program under test that is not a builtin Exception subclass."""


def rpc(msg):
    send(REQUESTS, msg)
    reply = recv(REPLIES)
    if "x" in reply:
        name, text = str(reply["x"][0]), str(reply["x"][1])
        cls = getattr(builtins, name, None)
        error = None
        if isinstance(cls, type) and issubclass(cls, Exception):  # never SystemExit & co.
            try:
                error = cls(text)
            except Exception:  # e.g. UnicodeDecodeError wants five arguments
                pass
        raise error if error is not None else ProgramError("%s: %s" % (name, text))
    return reply


def remote(h):
    if h not in remotes:
        remotes[h] = Remote(h)
    return remotes[h]


def enc(x):
    def handle(obj):
        if type(obj) is Remote:
            return object.__getattribute__(obj, "_h")
        raise TypeError("only plain data and the program's own objects can be passed to it, not %s"
                        % type(obj).__name__)
    return encode(x, handle)


def dec(v):
    return decode(v, remote, wrap)


_wrappers = {}


def _data_getattr(self, name):
    if name.startswith("__") or name == "_h":
        raise AttributeError(name)
    return getattr(remote(self.__dict__["_h"]), name)


def wrap(data, h):
    """The program's Counter or namedtuple: our own subclass of the builtin type, so that ==,
    hashing and the rest are the builtin's, with attribute look-ups sent to the program."""
    base = type(data)
    if base not in (int, float, complex, str, bytes, bytearray, tuple, list, dict, set, frozenset):
        return data
    if base not in _wrappers:
        _wrappers[base] = type(base.__name__, (base,), {"__getattr__": _data_getattr, "_judge_wrapped": True})
    obj = _wrappers[base](data)
    obj.__dict__["_h"] = h
    return obj


def _no_comparison(self, other):
    raise TypeError("an object of the program under test is not plain data and cannot be compared; "
                    "compare its plain-data fields, or return plain data")


class Remote:
    """An object that stays in the program's process. Calls, attributes, iteration, len and
    str go to the program; comparisons and truth tests do not: they would be its word."""
    __slots__ = ("_h",)

    def __init__(self, h):
        object.__setattr__(self, "_h", h)

    def __call__(self, *args, **kwargs):
        reply = rpc({"op": "call", "o": self._h, "a": [enc(a) for a in args],
                     "k": {str(k): enc(v) for k, v in kwargs.items()}})
        for i, value in reply.get("m", []):  # copy in-place changes back into our arguments
            mine, new = args[int(i)], dec(value)
            if type(mine) is type(new) and isinstance(mine, (list, bytearray)):
                mine[:] = new
            elif type(mine) is type(new) and isinstance(mine, (dict, set)):
                mine.clear()
                mine.update(new)
        return dec(reply["r"])

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return dec(rpc({"op": "get", "o": self._h, "n": name})["r"])

    def __setattr__(self, name, value):
        rpc({"op": "set", "o": self._h, "n": str(name), "v": enc(value)})

    def __getitem__(self, key):
        return dec(rpc({"op": "getitem", "o": self._h, "k": enc(key)})["r"])

    def __len__(self):
        return dec(rpc({"op": "len", "o": self._h})["r"])

    def __iter__(self):
        return dec(rpc({"op": "iter", "o": self._h})["r"])

    def __next__(self):
        return dec(rpc({"op": "next", "o": self._h})["r"])

    def __str__(self):
        return dec(rpc({"op": "str", "o": self._h})["r"])

    def __repr__(self):
        try:
            return dec(rpc({"op": "repr", "o": self._h})["r"])
        except Exception:
            return "<object #%d of the program>" % self._h

    def __bool__(self):
        raise TypeError("an object of the program under test has no truth value here; return plain data")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _no_comparison
    __hash__ = object.__hash__


ns = {"__name__": "__main__", "__builtins__": builtins}
for name, value in rpc({"op": "names"})["r"]:
    name = str(name)
    if name.startswith("__"):
        continue
    if name != ENTRY and (hasattr(builtins, name) or name in STDLIB):
        if name in STDLIB:  # the tests' `math` is the real one, whatever the program bound to it
            try:
                ns[name] = importlib.import_module(name)
            except Exception:
                pass
        continue
    try:
        if type(value) is dict and list(value) == ["mod"]:  # a module: ours, if a standard one
            module = str(value["mod"])
            if module.split(".")[0] in STDLIB:
                ns[name] = importlib.import_module(module)
        else:
            ns[name] = dec(value)
    except Exception:
        pass
linecache.cache["tests.py"] = (len(TESTS), None, TESTS.splitlines(True), "tests.py")
try:
    exec(compile(TESTS, "tests.py", "exec"), ns)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
os.write(VERDICT, b"P")
os._exit(0)
'''


def run_tests(program: str, tests: str, entry_point: str | None = None, timeout_s: float = 5.0,
              mem_mb: int = 512, max_output: int = 8192) -> tuple[bool, str]:
    """(whether `tests` pass against what `program` defines, the judge's and the program's
    output). The program runs in one sandbox, the tests in another (the judge); the judge
    calls the program's functions through a pipe and gets plain data back (see the module
    docstring: threat model and what the tests can use). The verdict is a byte the judge
    writes after its last test into a pipe the program never holds. entry_point, if given,
    is bound for the tests even if it shadows a builtin or a standard module name.
    Everything ends within timeout_s (wall clock); safe to call from several threads."""
    python = _sandbox_python()
    to_program, to_judge, verdict = os.pipe(), os.pipe(), os.pipe()
    program_fds, judge_fds = (to_program[0], to_judge[1]), (to_program[1], to_judge[0], verdict[1])
    runs, start = [], time.monotonic()
    try:
        header = "REQUESTS, REPLIES = %d, %d\nPROGRAM = %r\n" % (*program_fds, program)
        runs.append(_Run(header + _PROGRAM_SIDE, python, timeout_s, mem_mb, None, 32, 16, program_fds))
        header = "REQUESTS, REPLIES, VERDICT = %d, %d, %d\nENTRY = %r\nTESTS = %r\n" % (*judge_fds, entry_point, tests)
        runs.append(_Run(header + _JUDGE_SIDE, python, timeout_s, mem_mb, None, 32, 16, judge_fds))
        for fd in program_fds + judge_fds:  # only the children hold them now: EOF when one ends
            os.close(fd)
        program_fds = judge_fds = ()
        in_time = runs[1].wait(timeout_s - (time.monotonic() - start))
        os.set_blocking(verdict[0], False)
        try:
            said = os.read(verdict[0], 16)
        except BlockingIOError:
            said = b""
    finally:
        for fd in (*program_fds, *judge_fds, verdict[0]):
            os.close(fd)
        outputs = [run.finish(max_output // 2) for run in runs[::-1]]
    passed = bool(outputs) and in_time and outputs[0][0] == 0 and said == b"P"
    text = "\n".join(f"--- {side} ---\n{out}" for side, (_, out) in zip(("judge", "program"), outputs))
    if not in_time:
        text += f"\n[sandbox: killed after {timeout_s}s wall-clock timeout]"
    return passed, text


# -----------------------------------------------------------------------------
# What this machine gives

_PROBE = r"""
import json, os, socket
r = {"uid": os.getuid(), "pid": os.getpid(), "interfaces": sorted(n for _, n in socket.if_nameindex())}
path = "/tmp/.mopd_sandbox_probe_%d" % os.getpid()
try:
    open(path, "w").close()
    os.unlink(path)
    r["tmp_writable"] = True
except OSError:
    r["tmp_writable"] = False
r["host_files_visible"] = os.path.exists(HOST_FILE) or os.listdir("/tmp") != [os.path.basename(os.getcwd())]
print(json.dumps(r))
"""


def sandbox_report() -> dict:
    """Which protections are active on this machine (they depend on privileges and kernel)."""
    ok, out = run_sandboxed(f"HOST_FILE = {os.path.abspath(__file__)!r}\n" + _PROBE, timeout_s=20.0)
    if not ok:
        raise RuntimeError(f"sandbox probe failed: {out}")
    r = json.loads(out.strip().splitlines()[-1])
    report = {"python": _sandbox_python(), "uid": r["uid"], "uid_dropped": r["uid"] >= SANDBOX_UID_BASE,
              "network_isolated": r["interfaces"] in ([], ["lo"]),
              "filesystem_readonly_outside_workdir": not r["tmp_writable"],
              "pid_namespace": r["pid"] == 2, "filesystem_minimal": not r["host_files_visible"]}
    # program and judge cannot reach each other: different uids, or different PID namespaces
    report["verdict_isolated"] = report["uid_dropped"] or report["pid_namespace"]
    report["memory_bound"] = memory_bound()
    return report
