"""
Domains and rewards for MOPD.

A domain is a source of prompts (with a fixed, held-out eval split), a reward on the
response text, and a name: the label d(x) that routes a prompt to its teacher. Two
families live here:

1. Toy domains (TOY_DOMAINS): digit-string puzzles that a ~1M-parameter model learns on a
   CPU in minutes, each with an exact verifier. They are built to compete inside one small
   model: every domain sees the same kind of input and only the word in front says what to
   do with it ("rev 48310=" -> "01384", "sort 48310=" -> "01348", "sum 48310=" -> "16").
   A character-level tokenizer (toy_tokenizer / save_toy_tokenizer) makes toy checkpoints
   ordinary Hugging Face directories.
2. Real domains from local JSONL files: math (final answer checked with math-verify),
   instruction following (IFEval-style verifiable constraints), code (unit tests run in a
   sandboxed child process, see run_sandboxed).

Conventions every trainer relies on:
- The response text handed to a reward is the decoded completion WITHOUT the prompt and
  with special tokens stripped. A toy response is the answer followed by <eos>; a toy
  reward is 1.0 for an exact match (surrounding whitespace ignored), else 0.0.
- Domain.sample never returns an example of the eval split; Domain.eval_set is fixed and
  deterministic; Domain.demo(ex) is the correct response text for supervised learning.
- The toy tokenizer never adds <bos>/<eos> on its own: a trainer builds
  [<bos>] + encode(prompt) + encode(answer) + [<eos>] itself.

Spec syntax of get_domains (comma-separated items, or a list of items):
    rev,sort,inc            toy domains by name (TOY_DOMAINS lists them in order)
    toy:4                   the first 4 toy domains, TOY_DOMAINS[:4] (scaling study)
    math:data/gsm.jsonl     a real domain of kind math|if|code, named after its kind
    gsm=math:data/gsm.jsonl the same, named "gsm" (needed for two files of one kind)
Relative paths are resolved against data_dir when given, else the working directory.

JSONL formats (one JSON object per line; blank lines are skipped):
    math: {"prompt": str, "answer": str|number, "solution"?: str}
    if:   {"prompt": str, "constraints": [{"type": str, ...params}], "solution"?: str}
    code: {"prompt": str, "tests": str, "entry_point"?: str, "solution"?: str}
- Any kind may carry "split": "train"|"eval". If no line of a file has it, the eval split is
  the first EVAL_SIZE lines (in file order) whose prompt hashes to 0 mod 10; everything
  else is training data, minus any prompt that also appears in eval.
- math: the reward takes the last \\boxed{...} of the response (without any box, the last
  expression math-verify finds) and checks it against "answer" with math-verify.
  demo = "solution" if given, else "The answer is $\\boxed{answer}$.".
- if: reward = fraction of constraints met (check_constraints gives the per-constraint
  booleans; all() of them is IFEval's strict prompt-level accuracy); an empty response
  scores 0. Constraint types and their parameters are listed in IF_CONSTRAINTS.
  demo = "solution" (required for demos only).
- code: the reward takes the last ```python fenced block of the response (the whole
  response if there is none), appends "tests" (python asserts; when "entry_point" is given
  and the tests define check(candidate), HumanEval style, it also calls
  check(<entry_point>)), runs it in run_sandboxed, and gives 1.0 iff it exits with status 0
  after the last test (a nonce printed at the end defeats an early sys.exit(0)).
  demo = "```python\\n<solution>\\n```" (solution required for demos only).
Bad input fails loudly: a malformed line or missing field is a ValueError naming the file,
the line and the field; an empty file or an unknown domain name is a ValueError that lists
what exists.

`python tasks.py` prints the toy domains' statistics and the sandbox's protections;
`python tasks.py gym OUT.jsonl [N] [DATASET]` writes a math JSONL offline with reasoning-gym.
"""

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable


@dataclass
class Example:
    prompt: str
    answer: str
    domain: str
    meta: dict = field(default_factory=dict)  # e.g. IF constraints, code tests, source line


@dataclass
class Domain:
    name: str
    sample: Callable[[random.Random], Example]  # a fresh training example, never from eval_set
    eval_set: list[Example]                     # fixed, held out, deterministic
    reward: Callable[[str, Example], float]     # (response text, example) -> reward in [0, 1]
    demo: Callable[[Example], str]              # correct response text, for SFT


# -----------------------------------------------------------------------------
# Toy domains: one digit string, nine different jobs

TOY_MIN_DIGITS = 3   # digit strings are 3..6 long: ~1.1M distinct strings, short sequences
TOY_MAX_DIGITS = 6
EVAL_SIZE = 200      # eval examples per domain (toy, and the default cap for real files)
TOY_EVAL_SEED = 1234

# name -> (what the answer is, function from digit string to answer). The order matters:
# TOY_DOMAINS[:k] is the k-domain scaling study, and the first three are the main trio (two
# different permutations and a digit-wise map: unrelated skills on the same input, like
# Math/IF/SWE). All of the first eight are within reach of RL from the toy S0; "sum" comes
# last: digit-sum arithmetic is a skill the 0.8M-parameter toy model does not pick up, and
# RL cannot find it from there (measured: 0.07 -> 0.08 in 300 steps), so it is opt-in.
TOY_OPS = {
    "rev":  ("the digits in reverse order", lambda s: s[::-1]),
    "sort": ("the digits sorted ascending", lambda s: "".join(sorted(s))),
    "inc":  ("every digit plus one, 9 wraps to 0", lambda s: "".join(str((int(c) + 1) % 10) for c in s)),
    "odd":  ("how many digits are odd", lambda s: str(sum(int(c) % 2 for c in s))),
    "max":  ("the largest digit", lambda s: max(s)),
    "rot":  ("the digits rotated left by one", lambda s: s[1:] + s[0]),
    "uniq": ("the digits without repeats, first occurrences kept", lambda s: "".join(dict.fromkeys(s))),
    "min":  ("the smallest digit", lambda s: min(s)),
    "sum":  ("the sum of the digits, in decimal", lambda s: str(sum(map(int, s)))),
}
TOY_DOMAINS = list(TOY_OPS)


def is_toy_eval(digits: str) -> bool:
    # Held out by content, not by domain: a digit string whose CRC32 is 0 mod 10 is never
    # trained on in ANY domain, so a held-out input cannot leak in through a sibling domain.
    return zlib.crc32(digits.encode()) % 10 == 0


def _toy_example(name: str, digits: str) -> Example:
    return Example(f"{name} {digits}=", TOY_OPS[name][1](digits), name, {"digits": digits})


def _random_digits(rng: random.Random) -> str:
    return "".join(rng.choices("0123456789", k=rng.randint(TOY_MIN_DIGITS, TOY_MAX_DIGITS)))


@lru_cache(maxsize=None)
def _toy_eval_digits() -> tuple[str, ...]:
    # The same EVAL_SIZE held-out strings for every toy domain: per-domain scores are then
    # scores on identical inputs, which makes interference between domains easy to see.
    rng, seen = random.Random(TOY_EVAL_SEED), {}
    while len(seen) < EVAL_SIZE:
        s = _random_digits(rng)
        if is_toy_eval(s):
            seen[s] = None
    return tuple(seen)


def toy_reward(response: str, ex: Example) -> float:
    return float(response.strip() == ex.answer)


def toy_domain(name: str) -> Domain:
    if name not in TOY_OPS:
        raise ValueError(f"unknown toy domain {name!r}; toy domains: {', '.join(TOY_DOMAINS)}")

    def sample(rng: random.Random) -> Example:
        while True:  # rejection sampling; 90% of strings are training strings
            s = _random_digits(rng)
            if not is_toy_eval(s):
                return _toy_example(name, s)

    eval_set = [_toy_example(name, s) for s in _toy_eval_digits()]
    return Domain(name, sample, eval_set, toy_reward, lambda ex: ex.answer)


# -----------------------------------------------------------------------------
# Toy tokenizer: one token per character

TOY_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0, 1, 2, 3
# Every character a toy prompt or answer can contain, plus a little headroom for new toy
# domains. Keep it small: the embedding is a big share of a 0.2M-parameter model.
TOY_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz =+-,.:"


def _toy_tokenizers_object():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(TOY_SPECIAL_TOKENS + list(TOY_CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # each char a word
    tok.decoder = decoders.Fuse()  # join tokens back without inserting spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOY_SPECIAL_TOKENS])
    return tok  # no post-processor: encoding never adds <bos>/<eos>


def _toy_tokenizer_config() -> dict:
    # PreTrainedTokenizerFast (not a v5-only class name) so that older transformers load it
    # too; clean_up_tokenization_spaces must be off or decode would eat spaces before ",.".
    return {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>",
            "eos_token": "<eos>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
            "model_max_length": 1024}


def toy_tokenizer():
    """Character-level PreTrainedTokenizerFast: pad=0, bos=1, eos=2, unk=3, vocab < 64."""
    from transformers import PreTrainedTokenizerFast
    cfg = {k: v for k, v in _toy_tokenizer_config().items() if k != "tokenizer_class"}
    return PreTrainedTokenizerFast(tokenizer_object=_toy_tokenizers_object(), **cfg)


def save_toy_tokenizer(out_dir: str) -> str:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into out_dir, so
    that AutoTokenizer.from_pretrained(out_dir) loads the toy tokenizer offline."""
    os.makedirs(out_dir, exist_ok=True)
    _toy_tokenizers_object().save(os.path.join(out_dir, "tokenizer.json"))
    cfg = _toy_tokenizer_config()
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")}, f, indent=2)
    return out_dir


# -----------------------------------------------------------------------------
# Real domains: JSONL loading and the held-out split

REAL_KINDS = ("math", "if", "code")
_REQUIRED = {"math": ("prompt", "answer"), "if": ("prompt", "constraints"), "code": ("prompt", "tests")}


def load_jsonl(path: str, kind: str) -> list[Example]:
    """Parse and validate a JSONL file of the given kind (see the module docstring)."""
    if kind not in REAL_KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(REAL_KINDS)}")
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")  # tolerate a byte-order mark
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in _REQUIRED[kind]:
                if key not in row:
                    raise ValueError(f"{where}: missing field {key!r} "
                                     f"(a {kind} line needs {', '.join(_REQUIRED[kind])})")
            if not isinstance(row["prompt"], str) or not row["prompt"]:
                raise ValueError(f"{where}: field 'prompt' must be a non-empty string")
            split = row.get("split")
            if split not in (None, "train", "eval"):
                raise ValueError(f"{where}: field 'split' must be 'train' or 'eval', got {split!r}")
            meta = {"line": lineno, "split": split}
            solution = row.get("solution")
            if solution is not None and not isinstance(solution, str):
                raise ValueError(f"{where}: field 'solution' must be a string")
            if kind == "math":
                if not isinstance(row["answer"], (str, int, float)) or isinstance(row["answer"], bool):
                    raise ValueError(f"{where}: field 'answer' must be a string or a number")
                answer, meta["solution"] = str(row["answer"]), solution
            elif kind == "if":
                meta["constraints"] = _validate_constraints(row["constraints"], where)
                answer = solution or ""
            else:
                if not isinstance(row["tests"], str) or not row["tests"].strip():
                    raise ValueError(f"{where}: field 'tests' must be a non-empty string of python code")
                entry = row.get("entry_point")
                if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
                    raise ValueError(f"{where}: field 'entry_point' must be a python identifier")
                meta["tests"], meta["entry_point"] = row["tests"], entry
                answer = solution or ""
            examples.append(Example(row["prompt"], answer, kind, meta))
    if not examples:
        raise ValueError(f"{path}: empty dataset (no JSON lines)")
    return examples


def split_examples(examples: list[Example], path: str = "") -> tuple[list[Example], list[Example]]:
    """(train, eval): explicit 'split' fields if any line has one, else by prompt hash."""
    if any(ex.meta.get("split") for ex in examples):
        ev = [ex for ex in examples if ex.meta.get("split") == "eval"]
        if not ev:
            raise ValueError(f"{path}: no line has \"split\": \"eval\"; a domain needs an eval split")
    else:
        ev = [ex for ex in examples if zlib.crc32(ex.prompt.encode()) % 10 == 0][:EVAL_SIZE]
        if not ev:
            raise ValueError(f"{path}: no line falls in the hash-based eval split ({len(examples)} lines); "
                             f"add \"split\": \"eval\" to some lines")
    # Exclude by prompt text, not by identity: a duplicated prompt must not leak into training.
    ev_prompts = {ex.prompt for ex in ev}
    train = [ex for ex in examples if ex.prompt not in ev_prompts]
    return train, ev


def _real_domain(name: str, kind: str, path: str) -> Domain:
    train, ev = split_examples(load_jsonl(path, kind), path)
    train = [Example(ex.prompt, ex.answer, name, ex.meta) for ex in train]
    ev = [Example(ex.prompt, ex.answer, name, ex.meta) for ex in ev]

    def sample(rng: random.Random) -> Example:
        if not train:  # allowed for an eval-only benchmark file, but then it cannot be trained on
            raise ValueError(f"{path}: all {len(ev)} lines are in the eval split; there is nothing to train on")
        return rng.choice(train)

    reward, demo = {"math": (math_reward, math_demo), "if": (if_reward, if_demo),
                    "code": (code_reward, code_demo)}[kind]
    return Domain(name, sample, ev, reward, demo)


# -----------------------------------------------------------------------------
# Math: math-verify on the final answer

def _math_timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which exists only in the main thread: there a
    # pathological expression costs at most 5 s; in a worker thread there is no bound.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse_gold(answer: str):
    from math_verify import parse
    # Gold answers are usually bare ("42", "\frac{1}{2}"): try them as LaTeX math first.
    t = _math_timeout()
    return parse(f"${answer}$", parsing_timeout=t) or parse(answer, parsing_timeout=t)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces matched); None if there is none or it is cut off."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, start = 0, i + len("\\boxed")
    for k in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[start + 1:k]
    return None


def math_reward(response: str, ex: Example) -> float:
    from math_verify import parse, verify
    # The final answer is the last \boxed{} (math-verify alone would merge all boxes into a
    # set, and an earlier box is a draft). With no box at all, math-verify takes the last
    # expression of the tail; a box that is never closed (a cut-off answer) scores 0.
    try:
        if "\\boxed" in response:
            box = last_boxed(response)
            if box is None:
                return 0.0
            text = "\\boxed{" + box + "}"
        else:
            text = response[-4000:]  # a megabyte of junk would only cost time
        pred = parse(text, parsing_timeout=_math_timeout())
        return float(bool(pred) and verify(_parse_gold(ex.answer), pred, timeout_seconds=_math_timeout()))
    except Exception:  # sympy can fail in creative ways on adversarial text: that is a 0
        return 0.0


def math_demo(ex: Example) -> str:
    return ex.meta.get("solution") or f"The answer is $\\boxed{{{ex.answer}}}$."


# -----------------------------------------------------------------------------
# Instruction following: IFEval-style verifiable constraints

def _count_word(text: str, word: str) -> int:
    return len(re.findall(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, re.I))


def _n_words(text: str) -> int:
    return len(re.findall(r"\w+(?:['’-]\w+)*", text))


def _is_json(text: str) -> bool:
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())  # a fenced block is fine
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _paragraphs(text: str) -> int:
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()])


# type -> (parameters, check(response, **params) -> bool)
IF_CONSTRAINTS = {
    "min_words":       (("n",), lambda r, n: _n_words(r) >= n),
    "max_words":       (("n",), lambda r, n: _n_words(r) <= n),
    "keywords":        (("words",), lambda r, words: all(_count_word(r, w) > 0 for w in words)),
    "forbidden_words": (("words",), lambda r, words: not any(_count_word(r, w) for w in words)),
    "keyword_count":   (("word", "n"), lambda r, word, n: _count_word(r, word) >= n),
    "json":            ((), _is_json),
    "bullets":         (("n",), lambda r, n: len(re.findall(r"^\s*[*-][ \t]+\S", r, re.M)) == n),
    "lowercase":       ((), lambda r: r == r.lower() and r != r.upper()),  # has letters, none upper
    "uppercase":       ((), lambda r: r == r.upper() and r != r.lower()),
    "starts_with":     (("phrase",), lambda r, phrase: r.strip().lower().startswith(phrase.strip().lower())),
    "ends_with":       (("phrase",), lambda r, phrase: r.strip().lower().endswith(phrase.strip().lower())),
    "paragraphs":      (("n",), lambda r, n: _paragraphs(r) == n),  # separated by blank lines
    "no_commas":       ((), lambda r: "," not in r),
    "title":           ((), lambda r: re.search(r"<<[^\n<>]+>>", r) is not None),  # <<like this>>
    "quoted":          ((), lambda r: len(r.strip()) >= 2 and r.strip()[0] == r.strip()[-1] == '"'),
    "placeholders":    (("n",), lambda r, n: len(re.findall(r"\[[^\[\]\n]+\]", r)) >= n),  # [address]
    "highlights":      (("n",), lambda r, n: len(re.findall(r"(?<!\*)\*[^\s*][^\n*]*\*(?!\*)", r)) >= n),
    "postscript":      (("marker",), lambda r, marker: re.search(r"^\s*" + re.escape(marker), r, re.M | re.I)
                        is not None),  # a line starting with e.g. "P.S."
}
_PARAM_TYPES = {"n": int, "words": list, "word": str, "phrase": str, "marker": str}


def _validate_constraints(constraints, where: str) -> list[dict]:
    if not isinstance(constraints, list) or not constraints:
        raise ValueError(f"{where}: field 'constraints' must be a non-empty list")
    for i, c in enumerate(constraints):
        if not isinstance(c, dict) or c.get("type") not in IF_CONSTRAINTS:
            got = c.get("type") if isinstance(c, dict) else c
            raise ValueError(f"{where}: constraints[{i}]: unknown constraint type {got!r}; "
                             f"known: {', '.join(IF_CONSTRAINTS)}")
        for p in IF_CONSTRAINTS[c["type"]][0]:
            ok = p in c and isinstance(c[p], _PARAM_TYPES[p]) and not isinstance(c[p], bool)
            if ok and p == "words":
                ok = all(isinstance(w, str) and w for w in c[p])
            if not ok:
                raise ValueError(f"{where}: constraints[{i}] ({c['type']}): parameter {p!r} must be "
                                 f"a {_PARAM_TYPES[p].__name__}")
    return constraints


def check_constraints(response: str, constraints: list[dict]) -> list[bool]:
    """One boolean per constraint; all() of them is IFEval's strict prompt-level accuracy."""
    out = []
    for c in constraints:
        params, check = IF_CONSTRAINTS[c["type"]]
        out.append(bool(response.strip()) and bool(check(response, **{p: c[p] for p in params})))
    return out


def if_reward(response: str, ex: Example) -> float:
    # The fraction met, not all-or-nothing: a denser signal for RL. An empty response scores
    # 0 (check_constraints) even though it trivially "has no commas".
    met = check_constraints(response, ex.meta["constraints"])
    return sum(met) / len(met)


def if_demo(ex: Example) -> str:
    if not ex.answer:
        raise ValueError(f"if example at line {ex.meta.get('line')} has no 'solution' to demonstrate")
    return ex.answer


# -----------------------------------------------------------------------------
# Code: unit tests run in a sandboxed child process

CODE_TIMEOUT_S = 5.0


def extract_code(response: str) -> str:
    """The last ```python (or unlabelled) fenced block; the whole response if there is none.
    A block cut off by the end of the response counts; blocks in other languages do not."""
    blocks, current, lang = [], None, ""
    for line in response.splitlines(keepends=True):
        fence = line.strip().startswith("```")
        if current is None and fence:
            current, lang = [], line.strip()[3:].strip().lower()
        elif current is not None and fence:
            blocks.append((lang, "".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    if current is not None:
        blocks.append((lang, "".join(current)))
    python = [code for lang, code in blocks if lang in ("", "python", "py", "python3")]
    return python[-1] if python else response


def code_program(response: str, ex: Example) -> str:
    program = extract_code(response) + "\n\n" + ex.meta["tests"] + "\n"
    entry = ex.meta.get("entry_point")
    if entry and re.search(r"^def check\(", ex.meta["tests"], re.M):
        program += f"\ncheck({entry})\n"  # HumanEval-style tests define check(candidate)
    return program


def code_reward(response: str, ex: Example) -> float:
    # Exit status 0 alone is not enough: a response that calls sys.exit(0) (or os._exit(0))
    # before the tests run would pass. The tests must run to the end and print a fresh nonce.
    nonce = uuid.uuid4().hex
    ok, out = run_sandboxed(code_program(response, ex) + f"\nprint({nonce!r})\n", timeout_s=CODE_TIMEOUT_S)
    return float(ok and out.rstrip().endswith(nonce))


def code_demo(ex: Example) -> str:
    if not ex.answer:
        raise ValueError(f"code example at line {ex.meta.get('line')} has no 'solution' to demonstrate")
    return f"```python\n{ex.answer}\n```"


# How the sandbox works (run_sandboxed):
# - The child gets its own session (a process group we can SIGKILL whole), a fresh temp dir
#   as cwd, an environment of three variables (PATH, LANG, HOME), stdin from /dev/null, and
#   stdout+stderr in a file whose size the child's RLIMIT_FSIZE caps. After it ends or times
#   out, the group is SIGKILLed and the temp dir removed.
# - A small trusted bootstrap (_BOOTSTRAP) runs first in the child, then execs `python -I
#   main.py`. It unshares new network, mount and PID namespaces (as root directly; otherwise
#   inside a new user namespace, where the kernel allows unprivileged ones):
#   * network: only a downed loopback is left, so nothing is reachable;
#   * mounts: every mount becomes read-only and nosuid (privately: nothing propagates to the
#     host) and a size-limited noexec tmpfs covers the temp dir, the only writable place;
#   * PID: the code runs as PID 2 under a waiting PID 1; when PID 1 ends (with the code, or
#     SIGKILLed with the group, or by PDEATHSIG) the kernel kills every process left in the
#     namespace, setsid() or not, and a fresh /proc hides the machine's other processes.
#   Then it sets RLIMIT_CPU/AS/FSIZE/NPROC/NOFILE and CORE=0 and no_new_privs, and, as root,
#   drops to a fresh unused uid/gid (SANDBOX_UID_BASE + random, no supplementary groups). The
#   unique uid drops all capabilities, makes RLIMIT_NPROC a per-run limit, makes every other
#   process's /proc/<pid>/environ unreadable, and lets us kill whatever the run left behind
#   even without a PID namespace: one kill(-1, SIGKILL) issued as that uid (_KILLER) takes
#   all its processes at once, so a fork bomb cannot outrun it.
# - Each namespace is best effort: where the platform forbids it (e.g. docker's default
#   seccomp profile, or no unprivileged user namespaces) the run goes on without it, and
#   sandbox_report() says what is active. Without root and without namespaces, only the
#   rlimits, the clean environment and the process-group kill remain: the code can then
#   write wherever the calling user can, read the parent's /proc/<pid>/environ, and leave a
#   setsid() process behind.
# - The sandbox uid must be able to execute the interpreter: the first of sys.executable,
#   /usr/bin/python3, /usr/local/bin/python3 that runs a probe in the sandbox is used (a
#   pyenv python under /root, mode 700, is not reachable by an unprivileged uid).

SANDBOX_UID_BASE = 1 << 30  # far above any uid a distribution or a subuid range hands out

_BOOTSTRAP = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    work, uid, code = cfg["work"], cfg["uid"], open("main.py", "rb").read()
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
    # Mount only after making the whole tree private, so that nothing propagates to the host;
    # and make the rest read-only only once the tmpfs is there to write to.
    opts = "size=%dm,mode=700" % cfg["tmpfs_mb"] + (",uid=%d,gid=%d" % (uid, uid) if uid is not None else "")
    if isolated and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0 and \
            libc.mount(b"sandbox", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts.encode()) == 0:
        os.chdir(work)  # our cwd still pointed at the directory under the new mount
        with open("main.py", "wb") as f:
            f.write(code)
        if uid is not None:
            os.chown("main.py", uid, uid)
        for line in open("/proc/self/mountinfo"):
            fields = line.split()
            point = fields[4]  # mountinfo escapes space, tab, newline, backslash as octal
            for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(esc, ch)
            if point != work:
                flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
                flags |= (MS_NODEV if "nodev" in fields[5] else 0) | (MS_NOEXEC if "noexec" in fields[5] else 0)
                libc.mount(None, point.encode(), None, flags, None)  # best effort per mount
    if isolated:
        def exit_like(pid):  # wait for pid (reaping any other child meanwhile), exit as it did
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


def _run(code, python, timeout_s, mem_mb, cpu_s, nproc, fsize_mb, max_output):
    root = os.geteuid() == 0
    uid = _fresh_uid() if root else None
    work = os.path.realpath(tempfile.mkdtemp(prefix="mopd_sandbox_"))
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        if uid is not None:  # used where the mount namespace is unavailable
            os.chown(work, uid, uid)
            os.chown(os.path.join(work, "main.py"), uid, uid)
        if uid is None:  # RLIMIT_NPROC counts all of our uid's tasks: allow nproc more than now
            me = os.getuid()
            nproc += sum(threads for u, _, threads in _processes() if u == me)
        cpu = max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s))
        mb = 1 << 20
        cfg = {"work": work, "uid": uid, "python": python, "tmpfs_mb": max(fsize_mb, 1) * 4,
               "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work},
               # soft CPU limit sends SIGXCPU, the hard one a second later SIGKILL
               "limits": [("RLIMIT_CORE", 0, 0), ("RLIMIT_CPU", cpu, cpu + 1),
                          ("RLIMIT_AS", mem_mb * mb, mem_mb * mb), ("RLIMIT_FSIZE", fsize_mb * mb, fsize_mb * mb),
                          ("RLIMIT_NPROC", nproc, nproc), ("RLIMIT_NOFILE", 256, 256)]}
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen([python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)], cwd=work,
                                    env=cfg["env"], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_everything(proc, uid, python)
            size = out.seek(0, os.SEEK_END)
            out.seek(max(0, size - max_output))
            text = out.read().decode("utf-8", "replace")
        if timed_out:
            text += f"\n[sandbox: killed after {timeout_s}s wall-clock timeout]"
        return (not timed_out and proc.returncode == 0), text
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if uid is not None:
            with _uid_lock:
                _uids_taken.discard(uid)


def _kill_everything(proc, uid, python):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we created: main process and its children
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    # Whatever escaped the process group (setsid, daemons) still has the run's uid; the PID
    # namespace's teardown kills it too, but asynchronously. Return only once none of it is
    # alive: kill(-1) as that uid ends everything at once, and dying processes need a moment.
    deadline = time.monotonic() + 10
    while uid is not None and time.monotonic() < deadline and \
            any(u == uid and state != "Z" for u, state, _ in _processes()):
        try:
            subprocess.run([python, "-I", "-S", "-c", _KILLER, str(uid)], user=uid, group=uid, extra_groups=[],
                           env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.01)


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
                  nproc: int = 32, fsize_mb: int = 16, max_output: int = 8192) -> tuple[bool, str]:
    """Run python `code` in a sandboxed child; (exited with status 0 in time, last output).

    timeout_s is wall-clock, after which everything the run started is SIGKILLed; cpu_s
    (default timeout_s) is RLIMIT_CPU per process; mem_mb is RLIMIT_AS per process; nproc
    caps the run's processes+threads (RLIMIT_NPROC; not root: nproc more than the user has
    now); fsize_mb caps every file written, stdout included; max_output is how many trailing
    characters of stdout+stderr come back.
    Safe to call from several threads at once. See the comment above for the guarantees.
    """
    return _run(code, _sandbox_python(), timeout_s, mem_mb, cpu_s, nproc, fsize_mb, max_output)


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
print(json.dumps(r))
"""


def sandbox_report() -> dict:
    """Which protections are active on this machine (they depend on privileges and kernel)."""
    ok, out = run_sandboxed(_PROBE, timeout_s=20.0)
    if not ok:
        raise RuntimeError(f"sandbox probe failed: {out}")
    r = json.loads(out.strip().splitlines()[-1])
    return {"python": _sandbox_python(), "uid": r["uid"], "uid_dropped": r["uid"] >= SANDBOX_UID_BASE,
            "network_isolated": r["interfaces"] in ([], ["lo"]),
            "filesystem_readonly_outside_workdir": not r["tmp_writable"],
            "pid_namespace": r["pid"] == 2}


# -----------------------------------------------------------------------------
# Choosing domains

def _spec_help() -> str:
    return (f"toy domains: {', '.join(TOY_DOMAINS)}; 'toy:K' for the first K (1..{len(TOY_DOMAINS)}); "
            f"real domains: KIND:PATH or NAME=KIND:PATH with KIND in {', '.join(REAL_KINDS)}")


def get_domains(spec: str | list[str], data_dir: str | None = None) -> list[Domain]:
    """Domains from a spec such as "rev,sort,sum", "toy:8" or "math:gsm.jsonl,if:ifeval.jsonl"."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    items = [p.strip() for s in parts for p in s.split(",") if p.strip()]
    if not items:
        raise ValueError(f"empty domain spec; {_spec_help()}")
    domains = []
    for item in items:
        if item in TOY_OPS:
            domains.append(toy_domain(item))
            continue
        name, kind, path = None, item, ""
        if ":" in item:
            kind, path = item.split(":", 1)
            if "=" in kind:
                name, kind = kind.split("=", 1)
        kind = kind.strip()
        if kind == "toy" and path.strip().isdigit() and 1 <= int(path) <= len(TOY_DOMAINS):
            domains += [toy_domain(n) for n in TOY_DOMAINS[:int(path)]]
        elif kind in REAL_KINDS and path.strip():
            path = path.strip()
            if data_dir and not os.path.isabs(path):
                path = os.path.join(data_dir, path)
            if not os.path.isfile(path):
                raise ValueError(f"domain {item!r}: no such file {path}")
            domains.append(_real_domain((name or kind).strip(), kind, path))
        else:
            raise ValueError(f"unknown domain {item!r}; {_spec_help()}")
    names = [d.name for d in domains]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"domain names must be unique, repeated: {', '.join(dups)} (use NAME=KIND:PATH)")
    return domains


# -----------------------------------------------------------------------------
# Command line: toy statistics, sandbox report, offline math data

def _toy_stats():
    import itertools
    tok = toy_tokenizer()
    strings = ["".join(t) for k in range(TOY_MIN_DIGITS, TOY_MAX_DIGITS + 1)
               for t in itertools.product("0123456789", repeat=k)]
    n_eval_pool = sum(map(is_toy_eval, strings))
    print(f"toy vocab: {len(tok)} tokens; per domain: {len(strings) - n_eval_pool} distinct training prompts, "
          f"{n_eval_pool} held out, {EVAL_SIZE} of those in the eval set")
    print(f"{'domain':6} {'max prompt':>10} {'max answer':>10}  (tokens, answer without <eos>)  example")
    for name in TOY_DOMAINS:
        op = TOY_OPS[name][1]
        longest_prompt = len(tok.encode(_toy_example(name, "0" * TOY_MAX_DIGITS).prompt))
        longest_answer = max(len(op(s)) for s in strings)  # one char is one token
        ex = toy_domain(name).eval_set[0]
        print(f"{name:6} {longest_prompt:>10} {longest_answer:>10}  {ex.prompt!r} -> {ex.answer!r}  "
              f"({TOY_OPS[name][0]})")


def write_gym_math(path: str, n: int = 1000, dataset: str = "basic_arithmetic", seed: int = 0):
    """Write a math JSONL offline from a reasoning-gym generator (answers are gym's answers)."""
    import reasoning_gym
    data = reasoning_gym.create_dataset(dataset, size=n, seed=seed)
    with open(path, "w") as f:
        for item in data:
            prompt = item["question"] + "\nPut the final answer in \\boxed{}."
            f.write(json.dumps({"prompt": prompt, "answer": str(item["answer"])}) + "\n")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "gym":
        write_gym_math(sys.argv[2], *(int(a) if a.isdigit() else a for a in sys.argv[3:5]))
    else:
        _toy_stats()
        print("sandbox:", sandbox_report())
