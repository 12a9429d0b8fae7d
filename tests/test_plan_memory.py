"""
The scale plan and the FSDP2 entry point (distributed.py):
- the Qwen3-30B-A3B + 3 teachers preset, sharded for real (on the meta device, over torch's
  fake 8-rank process group): the plan's bytes agree with what rank 0 owns, and it fits 75 GiB;
- the activation formula agrees with the tensors autograd actually saves for one layer;
- distributed.shard at world size 1 (gloo) and 2 (two processes, uneven shards) computes
  what the unsharded model computes: logits, gradients, the fused head outside forward.
Every test that joins a process group destroys it, so other tests are unaffected.
"""
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, join_ranks

import distributed
import vocab_kernels as kernels
import plan_memory
from model import ModelConfig, Transformer, rope_cos_sin
from test_model import assert_as_accurate  # ours within 2x a plain fp32 run's error of the fp64 truth

GiB = 2**30


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_qwen3_30b_a3b_dry_run_matches_plan_and_fits():
    cfg = plan_memory.Config()  # the chosen preset: 8 x H100, 2048 x 1 rollouts, 64k tokens per micro-batch
    mc = plan_memory.model_config(cfg)
    assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.num_experts,
            mc.num_experts_per_tok, mc.moe_intermediate_size, mc.vocab_size) == \
        (2048, 48, 32, 4, 128, 128, 8, 768, 151936)
    rows = plan_memory.plan(cfg, mc)
    s = plan_memory.summarize(cfg, rows, mc)
    assert s["fits"] and s["peak"] <= 75 * GiB
    assert max(s["phases"].values()) <= 75 * GiB

    counts = plan_memory.dry_run(cfg, mc)  # real fully_shard on meta, fake 8-rank group
    by = {r.key: r.bytes for r in rows}
    for key, name in [("params", "student params"), ("grads", "student grads"), ("adam", "AdamW states"),
                      ("teachers", "teachers")]:
        assert abs(by[key] - counts[name]) <= 0.05 * counts[name], (name, by[key], counts[name])
    assert counts["student params"] / 4 == pytest.approx(30.53e9 / 8, rel=1e-3)  # 30.5B params, fp32 shards
    assert counts["local experts"] == 128 // 8  # dim-0 sharding of stacked experts = expert parallelism
    assert counts["rss growth MiB"] < 1024      # nothing real was allocated (fp32 student alone: 114 GiB)
    assert not dist.is_initialized()


def test_the_vllm_rollout_path_in_the_plan():
    """The preset's rollouts run on vLLM engines of engine_tp GPUs: their bf16 weights split TP ways
    and alive only while rolling out (sleep mode), the sync's transient is one gathered tensor
    (the largest: the untied 151,936 x 2048 embedding), the KV cache per GPU holds 1/TP of each
    token's keys and values. The native path (FSDP all-gathers every layer at every decode step)
    projects a decode > 10x slower: why the preset does not use it."""
    import dataclasses
    cfg = plan_memory.Config()
    mc = plan_memory.model_config(cfg)
    pc = plan_memory.param_counts(mc, cfg.world_size)
    rows = plan_memory.plan(cfg, mc)
    by = {r.key: r for r in rows}
    assert cfg.rollout_engine == "vllm" and cfg.engine_tp == 4
    assert by["rollout"].bytes == 2 * pc["total"] / 4 and by["rollout"].phases == "R"
    assert by["sync"].bytes == 6 * 151936 * 2048 and by["kv"].phases == "R"
    s = plan_memory.summarize(cfg, rows, mc)
    assert s["fits"] and s["decode_rows"] == int(s["kv"] // (48 * 2 * 4 * 128 * 2 / 4 * (1024 + 8192)))
    native = dataclasses.replace(cfg, rollout_engine="native")
    nrows = plan_memory.plan(native, mc)
    t_v = plan_memory.throughput(cfg, mc, s["decode_rows"])
    t_n = plan_memory.throughput(native, mc, plan_memory.summarize(native, nrows, mc)["decode_rows"])
    assert t_n["phases"]["decode"] > 10 * t_v["phases"]["decode"]
    assert "weight sync" in t_v["phases"] and "weight sync" not in t_n["phases"]


def test_projection_at_the_reference_lengths_changes_only_the_lengths():
    """The like-for-like projection (plan_memory.at_reference_lengths): the preset's own path
    (GPUs, engines, offload, teachers, batch) at NeMo-RL's sequence lengths, the same tokens per
    micro-batch; its KV cache then holds rows of the shorter length, and each token is cheaper."""
    import dataclasses
    cfg = plan_memory.Config()
    mc = plan_memory.model_config(cfg)
    short = plan_memory.at_reference_lengths(cfg)
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(short, f.name)}
    assert changed == {"seq_len", "prompt_mean", "response_mean", "micro_batch"}
    assert short.micro_batch * short.seq_len == cfg.micro_batch * cfg.seq_len
    assert short.prompt_mean + short.response_mean == plan_memory.NEMO_RL["mean_len"]
    s_long = plan_memory.summarize(cfg, plan_memory.plan(cfg, mc), mc)
    s_short = plan_memory.summarize(short, plan_memory.plan(short, mc), mc)
    assert s_short["fits"] and s_short["decode_rows"] == int(s_short["kv"] // (48 * 2 * 4 * 128 * 2 / 4 * 3154))
    t_long = plan_memory.throughput(cfg, mc, s_long["decode_rows"])
    t_short = plan_memory.throughput(short, mc, s_short["decode_rows"])
    assert t_short["tokens_per_s_gpu"] > 1.5 * t_long["tokens_per_s_gpu"]


def test_without_offload_the_preset_cannot_fit():
    # student fp32 params + grads + AdamW (16 B/param) + 3 bf16 teachers over 8 ranks: 78 GiB of
    # state before any activation, which is why the preset offloads the student's optimizer
    cfg = plan_memory.Config(optimizer_offload=False, teacher_offload=False)
    rows = plan_memory.plan(cfg)
    state = sum(r.bytes for r in rows if r.key in ("params", "grads", "adam", "teachers"))
    assert state > 75 * GiB
    assert not plan_memory.summarize(cfg, rows, plan_memory.model_config(cfg))["fits"]


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3"])
def test_activation_formula_matches_saved_tensors(arch):
    """layer_activation_bytes == the bytes autograd saves for one bf16 Block (CPU flash SDPA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = ModelConfig(arch=arch, vocab_size=64, hidden_size=128, intermediate_size=192, num_layers=1,
                      num_heads=8, num_kv_heads=2, head_dim=16, num_experts=8 if arch == "qwen3_moe" else 0,
                      num_experts_per_tok=2, moe_intermediate_size=48)
    model = Transformer(cfg).init_weights(seed=0).to(torch.bfloat16)
    T = 256
    x = torch.randn(1, T, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(model._inv_freq, torch.arange(T)[None], torch.bfloat16)
    skip = {t.untyped_storage().data_ptr() for t in [x, cos, sin, *model.parameters()]}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin)
    measured = sum(saved.values()) / T
    # on CPU SDPA repeats K/V to every head (flash-attn on CUDA does not: kv_repeat=False there)
    assert measured == pytest.approx(plan_memory.layer_activation_bytes(cfg, 0, kv_repeat=True), rel=0.02)


def test_init_distributed_is_a_noop_at_world_size_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    info = distributed.init_distributed(timeout_s=10)
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True) and not dist.is_initialized()


def _tiny(arch, tie, vocab=128, experts=8):
    return ModelConfig(arch=arch, vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=tie,
                       num_experts=experts if arch == "qwen3_moe" else 0, num_experts_per_tok=2,
                       moe_intermediate_size=32)


def _copy(ref, dtype=torch.float32):
    m = Transformer(ref.config)
    m.load_state_dict(ref.state_dict())
    m = m.to(dtype)
    if ref.config.tie_word_embeddings:
        m.lm_head.weight = m.embed_tokens.weight
    return m


def _loss(model, ids):
    """The way the trainers use the model: hidden states, then the fused head outside forward."""
    h = model(ids[:, :-1], return_hidden=True)
    return -kernels.token_logprobs(h, model.lm_head_weight, ids[:, 1:]).mean()


@pytest.mark.parametrize("arch,tie", [("qwen3", True), ("qwen3_moe", False)])
def test_shard_world_size_1_matches_unsharded(arch, tie, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ref = Transformer(_tiny(arch, tie)).init_weights(seed=0)
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        want_logits = ref(ids)
        _loss(ref, ids).backward()
        truth = _copy(ref, torch.float64)  # the sharded gradients' error bound: see assert_as_accurate
        _loss(truth, ids).backward()
        for kw in [dict(mp_policy=None), dict(mp_policy=None, activation_checkpointing=True)]:
            m = distributed.shard(_copy(ref), **kw)
            assert type(m.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
            assert list(m.state_dict()) == list(ref.state_dict())  # HF names survive sharding and AC
            assert (m.lm_head.weight is m.embed_tokens.weight) == tie
            assert torch.equal(m(ids), want_logits)
            _loss(m, ids).backward()  # lm_head used after forward: the root stays gathered
            for (name, p), q, t in zip(ref.named_parameters(), m.parameters(), truth.parameters()):
                assert_as_accurate(q.grad.full_tensor(), p.grad, t.grad, name)
        # default policy: bf16 compute == the unsharded model cast to bf16
        m16 = distributed.shard(_copy(ref))
        ref16 = _copy(ref).to(torch.bfloat16)
        if tie:
            ref16.lm_head.weight = ref16.embed_tokens.weight
        torch.testing.assert_close(m16(ids), ref16(ids), rtol=0, atol=0)
        with torch.no_grad():  # rollout.py's path: forward to hidden, then model.lm_head
            h = m16(ids, return_hidden=True)
            torch.testing.assert_close(m16.lm_head(h[:, -1]), ref16(ids)[:, -1], rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def _two_rank_worker(rank, port, out_dir):
    """One of two torchrun-like ranks: env vars, init_distributed, shard, compare with unsharded."""
    info = join_ranks(rank, port)
    try:
        assert dist.get_world_size() == 2 and info.rank == rank
        cfg = _tiny("qwen3_moe", tie=False, vocab=97, experts=3)  # odd sizes: uneven, padded shards
        ref = Transformer(cfg).init_weights(seed=0)
        truth = _copy(ref, torch.float64)  # the error bounds: see assert_as_accurate
        batches = [torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(r)) for r in range(2)]
        for b in batches:  # data parallel: the gradient is the mean over both ranks' batches
            (_loss(ref, b) / 2).backward()
            (_loss(truth, b) / 2).backward()
        m = distributed.shard(_copy(ref), mp_policy=None)
        assert m.layers[0].mlp.gate_proj.to_local().shape[0] == (2 if rank == 0 else 1)
        with torch.no_grad():
            assert_as_accurate(m(batches[rank]), ref(batches[rank]), truth(batches[rank]), "logits")
        _loss(m, batches[rank]).backward()
        for (name, p), q, t in zip(ref.named_parameters(), m.parameters(), truth.parameters()):
            assert_as_accurate(q.grad.full_tensor(), p.grad, t.grad, name)
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        distributed.teardown(end_process=True)


def test_shard_two_ranks_matches_unsharded():
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_two_rank_worker, args=(free_port(), out), nprocs=2, join=True)
        assert sorted(os.listdir(out)) == ["ok0", "ok1"]
