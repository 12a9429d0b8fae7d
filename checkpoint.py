"""
Everything that touches the disk, and the rules that keep what is written there from being lost.

- Hugging Face directories (config.json + model.safetensors, or an index + shards, + the
  tokenizer's files): load_pretrained / load_hf_weights read each tensor straight from its
  file into a model built on the meta device (under FSDP each rank reads only its slices);
  save_pretrained writes one (sharded above 5 GiB; a collective on a sharded model) and swaps
  it into place; check_files validates a directory's files without reading a weight;
  load_tokenizer. model.py's Transformer.from_pretrained / load_hf_weights / save_pretrained
  are these, so model.py itself does no file IO beyond reading a config.json.
- replace_dir: the atomic swap: fsync the new directory's files and the directory, move the
  old one aside (PATH.old-XXXXXXXX), rename the new one in, fsync the parent, remove the old.
- The trainer checkpoint, one format for every training script: the HF directory +
  trainer_state.pt (step, config, world size) + optimizer/ (AdamW's state as a
  torch.distributed.checkpoint, which reloads at any number of ranks), written under
  OUT_DIR.staging and swapped in by replace_dir (save_checkpoint; refuses non-finite weights;
  a full disk removes the partial staging and stops with one line); recover_checkpoint puts a
  complete staging in place after a crash between the two renames; resume_optimizer.
- Run, the output directory of one training run (`with Run(cfg, sources) as run:`): before
  anything loads it checks that OUT_DIR is not one of the run's sources, that its parent is a
  writable directory, takes OUT_DIR.lock (fcntl.flock, held until the block ends: a second run
  into the same OUT_DIR fails at once; a crash releases it), refuses a fresh run into an
  OUT_DIR that already holds a run unless --resume=true or --overwrite=true, compares a
  resumed checkpoint's config with this one (RESUMABLE lists what may change without
  breaking bit-identical resume; --resume_override=key,... accepts others), recovers a
  complete staging and removes the leftovers of interrupted saves. During the run: the
  metrics log (OUT_DIR.log/metrics.jsonl; a row is appended whole or not at all, and a write
  that fails, a full disk, stops the run with one line) and the step's one line on stdout
  (readout: metrics, per-domain values, the time of each phase), the divergence guard
  (check_finite) and the one-line report of a Ctrl-C.
- The same rules for the other scripts' outputs: check_out_dir (not a source, not a file, a
  writable parent) and refuse_held (what an output already holds is replaced only with
  --overwrite=true, and only by a complete new one): merge.py's --out, evaluate.py's results.
Under torchrun every rank enters Run and saves (collectives), rank 0 alone takes the lock,
checks, writes the log and renames; the others learn its verdict through one collective.
"""

import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import time
import warnings

import torch

import distributed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # one of them holds the vocabulary

# -----------------------------------------------------------------------------
# Hugging Face directories: read

def load_pretrained(cls, path, dtype=None, device="cpu", shard_fn=None):
    """
    Transformer.from_pretrained: an HF directory (config.json + model.safetensors, or a
    sharded model.safetensors.index.json) as a `cls`. Built on the meta device first, so no
    memory is spent on a random init; each tensor is then read straight from its shard.

    shard_fn (e.g. functools.partial(distributed.shard, mp_policy=None)) shards the model
    before any weight exists: FSDP2 shards the meta parameters without allocating,
    to_empty() allocates only this rank's shards on `device`, and each rank reads only
    its own slices of the files, so no rank ever holds a whole parameter (a 30B model
    loads in 1/world of its size per rank). Every rank must call it.
    """
    from model import ModelConfig
    cfg = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = cls(cfg)
    if dtype is None:
        dtype = getattr(torch, str(cfg.extra.get("torch_dtype") or cfg.extra.get("dtype") or "float32").replace("torch.", ""))
    if shard_fn is not None:  # shards keep the dtype their parameters had when sharded
        model = shard_fn(model.to(dtype))
        model.to_empty(device=device)
    load_hf_weights(model, path, dtype=dtype, device=device)
    model.source_dir = os.path.abspath(path)
    return model.eval()


def load_hf_weights(model, path, dtype=torch.float32, device="cpu", only=None):
    """
    Read every parameter of `model` (or those named in `only`) from the HF directory `path`
    and assign it (works on a meta-device model). Errors name the file and tensor.
    Sharded parameters (DTensors, allocated by to_empty) are filled in place instead, in
    their own dtype and device: each rank reads only its slice of each tensor (for stacked
    MoE weights, only its experts' tensors).
    """
    from safetensors import safe_open

    from model import rope_inv_freq
    files = _weight_files(path)  # hf key -> file
    handles = {}

    def read(key, shape, index=None):
        """Tensor `key`, checked to have `shape`; only its part `index` (slices) if given."""
        if key not in files:
            raise KeyError(f"{path}: missing tensor {key!r} in checkpoint")
        fname = files[key]
        full = os.path.join(path, fname)
        if fname not in handles:
            if not os.path.exists(full):
                raise FileNotFoundError(f"{full}: shard listed in the index is missing (needed for {key!r})")
            try:
                handles[fname] = safe_open(full, framework="pt", device="cpu")
            except Exception as e:
                raise ValueError(f"{full}: unreadable or truncated safetensors file ({e})") from None
        try:
            part = handles[fname].get_slice(key)  # reads only the header
            got = tuple(part.get_shape())
            if got == tuple(shape):
                return part[index] if index is not None else handles[fname].get_tensor(key)
        except Exception as e:
            raise ValueError(f"{full}: cannot read tensor {key!r} ({e})") from None
        raise ValueError(f"{path}/{fname}: tensor {key!r} has shape {got}, model expects {tuple(shape)}")

    sd = {}
    for name, p, keys in model._hf_layout(keep_vars=True):
        if only is not None and name not in only:
            continue
        stacked = keys[0][1] is not None  # MoE experts: [E, ...] from E tensors of shape [...]
        if _is_shard(p):
            try:
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
            except ImportError:  # torch 2.4
                from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
            local = p.to_local()
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            if tuple(shape) != tuple(local.shape):  # would silently read the wrong rows
                raise RuntimeError(f"{name}: local shard {tuple(local.shape)}, expected {tuple(shape)}")
            index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            with torch.no_grad():
                if stacked:
                    for j, (hf, _) in enumerate(keys[index[0]]):
                        local[j].copy_(read(hf, p.shape[1:], index[1:]))
                else:
                    local.copy_(read(keys[0][0], p.shape, index))
            continue
        parts = [read(hf, p.shape[1:] if stacked else p.shape) for hf, _ in keys]
        sd[name] = (torch.stack(parts) if stacked else parts[0]).to(device=device, dtype=dtype)
    if sd:
        model.load_state_dict(sd, strict=only is None and not model.config.tie_word_embeddings, assign=True)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared one
    model._inv_freq = rope_inv_freq(model.config)  # built on meta; to_empty leaves it there
    return model


def _weight_files(path):
    """HF tensor name -> file name, from the index (sharded) or the single file's header."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            try:
                return json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: malformed index ({e})") from None
    if os.path.exists(single):
        from safetensors import safe_open
        try:
            with safe_open(single, framework="pt") as f:
                return {k: "model.safetensors" for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{single}: unreadable or truncated safetensors file ({e})") from None
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def check_files(path, flag):
    """
    A checkpoint directory's files, without reading a weight: config.json parses (into an
    architecture we build), every safetensors file's header parses and the file is exactly as
    long as its header says (8 + header + the last tensor's end), and every file the index
    names exists. One error, `FLAG: FILE: what is wrong`, so that a truncated teacher is
    found at start-up rather than at the step that first loads it.
    """
    from model import ModelConfig
    try:
        ModelConfig.from_hf(path)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                try:
                    names = sorted(set(json.load(f)["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, AttributeError) as e:
                    raise ValueError(f"{index}: malformed index ({e!r})") from None
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            names = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        for name in names:
            _check_safetensors(os.path.join(path, name))
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{flag}: {e}") from None


def _check_safetensors(full):
    if not os.path.exists(full):
        raise FileNotFoundError(f"{full}: listed in the index but missing")
    size = os.path.getsize(full)
    with open(full, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{full}: truncated safetensors file ({size} bytes; its header is incomplete)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise ValueError(f"{full}: not a safetensors file (its header does not parse)") from None
    if size != 8 + n + end:
        raise ValueError(f"{full}: truncated safetensors file ({size} bytes; its header says {8 + n + end})")


def load_tokenizer(path, flag=None):
    """transformers.AutoTokenizer of a checkpoint directory, refusing one without tokenizer
    files: AutoTokenizer would quietly build an empty tokenizer from config.json's model type,
    which encodes every prompt to nothing. `flag` (e.g. "--init") names the option in errors."""
    from transformers import AutoTokenizer
    where = f"{flag}={path}" if flag else path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: no such checkpoint directory")
    if not any(os.path.exists(os.path.join(path, f)) for f in VOCAB_FILES):
        raise FileNotFoundError(f"{where}: no tokenizer files in it (none of {', '.join(VOCAB_FILES)})")
    return AutoTokenizer.from_pretrained(path)

# -----------------------------------------------------------------------------
# Hugging Face directories: write

def save_pretrained(model, path, tokenizer_dir=None, max_shard_bytes=5 * 2**30):
    """
    Write an HF directory that transformers.AutoModelForCausalLM loads. Atomic: written
    under a temporary name beside `path` (PATH.tmp-XXXXXXXX), then swapped in by replace_dir,
    so a crash never leaves a half-written checkpoint under the final name. Tokenizer files
    are copied from `tokenizer_dir` (default: the directory the model was loaded from).

    On a sharded model this is a collective: every rank calls it. Which parameter goes
    to which file is planned from shapes alone (so all ranks agree), then each file is
    gathered parameter by parameter (full_tensor(), the same order on every rank), written
    by rank 0 and freed: rank 0 holds at most about one file plus one parameter. Only rank
    0 writes; should it fail (a full disk), it still takes part in every gather, and at the
    end every rank raises its error: no rank is left waiting for a collective.
    """
    from safetensors.torch import save_file
    path = os.path.abspath(path)
    layout = model._hf_layout(keep_vars=True)  # sharded: FSDP's state_dict hook reshards first
    sharded = any(_is_shard(t) for _, t, _ in layout)
    writer = not sharded or distributed.world()[0] == 0
    files, size, total = [[]], 0, 0  # the entries of `layout` per file; a parameter is never split
    for entry in layout:
        n = entry[1].numel() * entry[1].dtype.itemsize
        if files[-1] and size + n > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size, total = size + n, total + n
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    tmp, failed = None, None

    def write(fn, *args):
        nonlocal failed, tmp
        if not writer or failed is not None:
            return
        try:
            fn(*args)
        except Exception as e:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp = None
            if not sharded:
                raise
            failed = e  # keep gathering with the other ranks; raised below

    def start():
        nonlocal tmp
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
        hf = model.config.to_hf()
        hf.pop("torch_dtype", None)
        hf["dtype"] = str(layout[0][1].dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)

    def finish(weight_map):
        if len(files) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        src = tokenizer_dir or model.source_dir
        if src and os.path.isdir(src):
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(src, name)):
                    shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        replace_dir(tmp, path)

    try:
        write(start)
        weight_map = {}
        for fname, entries in zip(names, files):
            shard = {}
            for _, t, keys in entries:
                with torch.no_grad():
                    t = _full_tensor(t.detach()) if _is_shard(t) else t.detach()
                if writer and failed is None:
                    t = t.contiguous().cpu()
                    shard.update((hf, t if e is None else t[e]) for hf, e in keys)
            write(save_file, shard, os.path.join(tmp or "", fname), {"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        write(finish, weight_map)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if sharded:  # every rank learns whether rank 0 wrote it (and so never waits on a dead rank)
        errs = [e for e in distributed.gather_list([None if failed is None else (getattr(failed, "errno", None),
                                                                                  str(failed))]) if e]
        if failed is not None:
            raise failed
        if errs:
            raise OSError(errs[0][0] or errno.EIO, f"{path}: rank 0 could not write it: {errs[0][1]}")
    return path


def _is_shard(t):
    """Whether t is a DTensor (an FSDP2 shard). Duck-typed, like distributed.py: importing
    torch.distributed.tensor would add ~1 s to every process that imports this file."""
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _full_tensor(t):
    """The whole of a sharded tensor, on every rank (a collective). A CPU-offloaded shard
    (CPUOffloadPolicy) goes through its mesh's device: NCCL only gathers GPU tensors."""
    local = t.to_local()
    if local.device.type != t.device_mesh.device_type:
        t = type(t).from_local(local.to(t.device_mesh.device_type), t.device_mesh, t.placements,
                               shape=t.shape, stride=t.stride())
    return t.full_tensor()


def replace_dir(tmp, path):
    """
    Move directory `tmp` to `path`, replacing any old one. First every file in `tmp` and
    `tmp` itself are fsync'd (after a power cut a renamed directory must not hold empty
    files); the old `path` is moved aside to PATH.old-XXXXXXXX, `tmp` renamed in, the
    parent fsync'd, and the old one removed last.
    """
    fsync_tree(tmp)
    parent = os.path.dirname(os.path.abspath(path))
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
        os.rmdir(old)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def fsync_tree(root):
    """fsync every file under `root`, then each directory (deepest first), then `root`."""
    for d, _, files in os.walk(root, topdown=False):
        for f in files:
            _fsync(os.path.join(d, f))
        _fsync(d)


def _fsync(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems do not fsync directories
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)

# -----------------------------------------------------------------------------
# the trainer checkpoint: HF directory + trainer_state.pt + optimizer/

def save_checkpoint(path, model, tokenizer_dir, state, opt=None):
    """
    HF directory + trainer_state.pt (+ optimizer/ when training continues), swapped in
    atomically: written under PATH.staging, renamed over PATH last, so a crash at any point
    leaves the previous checkpoint whole, or the new one complete in PATH.staging (which
    --resume then puts in place: recover_checkpoint). trainer_state.pt is written last (to a
    temporary name, then renamed), so a staging that holds it is complete.
    Refuses a model with a NaN or infinite weight (nothing is written). A full disk (ENOSPC,
    EDQUOT) removes the partial staging and stops the run with one line; the previous
    checkpoint is untouched. Collective under torchrun: every rank calls it, save_pretrained
    gathers one file's tensors at a time to rank 0, each rank writes its own shard of the
    optimizer state (all ranks must see one filesystem), and every rank learns whether
    rank 0's writes succeeded.
    """
    path = os.path.normpath(path)
    step = state["step"]
    bad = _first_nonfinite(model)
    if bad:
        raise SystemExit(f"step {step}: parameter {bad} is not finite: refusing to save it; "
                         f"last good checkpoint: {last_checkpoint(path)}")
    rank = distributed.world()[0]
    staging = path + ".staging"
    failure = None
    try:
        model.save_pretrained(staging, tokenizer_dir=tokenizer_dir)
        if opt is not None:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
            with warnings.catch_warnings():  # "no process group: assuming a single process" is the point
                warnings.simplefilter("ignore", UserWarning)
                _dcp().save(get_optimizer_state_dict(model, opt), checkpoint_id=os.path.join(staging, "optimizer"))
        distributed.barrier()
        if rank == 0:
            tmp = os.path.join(staging, "trainer_state.pt.tmp")
            torch.save(state, tmp)
            os.rename(tmp, os.path.join(staging, "trainer_state.pt"))
            replace_dir(staging, path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # OSError, or torch.distributed.checkpoint's CheckpointException (a BaseException)
        if _caused_by(e, lambda x: isinstance(x, KeyboardInterrupt)):  # Ctrl-C inside the optimizer's save
            raise KeyboardInterrupt from None
        failure = e
    fails = [f for f in distributed.gather_list([None if failure is None else (_disk_full(failure), str(failure))])
             if f]
    if not fails:
        return
    if rank == 0 and (os.path.exists(path) or not os.path.exists(os.path.join(staging, "trainer_state.pt"))):
        shutil.rmtree(staging, ignore_errors=True)  # partial (or superseded): never a checkpoint to keep
        for name in _leftovers(os.path.basename(staging), os.path.dirname(os.path.abspath(staging))):
            shutil.rmtree(os.path.join(os.path.dirname(os.path.abspath(staging)), name), ignore_errors=True)
    if any(full for full, _ in fails):
        raise SystemExit(f"{path}: no space left on device while saving step {step}: removed the partial "
                         f"{staging}; last checkpoint: {last_checkpoint(path)}")
    if failure is not None:
        raise failure
    raise RuntimeError(f"saving {path} failed on another rank: {fails[0][1]}")


def _first_nonfinite(model):
    """The name of the first parameter holding a NaN or an infinity (on any rank), else None."""
    bad = None
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.to_local() if _is_shard(p) else p
            if not bool(torch.isfinite(t).all()):
                bad = name
                break
    return next((b for b in distributed.gather_list([bad]) if b), None)


def _disk_full(e):
    """Whether exception e is (or was caused by) a full disk or an exhausted quota."""
    return _caused_by(e, lambda x: isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT))


def _caused_by(e, test):
    """Whether test(x) holds for e, what caused it, or the per-rank failures that a
    torch.distributed.checkpoint CheckpointException carries."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if test(e):
            return True
        for inner in (getattr(e, "failures", None) or {}).values():  # rank -> (exception, traceback)
            if _caused_by(inner[0] if isinstance(inner, tuple) else inner, test):
                return True
        e = e.__cause__ or e.__context__
    return False


def recover_checkpoint(path):
    """A crash inside replace_dir, between moving the old checkpoint aside and renaming the new
    one into place, leaves no PATH but a complete PATH.staging (trainer_state.pt is written
    last): put it in place, so that --resume continues from it instead of starting over."""
    staging = path + ".staging"
    if not os.path.exists(path) and os.path.exists(os.path.join(staging, "trainer_state.pt")):
        os.rename(staging, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
        print(f"recovered {path} from {staging}")


def load_trainer_state(path):
    f = os.path.join(path, "trainer_state.pt")
    return torch.load(f, weights_only=False) if os.path.exists(f) else None


def last_checkpoint(path):
    """'step N in PATH' for the checkpoint PATH holds (or PATH.staging, complete, after a crash
    between the renames), else 'none in PATH': what the one-line errors report."""
    for d in (path, path + ".staging"):
        try:
            state = load_trainer_state(d)
        except Exception:
            state = None
        if state and "step" in state:
            return f"step {state['step']} in {d}"
    return f"none in {path}"


def resume_optimizer(state, path, model, opt):
    """The step to start from: 0 on a fresh run (state None); else `opt` is filled from
    PATH/optimizer (written by save_checkpoint at any world size) and it is state["step"]."""
    if not state:
        return 0
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    if not os.path.isdir(os.path.join(path, "optimizer")):
        raise FileNotFoundError(f"{path}/optimizer: missing; cannot resume the optimizer state")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        osd = get_optimizer_state_dict(model, opt)  # a template: AdamW's state at step 0, our layout
        _dcp().load(osd, checkpoint_id=os.path.join(path, "optimizer"))
        set_optimizer_state_dict(model, opt, osd)
    if distributed.world()[0] == 0:
        print(f"resumed {path} at step {state['step']}")
    return state["step"]


def _dcp():
    import torch.distributed.checkpoint as dcp
    return dcp

# -----------------------------------------------------------------------------
# one training run's output directory

# config keys a resumed run may change without breaking bit-identical resume (what to
# evaluate and when, when to save, where the model runs and how its memory is managed);
# everything else (seed, domains, the schedule, steps, the batch, sampling, the loss, ...)
# must match the checkpoint's, or be named in --resume_override
RESUMABLE = {"out_dir", "eval_every", "eval_limit", "ckpt_every", "device", "resume", "overwrite", "resume_override",
             "teacher_offload", "rollout_gather", "activation_checkpointing", "exact_kl_rows", "exact_kl_every"}
PATH_KEYS = {"init", "teacher", "data_dir", "data"}  # compared as real paths (DOMAIN=DIR items each)


class Run:
    """
    `with Run(cfg, {"--init": DIR, "--teacher=rev": DIR, ...}) as run:` the output directory
    cfg.out_dir of one training run, for the length of the block (see the module docstring).
    run.state is the trainer_state.pt to resume (None on a fresh run). Inside the block:
    run.begin(start) right before the first step, run.check_finite(row) and run.log(row) every
    step, run.trainer_state(step) for save_checkpoint, run.stop_if_interrupted() at the end of
    each step (Ctrl-C during a step stops the run after it; a second Ctrl-C at once). A
    KeyboardInterrupt leaves the block as KeyboardInterrupt("interrupted after step N of S;
    last checkpoint: ...").
    """

    def __init__(self, cfg, sources=None):
        self.cfg, self.sources = cfg, {k: v for k, v in (sources or {}).items() if v}
        self.out = os.path.normpath(cfg.out_dir)
        self.log_path = os.path.join(self.out + ".log", "metrics.jsonl")
        self.state, self.done, self._fd, self._t0 = None, None, None, time.time()
        self._stop, self._sigint = False, None

    # ---- entering: every check before anything loads --------------------------------------

    def __enter__(self):
        main = distributed.world()[0] == 0
        err = None
        if main:
            try:
                self._prepare()
            except OSError as e:  # FileNotFoundError's own messages; else what the system said, and where
                err = str(e) if not e.errno else f"--out_dir={self.out}: {e.strerror}: {e.filename}"
            except (ValueError, KeyError, SystemExit) as e:
                err = str(e.args[0] if isinstance(e, KeyError) and e.args else e.code if isinstance(e, SystemExit)
                          else e)
        err = next((e for e in distributed.gather_list([err]) if e), None)  # every rank: rank 0's verdict
        if err:
            self._unlock()
            raise SystemExit(err)
        if self.cfg.resume:  # every rank reads it (one filesystem); rank 0 has checked it
            self.state = load_trainer_state(self.out)
        if threading.current_thread() is threading.main_thread():
            self._sigint = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        """Ctrl-C. Inside the loop the step in progress is finished (logged, and saved if due) and
        the run stops at stop_if_interrupted(); before the loop, or at a second Ctrl-C, at once.
        (Deferred, because a KeyboardInterrupt raised where Python cannot pass it on, e.g. inside
        an object's __del__, is printed and dropped, and the run would go on.)"""
        if self.done is None or self._stop:
            raise KeyboardInterrupt
        self._stop = True

    def _prepare(self):
        cfg, out = self.cfg, self.out
        bad = [k for k in (cfg.resume_override or "").split(",") if k and k not in dataclasses.asdict(cfg)]
        if bad:
            raise ValueError(f"--resume_override={cfg.resume_override}: unknown config key {bad[0]!r}")
        if cfg.resume and cfg.overwrite:
            raise ValueError(f"--resume=true and --overwrite=true: choose one (continue the run in {out}, "
                             f"or replace it)")
        check_out_dir(out, "--out_dir", self.sources)
        self._lock()
        if cfg.resume:
            recover_checkpoint(out)
        held = self._held()
        if not cfg.resume:
            refuse_held(out, "--out_dir", f"a run ({', '.join(held)})" if held else "", cfg.overwrite,
                        "--resume=true continues it, --overwrite=true replaces it")
        if cfg.resume:
            state = load_trainer_state(out)
            if state is not None:
                check_resumable(state, cfg, out)
        parent = os.path.dirname(os.path.abspath(out))
        for name in _leftovers(os.path.basename(out), parent):
            if name == os.path.basename(out) + ".staging" and self._complete_staging() and not cfg.resume:
                continue  # the --overwrite'n run's: removed by begin(), once this run has started
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            print(f"removed {os.path.join(parent, name)}: the leftover of a save that never finished")

    def _complete_staging(self):
        return os.path.exists(os.path.join(self.out + ".staging", "trainer_state.pt"))

    def _held(self):
        """What of a previous run OUT_DIR holds: a checkpoint, files, a complete staging, metrics."""
        out, held = self.out, []
        state = None
        try:
            state = load_trainer_state(out)
        except Exception:
            held.append(f"an unreadable {out}/trainer_state.pt")
        if state:
            held.append(f"a checkpoint at step {state.get('step', '?')}")
        elif files_in(out):
            held.append(files_in(out))
        if self._complete_staging():
            held.append(f"a complete {out}.staging")
        if os.path.exists(self.log_path) and os.path.getsize(self.log_path):
            held.append(self.log_path)
        return held

    def _lock(self):
        """OUT_DIR.lock, flock'ed (exclusive, non-blocking) until the block ends; its content is
        the holder's pid. After a lock is taken, the file must still be the one at that path (a
        holder removes it on release): else another run may hold the new one, so try again."""
        path = self.out + ".lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                pid = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                raise ValueError(f"--out_dir={self.out}: another run is writing it ({path} is held"
                                 + (f" by pid {pid}" if pid else "") + "); wait for it, or choose another --out_dir")
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _unlock(self):
        if self._fd is not None:
            try:
                os.unlink(self.out + ".lock")  # while still holding it (see _lock)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def __exit__(self, typ, exc, tb):
        self._unlock()
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None
        if typ is KeyboardInterrupt:
            where = "before step 1" if self.done is None else f"after step {self.done} of {self.cfg.steps}"
            raise KeyboardInterrupt(f"interrupted {where}; last checkpoint: {last_checkpoint(self.out)}") from None
        return False

    # ---- during the run -----------------------------------------------------------------

    def begin(self, start):
        """Right before the first step, once everything has loaded and been checked: a fresh run
        with --overwrite=true removes the previous run's checkpoint and metrics now (not
        earlier: a run refused at start-up leaves them alone); the metrics log starts (a
        resumed one is first cut back to `start`)."""
        if distributed.world()[0] == 0:
            if self.cfg.overwrite and not self.state:
                for p in (self.out, self.out + ".staging"):
                    shutil.rmtree(p, ignore_errors=True)
                if os.path.exists(self.log_path):
                    os.remove(self.log_path)
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            keep = []
            if self.state and os.path.exists(self.log_path):
                keep = [l for l in open(self.log_path) if l.strip() and json.loads(l).get("step", 0) <= start]
            write_text(self.log_path, "".join(keep))  # replaced in one rename: never half cut
        self.done, self._t0 = start, time.time()

    def check_finite(self, row):
        """Stop at the first step whose loss or gradient norm is NaN or infinite (on any rank:
        one collective), before anything of it is logged or saved: the last checkpoint stays
        the last good one."""
        vals = {k: row[k] for k in ("loss", "grad_norm") if k in row}
        bad = not all(math.isfinite(v) for v in vals.values())
        if distributed.global_max(int(bad)):
            raise SystemExit(f"step {row['step']}: " + " ".join(f"{k}={v:.4g}" for k, v in vals.items())
                             + f": diverged; last good checkpoint: {last_checkpoint(self.out)}")

    def log(self, row, show=("loss",)):
        """Append the step's row to OUT_DIR.log/metrics.jsonl and print one line (rank 0; readout
        below: the metrics in `show`, the response length, the phase times, the eval). A write
        that fails (a full disk, like save_checkpoint's) is cut back out of the log and stops the
        run with one line, on every rank (one collective), before this step's checkpoint: the
        last checkpoint and the log up to it stay as they were, and --resume continues."""
        self.done = row["step"]
        main = distributed.world()[0] == 0
        row = {**row, "time": round(time.time() - self._t0, 3)}
        err = None
        if main:
            try:
                append_line(self.log_path, json.dumps(row))
            except OSError as e:
                why = "no space left on device" if _disk_full(e) else (e.strerror or str(e))
                err = (f"{self.log_path}: {why} while logging step {row['step']}; last checkpoint: "
                       f"{last_checkpoint(self.out)}")
        err = next((e for e in distributed.gather_list([err]) if e), None)  # every rank: rank 0's verdict
        if err:
            raise SystemExit(err)
        if main:
            print(readout(row, self.cfg.steps, show), flush=True)

    def stop_if_interrupted(self):
        """The end of a step: stop here if Ctrl-C was pressed during it (on any rank: one
        collective under torchrun, so that every rank stops after the same step)."""
        if distributed.global_max(int(self._stop)):
            raise KeyboardInterrupt

    def trainer_state(self, step):
        return {"step": step, "config": dataclasses.asdict(self.cfg), "world_size": distributed.world()[1]}


# the phases of a step whose seconds a training row holds, in the order the readout prints them
# (the label is the key without "_s"): sampling, the reward function, the teachers' forwards
# (every MOPD loss: before the update or inside it), RL's frozen reference model, the update
# without the teachers (forward, backward, optimizer step), MOPD's exact-KL metric, the eval
PHASES = ("sample_s", "reward_s", "score_s", "ref_s", "update_s", "exact_kl_s", "eval_s")


def readout(row, steps, show=("loss",)):
    """
    The line a step prints on stdout, e.g. (a MOPD step over two domains, with an eval):
      step 3/300: reward 0.265 (arith=0.310 if=0.220) kl_est 0.4120 (arith=0.4000 if=0.4300) loss 0.0123
        len 187.2 | time sample 41.2s reward 0.312s score 5.1s update 12.3s eval 180s | eval arith=0.300 if=0.210 (254s)
    (one line). Each key of `show` that the row has: its value, then its value in each domain
    when there are several (from row[key + "_by_domain"] or row["by_domain"][domain][key]); a
    key only some domains have (kl_exact, on the steps that compute it) shows those. Then
    the mean response length, the seconds of each phase the row has (PHASES), the held-out
    accuracies when the step evaluated, and the seconds since the run (re)started.
    """
    parts = [f"step {row['step']}/{steps}:"]
    several = len(row.get("by_domain") or row.get("reward_by_domain") or {}) > 1  # domains this step
    for k in show:
        per = row.get(k + "_by_domain") or {d: m[k] for d, m in row.get("by_domain", {}).items() if k in m}
        fmt = {"reward": ".3f", "no_signal_frac": ".2f"}.get(k, ".4f")
        if k in row:
            parts.append(f"{k} {row[k]:{fmt}}")
        elif per and not several:
            parts.append(f"{k} {next(iter(per.values())):{fmt}}")
        elif per:
            parts.append(k)
        if per and several:
            parts.append("(" + " ".join(f"{d}={v:{fmt}}" for d, v in per.items()) + ")")
    if "response_len" in row:
        parts.append(f"len {row['response_len']:.1f}")
    times = [f"{k[:-2]} {_seconds(row[k])}" for k in PHASES if k in row]
    if times:
        parts.append("| time " + " ".join(times))
    if "eval" in row:
        parts.append("| eval " + " ".join(f"{k}={v:.3f}" for k, v in row["eval"].items()))
    return " ".join(parts) + f" ({row['time']:.0f}s)"


def _seconds(s):
    return f"{s:.3f}s" if s < 1 else f"{s:.1f}s" if s < 100 else f"{s:.0f}s"


def refuse_source(out, flag, sources):
    """An output directory must not be (or contain, or lie inside) a directory the run reads:
    saving would replace it. sources: {"--init": DIR, "--teacher=rev": DIR, ...}."""
    o = os.path.realpath(out)
    for src_flag, src in sources.items():
        s = os.path.realpath(src)
        if o == s:
            how = "is the same directory as"
        elif s.startswith(o + os.sep):
            how = "contains"
        elif o.startswith(s + os.sep):
            how = "is inside"
        else:
            continue
        raise ValueError(f"{flag}={out} {how} {src_flag}={src}: saving would replace or alter it; "
                         f"choose another {flag}")


def check_out_dir(out, flag, sources):
    """Before anything loads, an output directory a script writes (a trainer's OUT_DIR, merge.py's
    --out): not a source, nor in or around one (refuse_source), not a file, and in a writable
    parent (writable_parent). What it already holds is refuse_held's."""
    refuse_source(out, flag, sources)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag}={out}: exists and is not a directory")
    writable_parent(out, flag)


def refuse_held(out, flag, held, overwrite, hint="--overwrite=true replaces it"):
    """What `out` already holds (`held`: "a run (...)", files_in(out), ...; empty: nothing) is
    replaced only with --overwrite=true; else one line naming the option, the path and what is
    there. (Replaced only once the new output is complete: replace_dir, write_text.)"""
    if held and not overwrite:
        raise ValueError(f"{flag}={out} already holds {held}: {hint}")


def files_in(path):
    """'N files' when `path` is a non-empty directory, else ''."""
    n = len(os.listdir(path)) if os.path.isdir(path) else 0
    return f"{n} files" if n else ""


def write_text(path, text):
    """Write a file beside its final name, then rename it over that: never half a file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def append_line(path, text):
    """Append `text` + newline to `path`, whole or not at all: a write that fails part-way (a full
    disk) is cut back to the file's old length, so the log never ends in half a row."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = (text + "\n").encode()
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def writable_parent(out, flag):
    """The parent of `out` must be (or be creatable in) a writable directory; it is created."""
    parent = os.path.dirname(os.path.abspath(out))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag}={out}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}={out}: cannot write in {probe} (permission denied)")
    os.makedirs(parent, exist_ok=True)


def check_resumable(state, cfg, out):
    """Refuse to resume a checkpoint of another format, or of a run with another config (any
    key outside RESUMABLE and --resume_override): the result would not be the run resumed."""
    if "optimizer" in state or "step" not in state or "config" not in state:
        raise ValueError(f"{out}/trainer_state.pt: a checkpoint of an old format (no optimizer/ beside it) cannot be "
                         f"resumed; start a new run from its weights with --init={out} and another --out_dir")
    allowed = RESUMABLE | {k for k in (cfg.resume_override or "").split(",") if k}
    now, saved = dataclasses.asdict(cfg), state["config"]
    changed = [(k, saved[k], v) for k, v in now.items()
               if k not in allowed and k in saved and _norm(k, saved[k]) != _norm(k, v)]
    if changed:
        raise ValueError(f"--resume: {out} was trained with " + ", ".join(f"--{k}={a}" for k, a, _ in changed)
                         + "; now " + ", ".join(f"--{k}={b}" for k, _, b in changed)
                         + ": the resumed run would not continue it; give the old values, or --resume_override="
                         + ",".join(k for k, _, _ in changed) + " to accept the change")


def _norm(key, v):
    if key not in PATH_KEYS or not isinstance(v, str) or not v:
        return v
    items = []
    for item in v.split(","):
        head, eq, p = item.rpartition("=")
        items.append(head + eq + (os.path.realpath(p) if os.path.exists(p) else p))
    return ",".join(items)


def _leftovers(base, parent):
    """Names in `parent` that interrupted saves of `base` leave: base.staging, and the
    temporary directories base[.staging].tmp-XXXXXXXX / .old-XXXXXXXX (tempfile's 8 characters)."""
    pattern = re.compile(re.escape(base) + r"(\.staging)?\.(tmp|old)-[a-z0-9_]{8}|" + re.escape(base) + r"\.staging")
    try:
        return sorted(n for n in os.listdir(parent) if pattern.fullmatch(n))
    except FileNotFoundError:
        return []
