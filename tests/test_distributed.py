"""
torchrun on CPU (gloo): two ranks train exactly what one process trains; ranks whose rows stop
at different lengths keep decoding together; a 2-rank run killed mid-way resumes from its
checkpoint (sharded optimizer state, torch.distributed.checkpoint) and matches the run that
was never killed. Every process group has a timeout, so a hang fails within a minute.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, join_ranks

import distributed
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "torchrun_entry.py")


def _launch(script, args, nproc, env=None, check=True):
    """`torchrun --nproc_per_node=nproc tests/torchrun_entry.py script args` (plain python at 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REWARD_BY_LENGTH": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, ENTRY, script, *args]
    else:
        # --standalone: torchrun's agent serves the rendezvous store on a port the OS picks and
        # holds (not a port found free earlier, which another process may take meanwhile)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               "--max_restarts=0", ENTRY, script, *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _log(out):
    return [json.loads(l) for l in open(out + ".log/metrics.jsonl")]


def _weights(d):
    return Transformer.from_pretrained(d).state_dict()


def _assert_same_run(a, b, tol):
    la, lb = _log(a), _log(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        for k in ("loss", "reward", "grad_norm", "response_len"):
            assert ra[k] == pytest.approx(rb[k], abs=tol, rel=tol), (k, ra["step"], ra[k], rb[k])
    wa, wb = _weights(a), _weights(b)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff <= tol, diff
    return la


def test_rl_two_ranks_equal_one_process(toy, tmp_path):
    args = ["--preset=tiny", f"--init={toy['base']}", "--domains=rev,sort", "--steps=3", "--micro_batch=3",
            "--kl_coef=0.01"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _launch("rl", args + [f"--out_dir={one}"], 1)
    # activation checkpointing and CPU offload of the sharded state change no number
    _launch("rl", args + [f"--out_dir={two}", "--activation_checkpointing=true", "--optimizer_offload=true"], 2)
    rows = _assert_same_run(one, two, 1e-5)
    assert any(r["loss"] != 0 for r in rows)  # the updates were real
    assert set(rows[-1]["eval"]) == {"rev", "sort"}
    assert not any(w.abs().max() == 0 for w in _weights(two).values())


def test_mopd_two_ranks_equal_one_process_and_resume_after_a_kill(toy, tmp_path):
    args = ["--preset=tiny", f"--init={toy['base']}", "--domains=rev,sort", "--steps=4", "--micro_batch=3",
            f"--teacher=rev={toy['rev']},sort={toy['sort']}"]
    one, two, killed = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "killed")
    _launch("mopd", args + [f"--out_dir={one}"], 1)
    _launch("mopd", args + [f"--out_dir={two}"], 2)
    rows = _assert_same_run(one, two, 1e-5)
    assert all("kl_exact" in m for m in rows[-1]["by_domain"].values())
    # 2 ranks, rank 1 killed right after step 2's checkpoint; resume on 2 ranks
    res = _launch("mopd", args + [f"--out_dir={killed}"], 2, env={"KILL_AFTER_STEP": "2"}, check=False)
    assert res.returncode != 0
    assert torch.load(os.path.join(killed, "trainer_state.pt"), weights_only=False)["step"] == 2
    _launch("mopd", args + [f"--out_dir={killed}", "--resume=true"], 2)
    _assert_same_run(two, killed, 0.0)  # bit for bit
    # the sharded checkpoint also resumes in one process (torch.distributed.checkpoint reshards)
    wk = _weights(killed)
    _launch("mopd", args + [f"--out_dir={killed}", "--resume=true", "--steps=5", "--resume_override=steps"], 1)
    assert [r["step"] for r in _log(killed)] == [1, 2, 3, 4, 5]
    assert not all(torch.equal(wk[k], v) for k, v in _weights(killed).items())


def _uneven_eos_worker(rank, port, ckpt, out_dir):
    """Rank 0's rows all stop after one token, rank 1's run to max_new_tokens: no deadlock, and
    each rank's samples equal what one process samples from the unsharded model."""
    import functools

    from rollout import generate
    join_ranks(rank, port)
    try:
        model = Transformer.from_pretrained(ckpt, shard_fn=functools.partial(distributed.shard, mp_policy=None))
        ref = Transformer.from_pretrained(ckpt)
        vocab = model.config.vocab_size
        stops = list(range(vocab)) if rank == 0 else []  # rank 0: every token is a stop token
        prompts = [[1, 5 + rank, 7], [1, 9]]
        import rollout
        grad_on, sample = [], rollout.sample_next  # grad mode at each draw: sampling records no graph
        rollout.sample_next = lambda *a, **k: grad_on.append(torch.is_grad_enabled()) or sample(*a, **k)
        got = generate(model, prompts, 6, stop_token_ids=stops, n=2, seed=rank)
        rollout.sample_next = sample
        assert grad_on and not any(grad_on)
        want = generate(ref, prompts, 6, stop_token_ids=stops, n=2, seed=rank)
        assert got.response_lens.tolist() == ([1] * 4 if rank == 0 else [6] * 4)
        assert torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
        with distributed.gathered(model):  # the alternative: one all-gather per layer per rollout
            again = generate(model, prompts, 6, stop_token_ids=stops, n=2, seed=rank)
            assert not _is_dtensor(model.layers[0].self_attn.q_proj.weight)  # still gathered
        assert torch.equal(again.tokens, want.tokens)
        assert _is_dtensor(model.layers[0].self_attn.q_proj.weight)  # resharded on exit
        # bf16 mixed precision (fp32 master shards, bf16 compute): the KV cache follows the compute dtype
        m16 = Transformer.from_pretrained(ckpt, shard_fn=distributed.shard)
        assert m16.compute_dtype == torch.bfloat16
        assert generate(m16, prompts, 6, stop_token_ids=stops, n=2, seed=rank).response_lens.tolist() == \
            got.response_lens.tolist()
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        distributed.teardown(end_process=True)


def _is_dtensor(t):
    return type(t).__name__ == "DTensor"


def test_uneven_stop_lengths_do_not_deadlock(toy):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_uneven_eos_worker, args=(free_port(), toy["base"], out), nprocs=2, join=True)
        assert sorted(os.listdir(out)) == ["ok0", "ok1"]


def test_rank_range_and_collectives_at_world_size_1(monkeypatch):
    assert not dist.is_initialized()
    assert distributed.rank_range(5) == (0, 5) and distributed.gather_list([1, 2]) == [1, 2]
    assert distributed.global_max(3) == 3 and distributed.grad_scale() == 1
    for ws in range(1, 9):  # every rank gets a non-empty slice; in rank order they tile [0, n)
        for n in range(ws, 30):
            parts = []
            for rank in range(ws):
                monkeypatch.setattr(distributed, "world", lambda: (rank, ws))
                parts.append(distributed.rank_range(n))
            assert all(b > a for a, b in parts) and [a for a, _ in parts] == [0] + [b for _, b in parts[:-1]]
            assert parts[-1][1] == n and max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1
    monkeypatch.setattr(distributed, "world", lambda: (0, 4))
    with pytest.raises(ValueError, match="3 prompts per step cannot be split over 4 ranks"):
        distributed.rank_range(3)


def test_teardown_is_safe_without_a_process_group(tmp_path, monkeypatch):
    assert not dist.is_initialized()
    distributed.teardown()  # plain python: nothing to leave
    # a group some library made in a plain process (a vLLM engine makes a 1-process one): not
    # ours, so the trainer is not "distributed" and teardown leaves it to its owner
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    monkeypatch.setattr(distributed, "_FOREIGN", [None])
    distributed.mark_foreign(was_active=False)
    assert not distributed.active() and distributed.world() == (0, 1)
    distributed.teardown()
    assert dist.is_initialized()
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store2", rank=0, world_size=1)
    assert distributed.active()  # a new group (ours) is not the library's
    closed = []
    distributed.BEFORE_TEARDOWN.append(lambda: closed.append(dist.is_initialized()))
    distributed.teardown()
    assert closed == [True] and not dist.is_initialized()  # engines close first, then the group goes
    distributed.teardown()  # already left: still nothing to do


_RANK_SCRIPT = """
import atexit, sys
sys.path.insert(0, {root!r})
import config, distributed
atexit.register(lambda: print("interpreter shutdown ran"))
def main():
    assert distributed.active()
    print("main ran", flush=False)  # buffered: teardown must flush it before ending the rank
    {body}
config.cli(main)
print("after cli")
"""


@pytest.mark.parametrize("body,code,out", [
    ("pass", 0, "main ran\n"),
    ("raise ValueError('--steps=-1: must be >= 0')", 2, "main ran\n"),
    ("raise RuntimeError('a bug')", 1, "main ran\ninterpreter shutdown ran\n"),
])
def test_a_rank_ends_at_teardown_with_its_status(body, code, out, tmp_path):
    """config.cli under torchrun ends the rank right after leaving the group (os._exit: no
    interpreter shutdown to race gloo's threads, distributed.teardown), with the status of the
    run: 0, or 2 after a one-line error; a bug's traceback keeps the normal exit."""
    port = free_port()
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONUNBUFFERED", None)  # stdout to a pipe is then block-buffered: the flush is tested
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(root=ROOT, body=body))
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == code, res.stderr[-3000:]
    assert res.stdout == out
    if code == 2:
        assert res.stderr.strip() == "error: --steps=-1: must be >= 0"
    if code == 1:
        assert "Traceback" in res.stderr and "RuntimeError: a bug" in res.stderr
