"""
The command line of every script, one convention:
- A script's options are the fields of its one config dataclass. `--preset=NAME` (from the
  script's PRESETS) is applied first, then every `--key=value` or `--key value` in order; a
  bool field is also a bare `--flag` (= true); a list field (list[str]) takes every value up to
  the next `--option`, and a repeated option adds to it (`--model=A=DIR --model=B=DIR`,
  `--aggregate X.json Y.json`).
- Every script also takes `--threads=N` (torch.set_num_threads; 0 = torch's default, which
  follows OMP_NUM_THREADS) and `--help`.
- `--help` is written from the code itself: the script's docstring (first paragraph), then
  every field with its type, default, limits and the comment beside it in the dataclass,
  grouped under the dataclass's own comment headers (read from the source by tokenize, the
  bases' too: options two scripts share are declared once, in a base dataclass), then the
  presets.
- Limits: each script's LIMITS, {rule: "field field ..."}, are checked as soon as the
  command line is read, before anything is loaded (check lists the rules).
- Bad input is one line: cli(main) turns a ValueError, KeyError, FileNotFoundError or a
  SystemExit with a message into "error: ..." on stderr and exit status 2, never a traceback;
  Ctrl-C (KeyboardInterrupt) into one line too ("error: interrupted ...": the training
  scripts say after which step and where the last checkpoint is), exit status 130.
"""

import dataclasses
import difflib
import errno
import inspect
import io
import json
import operator
import os
import re
import sys
import textwrap
import tokenize
import typing

BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
# what every script takes besides its dataclass's fields: (option, type, default, meaning)
COMMON = [("preset", "NAME", None, "a preset below, applied before every other option"),
          ("threads", "INT", 0, "torch.set_num_threads(N); 0 = torch's default (it follows OMP_NUM_THREADS)"),
          ("help", "", None, "this text")]

# -----------------------------------------------------------------------------
# the command line -> the config

def parse_config(cls, argv=None, presets=None, limits=None):
    """cls() with --preset=NAME applied, then each --key=value / --key value; checked against
    `limits` (check). --help prints help_text and exits 0; --threads=N sets torch's threads."""
    argv = sys.argv[1:] if argv is None else list(argv)
    presets = presets or {}
    if "--help" in argv or "-h" in argv:
        print(help_text(cls, presets, limits))
        raise SystemExit(0)
    types = typing.get_type_hints(cls)
    cfg, threads, given = cls(), 0, set()
    pairs = _split(argv, types, cls)
    for key, vals in pairs:
        if key == "preset":
            if vals[-1] not in presets:
                raise ValueError(f"--preset={vals[-1]}: unknown preset; presets: {', '.join(presets) or 'none'}")
            for k, v in presets[vals[-1]].items():
                setattr(cfg, k, v)
    for key, vals in pairs:
        if key == "preset":
            continue
        if key == "threads":
            threads = _convert(key, vals[-1], int)
        elif _is_list(types[key]):  # the first time on the command line replaces the default, then adds
            old = getattr(cfg, key) if key in given else []
            setattr(cfg, key, old + [_convert(key, v, typing.get_args(types[key])[0]) for v in vals])
        else:
            setattr(cfg, key, _convert(key, vals[-1], types[key]))
        given.add(key)
    if threads < 0:
        raise ValueError(f"--threads={threads}: must be >= 0")
    check(cfg, limits or {})
    if threads:
        import torch
        torch.set_num_threads(threads)
    return cfg


def _split(argv, types, cls):
    """['--a=1', '--b', '2', '--flag', '--l', 'x', 'y']
    -> [('a', ['1']), ('b', ['2']), ('flag', ['true']), ('l', ['x', 'y'])] (keys checked, values not yet)."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"{arg!r}: expected --key=value or --key value; {_script(cls)} --help lists the keys")
        key, eq, val = arg[2:].partition("=")
        if key not in types and key not in ("preset", "threads"):
            close = difflib.get_close_matches(key, list(types), n=1)
            raise ValueError(f"--{key}: unknown config key" + (f" (did you mean --{close[0]}?)" if close else "")
                             + f"; {_script(cls)} --help lists the keys")
        i += 1
        if eq:
            pairs.append((key, [val]))
            continue
        vals = []
        while i < len(argv) and not argv[i].startswith("--"):
            vals.append(argv[i])
            i += 1
            if not _is_list(types.get(key)):
                break
        if not vals and types.get(key) is not bool:
            raise ValueError(f"--{key}: expected a value (--{key}=VALUE or --{key} VALUE)")
        pairs.append((key, vals or ["true"]))
    return pairs


def _is_list(typ):
    return typing.get_origin(typ) is list


def _convert(key, val, typ):
    if typ is bool:
        if val.lower() not in BOOLS:
            raise ValueError(f"--{key}={val}: expected a value of type bool (true or false)")
        return BOOLS[val.lower()]
    try:
        return typ(val)
    except ValueError:
        raise ValueError(f"--{key}={val}: expected a value of type {typ.__name__}") from None


def print_config(cfg):
    """The config as one JSON line, at the start of every run (rank 0 only under torchrun)."""
    import distributed
    if distributed.world()[0] == 0:
        print("config:", json.dumps(dataclasses.asdict(cfg), indent=None))

# -----------------------------------------------------------------------------
# limits: checked before anything loads

def merge_limits(*parts):
    """Several {rule: "field ..."} dicts as one: the limits of the options a script shares with
    others (e.g. train_utils.ON_POLICY_LIMITS), then its own."""
    out = {}
    for part in parts:
        for rule, names in part.items():
            out[rule] = f"{out[rule]} {names}" if rule in out else names
    return out


def check(cfg, limits):
    """
    Raise ValueError naming the first field that breaks its rule, e.g. `--micro_batch=0: must
    be >= 1`. limits: {rule: "field field ..."}; a list field's rule holds for each value.
      required          not empty
      >= N, > N, <= N, < N, in [a, b] (or (a, b], [a, b), (a, b))    numbers
      one of A B C      one of these words
      numbers           comma-separated numbers, or empty
      exists            a path that exists, or empty
      LABEL=PATH        LABEL=PATH with PATH existing
      device            auto, cpu, mps, cuda or cuda:N (cuda only where torch sees that GPU)
    """
    for rule, names in limits.items():
        for name in names.split():
            value = getattr(cfg, name)
            for v in value if isinstance(value, list) and rule != "required" else [value]:
                problem = _broken(rule, v)
                if problem:
                    raise ValueError(f"--{name}" + ("" if rule == "required" else f"={v}") + f": {problem}")


def _broken(rule, v):
    """What is wrong with value v under `rule`, or None."""
    if rule == "required":
        return "required" if v in ("", None, []) else None
    if m := re.fullmatch(r"(>=|>|<=|<) (\S+)", rule):
        compare = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}[m[1]]
        return None if compare(v, float(m[2])) else f"must be {rule}"
    if m := re.fullmatch(r"in ([\[(])(\S+), (\S+)([\])])", rule):
        lo, hi = float(m[2]), float(m[3])
        ok = (v >= lo if m[1] == "[" else v > lo) and (v <= hi if m[4] == "]" else v < hi)
        return None if ok else f"must be {rule}"
    if rule.startswith("one of "):
        words = rule.split()[2:]
        return None if v in words else f"must be one of {', '.join(words)}"
    if rule == "numbers":
        try:
            for x in v.split(",") if v else []:
                float(x)
        except ValueError:
            return "expected comma-separated numbers (e.g. 0.5,1.0)"
        return None
    if rule == "exists":
        return None if not v or os.path.exists(v) else "no such file or directory"
    if rule == "LABEL=PATH":
        label, eq, path = v.partition("=")
        if not (label and eq and path):
            return "expected LABEL=PATH"
        return None if os.path.exists(path) else f"{path}: no such file or directory"
    if rule == "device":
        if v in ("auto", "cpu", "mps"):
            return None
        if not re.fullmatch(r"cuda(:\d+)?", v):
            return "expected auto, cpu, mps, cuda or cuda:N"
        import torch
        if not torch.cuda.is_available():
            return "no CUDA GPU here (torch.cuda.is_available() is False)"
        if ":" in v and int(v.split(":")[1]) >= torch.cuda.device_count():
            return f"no such GPU ({torch.cuda.device_count()} visible)"
        return None
    raise AssertionError(f"unknown limit rule {rule!r} (config.check lists the rules)")

# -----------------------------------------------------------------------------
# --help, from the dataclass's source

def source_notes(cls):
    """[(header, [(field, comment)])] read from the dataclass's source with tokenize, and from its
    bases' (a base first: options several scripts share are declared once, e.g.
    train_utils.OnPolicyConfig). In one class (_own_notes) a comment on a line of its own at the
    fields' indentation is a header that starts a group (the fields before the first header have
    header ""), a comment after a field is that field's meaning, a comment line indented deeper
    than the fields continues the meaning above it. A subclass's new fields join the group of
    the same header (or start one at the end); a field it redeclares (another default) keeps
    its place, and its base's comment unless it has its own."""
    groups, notes = {"": []}, {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for header, fields in _own_notes(klass):
            for f, note in fields:
                if f not in notes:
                    groups.setdefault(header, []).append(f)
                if note or f not in notes:
                    notes[f] = note
    return [(h, [(f, notes[f]) for f in fs]) for h, fs in groups.items() if fs]


def _own_notes(cls):
    """source_notes of the fields written in this one class's source."""
    src = textwrap.dedent(inspect.getsource(cls))
    toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    names = {f.name for f in dataclasses.fields(cls)}
    groups, notes = [("", [])], {}
    indent = last = None  # the fields' column; the field whose meaning a comment may continue
    for i, t in enumerate(toks):
        code_before = t.line[:t.start[1]].strip() != ""
        if (t.type == tokenize.NAME and t.string in names and not code_before and toks[i + 1].string == ":"
                and indent in (None, t.start[1])):
            indent, last = t.start[1], (t.string, t.start[0])
            notes[t.string] = ""
            groups[-1][1].append(t.string)
        elif t.type == tokenize.COMMENT:
            text = t.string.lstrip("#").strip()
            if code_before:
                if last and last[1] == t.start[0]:
                    notes[last[0]] = text
            elif last and indent is not None and t.start[1] > indent:
                notes[last[0]] = (notes[last[0]] + " " + text).strip()
            else:
                groups.append((text, []))
                last = None
    return [(h, [(f, notes[f]) for f in fs]) for h, fs in groups if fs]


def help_text(cls, presets=None, limits=None, width=100):
    """The script's docstring (first paragraph), its options grouped as in the dataclass, the
    options every script takes, and the presets."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    types, defaults = typing.get_type_hints(cls), cls()
    rules = {}
    for rule, names in (limits or {}).items():
        for n in names.split():
            rules.setdefault(n, []).append(rule)
    lines = [textwrap.dedent(doc), "",
             f"usage: {_script(cls)}{' [--preset=NAME]' if presets else ''} [--key=value | --key value]...",
             "       (a bool also as a bare --flag; a list takes every value up to the next --option,",
             "       and a repeated list option adds to it)"]
    groups = [(h, [(f"--{f} {_type_name(types[f])} = {_show(getattr(defaults, f))}",
                    " ".join([note] + [f"[{_rule_text(r)}]" for r in rules.get(f, [])]).strip()) for f, note in fs])
              for h, fs in source_notes(cls)]
    groups.append(("every script", [(f"--{k} {t}" + ("" if d is None else f" = {_show(d)}"), note)
                                    for k, t, d, note in COMMON if presets or k != "preset"]))
    col = min(44, max(len(left) for _, items in groups for left, _ in items) + 2)
    pad = " " * (2 + col)
    for header, items in groups:
        lines += ["", header] if header else [""]
        for left, note in items:
            head = "  " + left.ljust(col)
            if len(left) >= col:  # too long for its column: the meaning goes on the next line
                lines.append("  " + left)
                head = pad
            lines.append(textwrap.fill(note, width, initial_indent=head, subsequent_indent=pad) if note
                         else head.rstrip())
    lines += ["", "presets (--preset=NAME):" if presets else "presets: none"]
    for name, over in (presets or {}).items():
        text = " ".join(f"--{k}={_show(v, cmd=True)}" for k, v in over.items()) or "(the defaults)"
        lines.append(textwrap.fill(text, width, initial_indent=f"  {name}: ", subsequent_indent=" " * 6))
    return "\n".join(lines)


def _rule_text(rule):
    return {"numbers": "comma-separated numbers", "exists": "must exist", "LABEL=PATH": "each LABEL=PATH",
            "device": "auto, cpu, mps, cuda or cuda:N"}.get(rule, rule)


def _type_name(typ):
    return typing.get_args(typ)[0].__name__.upper() + "..." if _is_list(typ) else typ.__name__.upper()


def _show(v, cmd=False):
    """A default as it is written on the command line (bools true/false; strings quoted unless cmd)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return v if cmd and v else json.dumps(v)
    if isinstance(v, list):
        return " ".join(v) if v else "(none)"
    return repr(v)


def _script(cls):
    """'python SCRIPT.py', the path from the project's root (bench/bench_rl.py)."""
    path = getattr(sys.modules[cls.__module__], "__file__", "") or "SCRIPT.py"
    here = os.path.dirname(os.path.abspath(__file__))
    inside = os.path.abspath(path).startswith(here + os.sep)
    return "python " + (os.path.relpath(os.path.abspath(path), here) if inside else os.path.basename(path))

# -----------------------------------------------------------------------------
# the one error convention

def cli(main):
    """Run a script's main() (under torchrun too: it joins the process group first and leaves
    it last). Bad input (a ValueError, KeyError, FileNotFoundError, or a SystemExit carrying a
    message) becomes one line "error: ..." on stderr and exit status 2, not a traceback;
    SystemExit with a number (--help's 0, a plan that does not fit's 1) passes through.
    Ctrl-C is one line too, exit status 130 (128 + SIGINT, what a shell reports for it)."""
    import distributed
    try:
        distributed.init_distributed()
        main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        fail(e.code)
    except (ValueError, KeyError, FileNotFoundError) as e:
        fail(e.args[0] if isinstance(e, KeyError) and e.args else e)
    except KeyboardInterrupt as e:
        msg = " ".join(str(e.args[0] if e.args else "interrupted").split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout's reader stopped reading (`--help | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:  # the disk is full, or not ours to write: the environment, not a bug
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        fail(f"{e.filename}: {e.strerror}" if e.filename else e)
    finally:
        distributed.teardown(end_process=True)  # a torchrun rank ends here (distributed.teardown)


def fail(msg):
    """Print `error: msg` as one line on stderr and exit 2."""
    msg = " ".join(line.strip() for line in str(msg).strip().splitlines())
    print(msg if msg.startswith("error: ") else f"error: {msg}", file=sys.stderr)
    sys.exit(2)
