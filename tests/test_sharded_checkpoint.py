"""
Sharded checkpoints: model.py's from_pretrained(shard_fn=...) and save_pretrained() on an FSDP2
model (distributed.shard), on tiny random HF checkpoints with odd sizes (vocab 97, 3 experts),
so that the dim-0 shards are uneven (torch.chunk: 49 + 48 rows, 2 + 1 experts).
- two gloo ranks: each holds exactly its rows, read as file slices (never a whole tensor), and
  computes the single-process logits; tied embeddings stay tied; the collective save (one file
  or several) holds exactly the original tensors and loads into transformers, into a
  single-process model, and back into a sharded one;
- at world size 1 (and without a process group) the same path works, errors included.
"""
import datetime
import json
import os
import shutil
from functools import partial
from unittest import mock

import pytest
import safetensors
import torch
import torch.distributed as dist
from conftest import free_port, hf_class, hf_config, join_ranks

import distributed
from model import Transformer
from test_model import assert_as_accurate, hf_truth  # ours within 2x a plain fp32 run's error of fp64

ARCHS = ("qwen3", "qwen3_moe")  # tied embeddings; untied, 3 experts (MoE layer 0, dense layer 1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def odd_dirs(tmp_path_factory):
    """arch -> a random transformers checkpoint with odd dim-0 sizes."""
    out = {}
    for arch in ARCHS:
        cfg = hf_config(arch)
        cfg.vocab_size = 97
        if arch == "qwen3_moe":
            cfg.num_experts = 3
        torch.manual_seed(0)
        d = str(tmp_path_factory.mktemp(f"odd_{arch}"))
        hf_class(arch)(cfg).save_pretrained(d)
        out[arch] = d
    return out


_safe_open = safetensors.safe_open


class _SlicesOnly:
    """safetensors.safe_open that refuses whole-tensor reads and counts the elements read."""
    read = 0

    def __init__(self, *a, **kw):
        self.f = _safe_open(*a, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, key):
        raise AssertionError(f"a sharded load read the whole tensor {key!r}")

    def get_slice(self, key):
        part, spy = self.f.get_slice(key), self

        class Slice:
            get_shape = part.get_shape

            def __getitem__(self, index):
                t = part[index]
                type(spy).read += t.numel()
                return t
        return Slice()


def _sharded_load(src):
    """from_pretrained(shard_fn=...) that fails on any whole-tensor read; -> (model, elements read)."""
    _SlicesOnly.read = 0
    with mock.patch("safetensors.safe_open", _SlicesOnly):
        m = Transformer.from_pretrained(src, shard_fn=partial(distributed.shard, mp_policy=None))
    return m, _SlicesOnly.read


def _worker(rank, port, dirs, out):
    join_ranks(rank, port)
    try:
        ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
        for arch, src in dirs.items():
            ref = Transformer.from_pretrained(src)
            m, read = _sharded_load(src)
            assert (m.lm_head.weight is m.embed_tokens.weight) == (arch == "qwen3")
            local = 0
            for (name, p), q in zip(m.named_parameters(), ref.parameters()):
                per = -(-q.shape[0] // 2)  # torch.chunk: rank 0 takes ceil(n / 2) rows
                rows = q[rank * per:(rank + 1) * per]
                assert torch.equal(p.to_local(), rows), name
                local += rows.numel()
            assert read == local  # this rank's rows and nothing else
            if arch == "qwen3_moe":
                assert m.layers[0].mlp.gate_proj.to_local().shape[0] == (2, 1)[rank]
                assert m.embed_tokens.weight.to_local().shape[0] == (49, 48)[rank]
            with torch.no_grad():
                assert_as_accurate(m(ids), ref(ids), Transformer.from_pretrained(src, dtype=torch.float64)(ids))
            with m.inference_weights():  # a no-op on shards
                assert m.layers[1].self_attn.wt is None and m.layers[1].mlp.wt is None
            for name, kw in [("one", {}), ("many", dict(max_shard_bytes=50_000))]:
                d = m.save_pretrained(os.path.join(out, f"{arch}-{name}"), **kw)  # collective
                assert os.path.isfile(os.path.join(d, "config.json"))  # on every rank on return
            again, _ = _sharded_load(d)  # an indexed, multi-file checkpoint, sharded again
            with torch.no_grad():
                assert torch.equal(again(ids), m(ids))
        open(os.path.join(out, f"ok{rank}"), "w").close()
    finally:
        distributed.teardown(end_process=True)


def test_two_ranks_load_and_save_sharded(odd_dirs, tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path)
    mp.spawn(_worker, args=(free_port(), odd_dirs, out), nprocs=2, join=True)
    names = [f"{a}-{n}" for a in ARCHS for n in ("one", "many")]
    assert sorted(os.listdir(out)) == sorted(names + ["ok0", "ok1"])  # no temporary directory left
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    for arch in ARCHS:
        orig = Transformer.from_pretrained(odd_dirs[arch])
        for name in ("one", "many"):
            d = os.path.join(out, f"{arch}-{name}")
            files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
            assert (files == ["model.safetensors"]) if name == "one" else len(files) > 2
            again = Transformer.from_pretrained(d)
            assert list(again.state_dict()) == list(orig.state_dict())
            for (k, a), b in zip(orig.state_dict().items(), again.state_dict().values()):
                assert torch.equal(a, b), k
            hf = hf_class(arch).from_pretrained(d).eval()
            with torch.no_grad():
                assert_as_accurate(orig(x), hf(x).logits, hf_truth(d, arch)(x).logits, d)


def test_world_size_1_and_no_process_group(odd_dirs, tmp_path):
    """shard_fn without a process group (distributed.shard does nothing) and at world size 1:
    the same model, the same saved bytes, the same errors as the plain path."""
    src = odd_dirs["qwen3_moe"]
    ref = Transformer.from_pretrained(src)
    x = torch.randint(0, 97, (1, 8))
    shard_fn = partial(distributed.shard, mp_policy=None)
    m = Transformer.from_pretrained(src, shard_fn=shard_fn)
    assert not m.is_sharded() and torch.equal(m(x), ref(x))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        m = Transformer.from_pretrained(src, shard_fn=shard_fn)
        assert m.is_sharded()
        with torch.no_grad():
            assert torch.equal(m(x), ref(x))
        a = m.save_pretrained(tmp_path / "a", max_shard_bytes=50_000)
        b = ref.save_pretrained(tmp_path / "b", max_shard_bytes=50_000)
        for f in sorted(os.listdir(a)):
            assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
        # the plain path's errors, from the sharded reader
        index = json.load(open(os.path.join(b, "model.safetensors.index.json")))
        key = "model.layers.0.mlp.experts.2.up_proj.weight"
        gone = index["weight_map"][key]
        os.remove(os.path.join(b, gone))
        with pytest.raises(FileNotFoundError, match=gone + ": shard listed in the index is missing"):
            Transformer.from_pretrained(b, shard_fn=shard_fn)
        c = shutil.copytree(src, tmp_path / "c")
        from safetensors.torch import load_file, save_file
        sd = load_file(os.path.join(c, "model.safetensors"))
        sd[key] = torch.zeros(3, 3)
        save_file(sd, os.path.join(c, "model.safetensors"))
        with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{key}' has shape \(3, 3\)"):
            Transformer.from_pretrained(c, shard_fn=shard_fn)
        del sd[key]
        save_file(sd, os.path.join(c, "model.safetensors"))
        with pytest.raises(KeyError, match=f"missing tensor '{key}'"):
            Transformer.from_pretrained(c, shard_fn=shard_fn)
    finally:
        dist.destroy_process_group()
