"""
Multi-GPU training: the one place where FSDP2 (torch's `fully_shard`) is applied.

- init_distributed(): under torchrun, join the process group (nccl on CUDA, gloo on CPU)
  with a timeout, so a rank that dies makes the others fail within `timeout_s` instead of
  hanging forever; with plain `python` (no WORLD_SIZE, or 1) it does nothing.
- shard(model): fully_shard each decoder layer, then the root (embeddings, final norm,
  lm_head), the order torchtitan uses: one all-gather per layer in forward and backward,
  one reduce-scatter per layer for its gradients. Each rank keeps 1/world of every
  parameter (dim 0). MoE experts are stacked [E, I, H], so dim-0 sharding hands each rank
  whole experts: with world | E, FSDP's layout *is* expert parallelism.
  Default precision: the sharded parameters stay fp32 (they are the optimizer's master
  weights), layers compute in bf16 (cast during the all-gather), gradients are
  reduce-scattered in fp32. offload=True keeps the sharded parameters and gradients in
  host memory (FSDP2's CPUOffloadPolicy; the optimizer step then runs on the CPU).
  activation_checkpointing=True recomputes each layer's activations in backward.
- teardown(): leave the process group, if any: a barrier (on the normal path), then destroy it;
  with end_process=True (a rank's last act) the rank then ends at once, without the
  interpreter's own shutdown (why: teardown's docstring).
- Data parallelism, the few collectives the trainers need: rank_range (this rank's slice of
  a step's prompts), gather_list (per-row values from every rank, in rank order, so every
  rank computes the same global metrics), all_sum / global_max, grad_scale, barrier.

One rule makes FSDP safe with routing and ragged batches: a sharded model's forward (and
backward) is a collective, so every rank must call it the same number of times. Decoding
keeps stepping finished rows (rollout._all_done); micro-batch loops run global_max(...)
iterations, a rank with nothing left running a zero-weight dummy; every teacher is called
on every rank each step, on a dummy row when that rank has none of its domain.

    dist_info = init_distributed()           # first thing (config.cli does it)
    model = shard(model)                     # before building the optimizer (or
                                             # Transformer.from_pretrained(shard_fn=...))
    ...
    teardown(end_process=True)               # last thing (config.cli again)

Parameters after shard() are DTensors: build the optimizer after sharding, and read a full
weight with p.full_tensor() (a collective: every rank must call it).
"""

import datetime
import functools
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

try:  # torch >= 2.6
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.4 / 2.5
    from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

# bf16 compute, fp32 gradient reduction; the sharded (master) parameters keep their own dtype
BF16_MIXED = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self):  # the rank that logs, evaluates and writes checkpoints
        return self.rank == 0


def init_distributed(timeout_s=1800, backend=None):
    """
    Join the torchrun process group; returns DistInfo(rank, world_size, local_rank, device).
    No-op under plain python (no RANK in the environment); torchrun --nproc_per_node=1 gives a
    one-rank group, so that FSDP's options (bf16, offload) work on one GPU too. On CUDA each rank takes GPU LOCAL_RANK. The timeout bounds every
    collective: a rank that crashed or deadlocked (e.g. ranks calling forward a different
    number of times) turns into an error on the others after timeout_s, not a silent hang.
    """
    if "RANK" not in os.environ:  # plain python: no process group
        return DistInfo(device="cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    # NCCL for CUDA tensors, gloo for CPU ones (metrics, the norm of CPU-offloaded gradients)
    dist.init_process_group(backend or ("cpu:gloo,cuda:nccl" if cuda else "gloo"),
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=torch.device(device) if cuda else None)
    return DistInfo(rank, world, local_rank, device)


def active():
    """Whether this process is one rank of a process group (i.e. runs under torchrun). A group
    that a vLLM engine made in a plain process (engine.py; mark_foreign) does not count: the
    trainer must not think it is sharded because an engine is running beside it."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return _FOREIGN[0] is None or dist.distributed_c10d._get_default_group() is not _FOREIGN[0]


_FOREIGN = [None]  # the default group of a library (vLLM), not ours


def mark_foreign(was_active):
    """Called after a library may have made the default process group (engine.py, after starting
    a vLLM engine): if there was none of ours before, whatever exists now is the library's."""
    if not was_active and dist.is_available() and dist.is_initialized():
        _FOREIGN[0] = dist.distributed_c10d._get_default_group()


def world():
    """(rank, world size) of the default process group; (0, 1) without one."""
    if active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_range(n):
    """This rank's contiguous [start, stop) of n items, as even as possible.
    Contiguous, so that rank order == single-process order for everything gathered back."""
    rank, ws = world()
    if n < ws:
        raise ValueError(f"{n} prompts per step cannot be split over {ws} ranks (need >= 1 per rank)")
    return rank * n // ws, (rank + 1) * n // ws  # sizes differ by at most 1, none empty


def gather_list(xs):
    """Concatenate a list of Python values from every rank, in rank order (identity at world 1)."""
    rank, ws = world()
    if ws == 1:
        return list(xs)
    parts = [None] * ws
    dist.all_gather_object(parts, list(xs))
    return [x for p in parts for x in p]


def all_sum(t):
    """Sum a tensor over ranks (a new tensor; the input at world 1)."""
    if world()[1] == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def in_step(groups, fallback=(0,)):
    """(group, real) for each of a rank's groups of rows, the same number on every rank (the
    global maximum: a sharded forward is a collective); a rank past its groups gets
    (fallback, False): the caller runs it and drops the result."""
    for i in range(global_max(len(groups))):
        yield (groups[i], True) if i < len(groups) else (list(fallback), False)


def global_max(n, op="max"):
    """The largest int n over ranks (op="min": the smallest); e.g. how many times every rank
    must call a sharded model."""
    if world()[1] == 1:
        return n
    t = torch.tensor(n, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(t)


def _device():  # where collectives' scratch tensors live: NCCL only moves CUDA tensors
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else "cpu"


def grad_scale():
    """FSDP averages gradients over ranks, but our losses are already divided by the *global*
    batch counts (so that micro-batches and ranks add up to the loss of the whole batch): each
    rank multiplies its loss by the world size, and the average becomes the sum."""
    return world()[1]


def barrier():
    if world()[1] > 1:
        dist.barrier()


def teardown(end_process=False):
    """Leave the process group: the last thing each rank does (the scripts' cli(), the spawned test
    ranks), in a `finally`. A no-op without a process group (plain python, or already left).

    On the normal path the ranks first meet at a barrier, so that none leaves while a peer is
    still inside a collective with it. Leaving is not just destroy_process_group(): for gloo
    that only unregisters the group (gloo's shutdown() is a no-op) while FSDP2's sharded modules
    keep the C++ group alive, so its threads (gloo's socket loop and two workers, and the
    rendezvous TCPStore's server on the rank that hosts it) run on until the interpreter exits
    and are torn down there, in whatever order the garbage collector frees the models; the
    process's exit is what closes its sockets. Without the barrier a rank that finished its
    last collective first can be exiting, closing the connections a slower peer is still
    using, and that peer's gloo threads then meet "Connection closed by peer" while its own
    interpreter is shutting down. After the barrier every rank is out of every collective.
    When an exception is propagating (sys.exc_info() is set inside the caller's `finally`), the
    ranks are out of step (a peer may be blocked in another collective): no barrier then, it
    could only wait for the timeout or pair with a different collective.

    end_process=True (config.cli, the tests' spawned ranks): after leaving, the rank ends with
    os._exit, its status that of the SystemExit in flight (0 when none). The reason is the
    threads above: FSDP2's modules are kept alive by references from C++ (autograd hooks), so
    gc cannot free them and gloo's threads are still running when the interpreter shuts down;
    tearing a running std::thread down there aborts the process ("terminate called without an
    active exception", SIGABRT) after all its work is done, rarely, depending on timing (seen
    once in CI at the end of a 2-rank MOPD run). Nothing is left to do at that point (every
    file is written and closed; stdout and stderr are flushed here), so the rank skips the
    shutdown instead of racing it. An exception other than SystemExit keeps the normal exit,
    so that its traceback is printed. So does a process that ran a vLLM engine: its CPU backend's
    shared-memory segments (/dev/shm/...cpushm_RANK, named the same in every run) are unlinked
    only by destructors of the normal exit; skipping them made the next such run fail ("create
    shm in SHMManager failed. errno: 17"), and vLLM's own shutdown has already destroyed the
    groups FSDP2 shares with it."""
    if not active():  # none of ours (a vLLM engine's own group is the engine's to close)
        return
    exc, engines = sys.exc_info()[1], bool(BEFORE_TEARDOWN)
    try:
        if exc is None and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        while BEFORE_TEARDOWN:  # vLLM engines (engine.py): they leave their groups, then ours
            BEFORE_TEARDOWN.pop()()
        if dist.is_initialized():
            dist.destroy_process_group()
    if end_process and not engines and (exc is None or isinstance(exc, SystemExit)):
        code = 0 if exc is None or exc.code is None else exc.code
        if not isinstance(code, int):  # sys.exit("message"): Python prints it and exits 1
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# what must close before the process group goes (engine.py registers each engine's close():
# vLLM's own shutdown destroys its sub-groups and the default group with them)
BEFORE_TEARDOWN = []


def shard(model, mesh=None, mp_policy=BF16_MIXED, reshard_after_forward=True, offload=False,
          activation_checkpointing=False):
    """
    FSDP2 over `mesh` (default: all ranks of the default process group): each of
    model.layers, then the root. Returns the model (modified in place; its parameters become
    DTensors sharded on dim 0). Without a process group (plain `python`) nothing is sharded
    (activation checkpointing, if asked for, still applies).

    mp_policy: BF16_MIXED (default) or None for full fp32. reshard_after_forward=False keeps
    each decoder layer gathered from forward to backward (less communication, more memory).
    offload=True: sharded params/grads live in host memory, copied in per layer (CPUOffloadPolicy).
    Frozen models (teachers) are sharded the same way; they simply never produce gradients.
    """
    if activation_checkpointing:  # before sharding: FSDP's hooks then wrap the checkpointed call
        for layer in model.layers:
            layer.forward = _checkpointed(layer.forward)
    if not active():
        return model
    kw = dict(mesh=mesh)
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    if offload:  # pinned host memory makes the per-layer copies asynchronous; needs CUDA
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    # The root (embed_tokens, norm, lm_head; tied or not, one group) keeps torch's default: it
    # stays gathered after forward, because our callers use lm_head *after* model(...) returns
    # (vocab_kernels.py on the hidden states, rollout.py's model.lm_head). After a no_grad forward
    # nothing reshards it: call model.reshard() when done (e.g. a teacher after scoring).
    fully_shard(model, **kw)
    # what rollout.py allocates its KV cache with: the device the layers compute on (not that
    # of the shards, which offload keeps in host memory) and the dtype they compute in
    model.compute_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
        torch.device("cpu")
    model.compute_dtype = mp_policy.param_dtype if mp_policy is not None else None
    return model


@contextmanager
def gathered(model, on=True):
    """
    Sampling under FSDP, two ways. Default (on=False): every decode step all-gathers each
    layer again, as training does: no extra memory, but each rank receives (W-1)/W of the
    model's bf16 bytes *per generated token* (Qwen3-30B-A3B on 8 GPUs: ~53 GB per step, about
    0.35 s at 150 GB/s: far slower than the decode math). on=True: inside this block each
    layer stays gathered after its first forward, so the whole rollout costs one all-gather
    per layer, for the memory of a full copy of the weights (61 GB in bf16 for 30B; at scale
    a rollout copy with experts kept sharded, i.e. expert parallelism, or a separate inference
    engine is the real answer; plan_memory.py plans that). Resharded on exit (layers sharded
    with shard()'s default reshard_after_forward=True).
    """
    layers = [l for l in model.layers if hasattr(l, "set_reshard_after_forward")] if on else []
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
            layer.reshard()


def _checkpointed(forward):
    """Keep only the layer's inputs in forward; recompute its activations during backward.
    Parameter names are unchanged (no wrapper module), so checkpoints keep HF names."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def local_bytes(tensors):
    """Bytes this rank holds of the given (DTensor or plain) tensors: its shards only."""
    n = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        n += t.numel() * t.element_size()
    return n
