"""
The teachers of MOPD: one frozen checkpoint per domain, and how they score the student.

- parse_registry: domain -> teacher directory, from `--teacher=rev=DIR,sort=DIR` items or a
  JSON file {"rev": "DIR", ...}.
- Teachers: loads each teacher lazily (on its first batch), frozen and in eval mode;
  with offload=True it keeps a teacher in CPU memory and moves it to the compute device only
  while it scores (at scale, three 30B teachers cannot all sit on a GPU beside the student).
- validate(): before any training step, each teacher against the student: its files are
  whole (checkpoint.check_files: config.json, safetensors headers and sizes, the index's
  files; no weight is read), same vocabulary and special tokens (not just the same length),
  same vocab/embedding size. MOPD's signal
  log pi_T(y_t) - log pi_theta(y_t) compares two distributions over the *same* token ids;
  a different tokenizer makes it silently meaningless.
- Under torchrun, teachers are sharded like the student (distributed.shard, frozen, no
  mixed-precision cast: they are stored in the dtype they compute in); offload then means
  FSDP2's CPU offload on a GPU. load_frozen() is also how RL loads its KL reference model.
- score(): prefill only (teachers never generate), batched per teacher, keeping only what
  the chosen loss needs: per-token log-probs of the student's tokens (PG form), or the
  teacher's top-k ids and log-probs (Eq. 5), or its final hidden states (exact KL). Never
  [tokens x vocab] logits: vocab_kernels.py computes all three from hidden states.
  Teachers.seconds counts the time spent in it (wherever it is called from: before the
  update for the PG form, inside mopd.distill_update for the others), so that a step can
  report its teacher time apart from its update time.
"""

import functools
import json
import os
import time

import torch

import distributed
import vocab_kernels as kernels
from model import Transformer

# -----------------------------------------------------------------------------
# registry

def parse_registry(spec):
    """'rev=DIR,sort=DIR' or a list of 'domain=DIR' items or 'FILE.json' -> {domain: dir}."""
    items = spec if isinstance(spec, (list, tuple)) else [s for s in spec.split(",") if s]
    if len(items) == 1 and items[0].endswith(".json"):
        path = items[0]
        try:
            with open(path) as f:
                reg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(reg, dict) or not all(isinstance(v, str) for v in reg.values()):
            raise ValueError(f"{path}: expected a JSON object {{\"domain\": \"checkpoint dir\", ...}}")
        return dict(reg)
    reg = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"teacher {item!r}: expected DOMAIN=DIR")
        d, path = item.split("=", 1)
        if d in reg:
            raise ValueError(f"teacher for domain {d!r} given twice")
        reg[d] = path
    if not reg:
        raise ValueError("no teachers given (--teacher=DOMAIN=DIR,...)")
    return reg


def validate(student_tok, student_model, teacher_dir, domain):
    """One clear error if the teacher cannot score the student's tokens, or if its files are
    truncated or missing (found now, not at the step that first loads the teacher)."""
    from checkpoint import check_files, load_tokenizer
    from model import ModelConfig
    where = f"teacher {domain!r} ({teacher_dir}) vs the student ({student_model.source_dir})"
    if not os.path.isdir(teacher_dir):
        raise ValueError(f"teacher {domain!r}: {teacher_dir}: no such checkpoint directory")
    check_files(teacher_dir, f"--teacher={domain}={teacher_dir}")
    tcfg = ModelConfig.from_hf(teacher_dir)
    if tcfg.vocab_size != student_model.config.vocab_size:
        raise ValueError(f"{where}: vocab/embedding size {tcfg.vocab_size} != {student_model.config.vocab_size}")
    ttok = load_tokenizer(teacher_dir, f"--teacher={domain}")
    if ttok.get_vocab() != student_tok.get_vocab():
        a, b = ttok.get_vocab(), student_tok.get_vocab()
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ValueError(f"{where}: tokenizers differ ({len(a)} vs {len(b)} tokens; e.g. {diff})")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(ttok, name) != getattr(student_tok, name):
            raise ValueError(f"{where}: {name} {getattr(ttok, name)} != {getattr(student_tok, name)}")
    if sorted(ttok.all_special_tokens) != sorted(student_tok.all_special_tokens):
        raise ValueError(f"{where}: special tokens differ: {ttok.all_special_tokens} vs {student_tok.all_special_tokens}")

# -----------------------------------------------------------------------------
# the pool of teachers

def load_frozen(path, dtype, device, offload=False):
    """A frozen, eval-mode model: sharded over the ranks under torchrun (each rank reads only
    its shard), else whole. With offload its (shards of) weights are kept in CPU memory: FSDP2's
    CPU offload copies each layer in when sharded (torchtitan's rule: materialise on the CPU),
    Teachers.score moves a whole single-process teacher in and out."""
    shard_fn = None
    if distributed.active():
        shard_fn = functools.partial(distributed.shard, mp_policy=None,
                                     offload=offload and torch.cuda.is_available())
    m = Transformer.from_pretrained(path, dtype=dtype, device="cpu" if offload else device,
                                    shard_fn=shard_fn)
    m.requires_grad_(False)
    return m.eval()


class Teachers:
    """domain -> frozen teacher, loaded on first use."""

    def __init__(self, registry, device="cpu", dtype=torch.float32, offload=False, engine=None):
        self.registry, self.device, self.dtype, self.offload = dict(registry), device, dtype, offload
        self.models = {}
        # engine: Engine options (--teacher_engine=vllm): "logprobs" and "topk" are then the prompt
        # log-probs of one vLLM engine per teacher (engine.py); "hidden" (the exact KL) stays native
        self.engine_options, self.engines = engine, {}
        # seconds spent scoring (prefill and the loss's outputs, offload moves included; not the
        # first call's load): a step reads the difference across its own calls
        self.seconds = 0.0
        # single process: offload = move the whole teacher in and out; sharded: FSDP does it per layer
        self.move = offload and not distributed.active()

    def check_domains(self, domains):
        missing = [d for d in domains if d not in self.registry]
        if missing:
            raise ValueError(f"no teacher for domain(s) {missing}; teachers exist for {sorted(self.registry)}")

    def get(self, domain):
        self.check_domains([domain])
        if domain not in self.models:
            self.models[domain] = load_frozen(self.registry[domain], self.dtype, self.device, self.offload)
        return self.models[domain]

    @torch.no_grad()
    def score(self, domain, tokens, mask, what="logprobs", temperature=1.0, k=64):
        """
        Prefill the teacher of `domain` on the student's sequences tokens [R, L] and return,
        aligned with tokens[:, 1:] and zero where `mask` [R, L-1] is False:
          "logprobs": log pi_T(y_t | x, y_<t)                    [R, L-1]
          "topk":     (ids [R, L-1, k], log-probs [R, L-1, k])   over the full vocabulary
          "hidden":   (final hidden states [R, L-1, H_T], lm_head weight [V, H_T])
        `what` may be a tuple of these: a tuple of results from one and the same prefill.
        """
        kinds = (what,) if isinstance(what, str) else tuple(what)
        bad = [w for w in kinds if w not in ("logprobs", "topk", "hidden")]
        if bad:
            raise ValueError(f"score: what={bad[0]!r}; expected logprobs, topk or hidden")
        if self.engine_options is not None and "hidden" not in kinds:
            return self._score_on_engine(domain, tokens, mask, what, k)
        m = self.get(domain)
        sharded = m.is_sharded()
        if tokens.is_cuda:  # time this teacher's work, not the kernels still queued before it
            torch.cuda.synchronize(tokens.device)
        t0 = time.perf_counter()
        if self.move:
            m.to(self.device)
        try:
            hidden = m(tokens[:, :-1], return_hidden=True)
            W = m.lm_head_weight
            out = []
            for w in kinds:
                if w == "logprobs":
                    out.append(kernels.token_logprobs(hidden, W, tokens[:, 1:], temperature=temperature, mask=mask))
                elif w == "topk":
                    out.append(kernels.teacher_topk(hidden, W, k=k, temperature=temperature, mask=mask))
                else:  # the weight outlives this call: copy it before it moves away or is resharded
                    out.append((hidden * mask[..., None], W.clone() if self.move or sharded else W))
            return out[0] if isinstance(what, str) else tuple(out)
        finally:
            if self.move:
                m.to("cpu")
            if sharded:  # FSDP keeps the root (embeddings, lm_head) gathered after forward: free it
                m.reshard()
            if tokens.is_cuda:
                torch.cuda.synchronize(tokens.device)
            self.seconds += time.perf_counter() - t0

    def _score_on_engine(self, domain, tokens, mask, what, k):
        import engine
        self.check_domains([domain])
        if domain not in self.engines:  # started on first use, like the native teachers
            self.engines[domain] = engine.Engine(self.registry[domain], dtype=self.dtype, **self.engine_options)
        t0 = time.perf_counter()
        try:
            return self.engines[domain].score(tokens, mask, what, k)
        finally:
            self.seconds += time.perf_counter() - t0


def route(row_domains):
    """{domain: [row indices]}: each row goes to its own domain's teacher, and only there."""
    out = {}
    for r, d in enumerate(row_domains):
        out.setdefault(d, []).append(r)
    return out


def each_domain(groups, domains):
    """
    (domain, rows, real) over `domains` in their given order. A sharded teacher's forward is a
    collective, so under torchrun a rank with no row of a domain still calls its teacher, on
    row 0, and drops the result (real=False); a single process just skips the domain.
    """
    multi = distributed.world()[1] > 1
    for d in domains:
        rows = groups.get(d, [])
        if rows or multi:
            yield d, rows or [0], bool(rows)
