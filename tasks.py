"""
Domains and rewards for MOPD.

A domain is a source of prompts (with a fixed, held-out eval split), a reward on the
response text, and a name: the label d(x) that routes a prompt to its teacher. Two
families live here:

1. Toy domains (TOY_DOMAINS): digit-string puzzles that a ~1M-parameter model learns on a
   CPU in minutes, each with an exact verifier. They are built to compete inside one small
   model: every domain sees the same kind of input and only the word in front says what to
   do with it ("rev 48310=" -> "01384", "sort 48310=" -> "01348", "sum 48310=" -> "16"; 17 jobs).
   A character-level tokenizer (toy_tokenizer / save_toy_tokenizer) makes toy checkpoints
   ordinary Hugging Face directories.
   Worked toy domains (WORKED_DOMAINS: add, mul, isort) use the same tokenizer for answers of
   20-50 tokens written step by step, where one slip spoils every later step ("mul 4831x7="
   -> "1x7=7,3x7=21,8x7+2=58,4x7+5=33:33817"), two valid ways to write each; the reward reads
   the text after the last ":".
2. Real domains from local JSONL files: math (final answer checked with math-verify),
   instruction following (IFEval-style verifiable constraints), code (unit tests run in a
   sandbox that calls the program, itself in another sandbox: sandbox.run_tests).

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
    add,mul,isort           worked toy domains by name (WORKED_DOMAINS)
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
  response if there is none) as the program and "tests" (python asserts; when
  "entry_point" is given and the tests define check(candidate), HumanEval style, also a
  call check(<entry_point>)), and gives 1.0 iff sandbox.run_tests says the tests ran to
  their end: the program runs in one sandbox, the tests in another that calls its
  functions and gets plain data back, and the verdict comes from the tests' side only (the
  program can neither read the tests nor forge the verdict; see sandbox.py). Tests may use
  the program's functions, classes and objects with plain-data arguments and results, plus
  builtins and standard modules (the tests' own, even if the program rebinds `math`).
  demo = "```python\\n<solution>\\n```" (solution required for demos only).
Bad input fails loudly: a malformed line or missing field is a ValueError naming the file,
the line and the field; an empty file or an unknown domain name is a ValueError that lists
what exists.

`python tasks.py` prints the toy domains' statistics, the sandbox's protections and what
bounds its memory;
`python tasks.py gym OUT.jsonl [N] [DATASET]` writes a math JSONL offline with reasoning-gym;
`python tasks.py smol OUT_DIR` writes the arith and if domains sized for SmolLM2-135M.
"""

import json
import os
import random
import re
import sys
import threading
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

# The sandbox lives in sandbox.py; these names stay importable from tasks as before.
from sandbox import SANDBOX_UID_BASE, memory_bound, run_sandboxed, run_tests, sandbox_report  # noqa: F401


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
# Math/IF/SWE). All of the first sixteen are within reach of RL from an S0 trained on them;
# "sum" comes last: digit-sum arithmetic is a skill the 0.8M-parameter toy model does not pick
# up, and RL cannot find it from there (measured: 0.07 -> 0.08 in 300 steps), so it is opt-in.
TOY_OPS = {
    "rev":  ("the digits in reverse order", lambda s: s[::-1]),
    "sort": ("the digits sorted ascending", lambda s: "".join(sorted(s))),
    "inc":  ("every digit plus one, 9 wraps to 0", lambda s: "".join(str((int(c) + 1) % 10) for c in s)),
    "odd":  ("how many digits are odd", lambda s: str(sum(int(c) % 2 for c in s))),
    "max":  ("the largest digit", lambda s: max(s)),
    "rot":  ("the digits rotated left by one", lambda s: s[1:] + s[0]),
    "uniq": ("the digits without repeats, first occurrences kept", lambda s: "".join(dict.fromkeys(s))),
    "min":  ("the smallest digit", lambda s: min(s)),
    # eight more of the same kinds (permutations, digit-wise maps, counts, slices), for the
    # teacher-count curve to 16 (runs/scaling.sh, its S0 trained on all sixteen: toy16_base)
    "desc": ("the digits sorted descending", lambda s: "".join(sorted(s, reverse=True))),
    "dec":  ("every digit minus one, 0 wraps to 9", lambda s: "".join(str((int(c) - 1) % 10) for c in s)),
    "rotr": ("the digits rotated right by one", lambda s: s[-1] + s[:-1]),
    "comp": ("every digit's complement to nine", lambda s: "".join(str(9 - int(c)) for c in s)),
    "swap": ("the first and last digits swapped", lambda s: s[-1] + s[1:-1] + s[0]),
    "even": ("how many digits are even", lambda s: str(sum(int(c) % 2 == 0 for c in s))),
    "dbl":  ("every digit doubled, keeping the last digit", lambda s: "".join(str(2 * int(c) % 10) for c in s)),
    "tail": ("every digit but the first", lambda s: s[1:]),
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
# Worked toy domains: long answers whose steps compound (issue 14)
#
# The digit puzzles above answer in <= 6 tokens with one correct string: off-policy
# finetuning is then plain supervised learning, and no error can compound. These three write
# a worked solution of 20-50 tokens, one step per digit, each step using the previous step's
# result (a carry, a partial list), then ":" and the answer; one slip early spoils every later
# step. Each has two valid ways to write the steps (ex.meta["style"], drawn per example), so a
# teacher's distribution is not a single path. The reward checks only the final answer (the
# text after the last ":"), as a math verifier checks a boxed answer.
#   add   "add 483+295="  -> "3+5=8,8+9=17,4+2+1=7:778"           (style 1: "5+3=8,9+8=17,...")
#   mul   "mul 4831x7="   -> "1x7=7,3x7=21,8x7+2=58,4x7+5=33:33817" (style 1: "7x1=7,7x3=21,...")
#   isort "isort 4831="   -> "4,48,348,1348:1348"  insertion sort, digits taken left to right
#                            (style 1: right to left, "1,13,138,1348:1348")
# Inputs: add two numbers of 3-5 digits (same length), mul a 3-5 digit number by one digit,
# isort 4-7 digits; held out by the CRC rule of the digit puzzles on the prompt's digits.

WORKED_OPS = {
    "add":   "column addition, right to left, each step a digit sum with its carry",
    "mul":   "a number times one digit, right to left, each step a product plus the carry",
    "isort": "insertion sort, the sorted prefix written after each insertion",
}
WORKED_DOMAINS = list(WORKED_OPS)


def _worked_input(name: str, rng: random.Random) -> str:
    digits = lambda k: "".join(rng.choices("0123456789", k=k))  # noqa: E731
    if name == "add":
        k = rng.randint(3, 5)
        return f"{digits(k)}+{digits(k)}"
    if name == "mul":
        return f"{digits(rng.randint(3, 5))}x{rng.randint(2, 9)}"
    return digits(rng.randint(4, 7))


def worked_solution(name: str, inp: str, style: int = 0, slip: int = -1, rng: random.Random | None = None):
    """(worked response, final answer) for input `inp`, its steps written in `style` (0 or 1).
    slip >= 0: step `slip` goes wrong (add/mul: its result off by one; isort: the digit inserted
    at another place, both drawn from rng) and every later step builds on the wrong value, so
    the final answer is wrong the way a real slip makes it wrong."""
    if slip >= 0 and rng is None:
        raise ValueError("worked_solution: a slip needs rng")
    steps, bump = [], (lambda i: (rng.choice((-1, 1)) if i == slip else 0))
    if name == "add":
        a, b = inp.split("+")
        carry, out = 0, ""
        for i, (x, y) in enumerate(zip(reversed(a), reversed(b))):
            v = max(int(x) + int(y) + carry + bump(i), 0)
            l, r = (x, y) if style == 0 else (y, x)
            steps.append(f"{l}+{r}{'+1' if carry else ''}={v}")
            carry, out = v // 10, str(v % 10) + out
        answer = (str(carry) if carry else "") + out
    elif name == "mul":
        a, m = inp.split("x")
        carry, out = 0, ""
        for i, x in enumerate(reversed(a)):
            v = max(int(x) * int(m) + carry + bump(i), 0)
            l, r = (x, m) if style == 0 else (m, x)
            steps.append(f"{l}x{r}{f'+{carry}' if carry else ''}={v}")
            carry, out = v // 10, str(v % 10) + out
        answer = (str(carry) if carry else "") + out
    else:
        part = []
        for i, d in enumerate(inp if style == 0 else inp[::-1]):
            pos = sum(c <= d for c in part)  # after the equal digits
            if i == slip:  # any place that gives a different list
                wrong = [q for q in range(len(part) + 1) if part[:q] + [d] + part[q:] != part[:pos] + [d] + part[pos:]]
                pos = rng.choice(wrong) if wrong else pos
            part.insert(pos, d)
            steps.append("".join(part))
        answer = steps[-1]
    return ",".join(steps) + ":" + answer, answer


def worked_reward(response: str, ex: Example) -> float:
    """1.0 iff the text after the last ":" (the whole response if there is none) is the answer."""
    return float(response.rsplit(":", 1)[-1].strip() == ex.answer)


def worked_steps(ex: Example) -> int:
    """How many steps the worked solution of ex has (where a slip can happen)."""
    return len(ex.meta["input"].split("+")[0].split("x")[0])


def _worked_example(name: str, inp: str, style: int) -> Example:
    return Example(f"{name} {inp}=", worked_solution(name, inp)[1], name,
                   {"digits": inp.replace("+", "").replace("x", ""), "input": inp, "style": style})


@lru_cache(maxsize=None)
def _worked_eval_inputs(name: str) -> tuple[str, ...]:
    rng, seen = random.Random(TOY_EVAL_SEED), {}
    while len(seen) < EVAL_SIZE:
        inp = _worked_input(name, rng)
        if is_toy_eval(inp):
            seen[inp] = None
    return tuple(seen)


def worked_domain(name: str) -> Domain:
    def sample(rng: random.Random) -> Example:
        while True:  # 90% of inputs are training inputs
            inp = _worked_input(name, rng)
            if not is_toy_eval(inp):
                return _worked_example(name, inp, rng.randint(0, 1))

    eval_set = [_worked_example(name, inp, 0) for inp in _worked_eval_inputs(name)]
    demo = lambda ex: worked_solution(name, ex.meta["input"], ex.meta["style"])[0]  # noqa: E731
    return Domain(name, sample, eval_set, worked_reward, demo)


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


def load_jsonl(path: str, kind: str, fits=None) -> list[Example]:
    """Parse and validate a JSONL file of the given kind (see the module docstring). fits(prompt),
    if given, says why a prompt does not fit the model's context (train_utils.prompt_fits), or None."""
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
            if fits is not None and (why := fits(row["prompt"])):
                raise ValueError(f"{where}: {why}")
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


def _real_domain(name: str, kind: str, path: str, fits=None) -> Domain:
    train, ev = split_examples(load_jsonl(path, kind, fits), path)
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
# Code: unit tests run against the program, each in its own sandbox (sandbox.py)

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


def code_tests(ex: Example) -> str:
    tests = ex.meta["tests"] + "\n"
    entry = ex.meta.get("entry_point")
    if entry and re.search(r"^def check\(", ex.meta["tests"], re.M):
        tests += f"\ncheck({entry})\n"  # HumanEval-style tests define check(candidate)
    return tests


def code_reward(response: str, ex: Example) -> float:
    # The tests run in a second sandbox that calls the program's functions and gets plain
    # data back; the verdict never passes through the program (see sandbox.py's threat model).
    passed, _ = run_tests(extract_code(response), code_tests(ex), ex.meta.get("entry_point"), timeout_s=CODE_TIMEOUT_S)
    return float(passed)


def code_demo(ex: Example) -> str:
    if not ex.answer:
        raise ValueError(f"code example at line {ex.meta.get('line')} has no 'solution' to demonstrate")
    return f"```python\n{ex.answer}\n```"


# -----------------------------------------------------------------------------
# Choosing domains

def _spec_help() -> str:
    return (f"toy domains: {', '.join(TOY_DOMAINS)}; 'toy:K' for the first K (1..{len(TOY_DOMAINS)}); "
            f"worked toy domains: {', '.join(WORKED_DOMAINS)}; "
            f"real domains: KIND:PATH or NAME=KIND:PATH with KIND in {', '.join(REAL_KINDS)}")


def get_domains(spec: str | list[str], data_dir: str | None = None, fits=None) -> list[Domain]:
    """Domains from a spec such as "rev,sort,sum", "toy:8" or "math:gsm.jsonl,if:ifeval.jsonl".
    fits: see load_jsonl (each JSONL prompt is checked against the model's context)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    items = [p.strip() for s in parts for p in s.split(",") if p.strip()]
    if not items:
        raise ValueError(f"empty domain spec; {_spec_help()}")
    domains = []
    for item in items:
        if item in TOY_OPS:
            domains.append(toy_domain(item))
            continue
        if item in WORKED_OPS:
            domains.append(worked_domain(item))
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
            domains.append(_real_domain((name or kind).strip(), kind, path, fits))
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


# Real domains sized for a ~135M model (SmolLM2-135M-Instruct, runs/smol.sh): on each, the
# model starts between ~10% and ~60% (measured, README "A real model on a laptop"), so RL has
# headroom and a signal. Generated offline and deterministically from a seed.
SMOL_TOPICS = ["dogs", "the sea", "rain", "coffee", "trees", "music", "the moon", "bread", "winter",
               "trains", "cats", "a city", "the sun", "books", "gardens", "rivers", "birds", "tea",
               "mountains", "snow", "friends", "a school", "apples", "the night"]
SMOL_WORDS = ["blue", "happy", "small", "quiet", "bright", "warm", "old", "green"]
SMOL_STARTS = ["Yes", "Indeed", "Well", "Today", "Sometimes"]


def smol_arith(rng: random.Random) -> dict:
    """A one-operation sum or difference of small numbers, answered with just the number.
    (SmolLM2-135M at T=1: ~30% on single digits, ~19% with one operand 10-50.)"""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        a = rng.randint(10, 20)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    ask = rng.choice(["What is {}?", "Compute {}.", "Calculate {}."]).format(f"{a} {op} {b}")
    return {"prompt": ask + " Answer with just the number.", "answer": str(a + b if op == "+" else a - b)}


def smol_if(rng: random.Random) -> dict:
    """A one-sentence writing request with one verifiable constraint (IF_CONSTRAINTS).
    SmolLM2-135M at T=1 meets: starts_with ~9%, lowercase ~2%, no_commas ~22%, at most k
    words ~42%, a keyword ~59%."""
    t = rng.choice(SMOL_TOPICS)
    kind = rng.choice(["starts_with", "lowercase", "no_commas", "max_words", "keywords"])
    if kind == "starts_with":
        w = rng.choice(SMOL_STARTS)
        return {"prompt": f'Write one sentence about {t}. Start your answer with the word "{w}".',
                "constraints": [{"type": "starts_with", "phrase": w}]}
    if kind == "lowercase":
        return {"prompt": f"Write one sentence about {t}. Use only lowercase letters.",
                "constraints": [{"type": "lowercase"}]}
    if kind == "no_commas":
        return {"prompt": f"Write two sentences about {t} without using any commas.",
                "constraints": [{"type": "no_commas"}]}
    if kind == "max_words":
        k = rng.randint(5, 10)
        return {"prompt": f"Describe {t} in at most {k} words.", "constraints": [{"type": "max_words", "n": k}]}
    w = rng.choice(SMOL_WORDS)
    return {"prompt": f'Write one sentence about {t} that uses the word "{w}".',
            "constraints": [{"type": "keywords", "words": [w]}]}


def write_smol_data(out_dir: str, n_train: int = 2000, n_eval: int = 100, seed: int = 0):
    """arith.jsonl and if.jsonl in out_dir: n_eval distinct held-out prompts ("split": "eval")
    and n_train training lines whose prompts never appear in eval."""
    os.makedirs(out_dir, exist_ok=True)
    for name, gen in (("arith", smol_arith), ("if", smol_if)):
        rng = random.Random(zlib.crc32(name.encode()) + seed)
        held, rows = set(), []
        while len(held) < n_eval:
            row = gen(rng)
            if row["prompt"] not in held:
                held.add(row["prompt"])
                rows.append({**row, "split": "eval"})
        while len(rows) < n_eval + n_train:
            row = gen(rng)
            if row["prompt"] not in held:
                rows.append({**row, "split": "train"})
        path = os.path.join(out_dir, name + ".jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}: {n_eval} eval + {n_train} train lines")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "gym":
        write_gym_math(sys.argv[2], *(int(a) if a.isdigit() else a for a in sys.argv[3:5]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "smol":
        write_smol_data(sys.argv[2])
    else:
        _toy_stats()
        report = sandbox_report()
        print("sandbox: total memory bounded by", report.pop("memory_bound"))
        print("sandbox:", report)
