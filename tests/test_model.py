"""model.py against transformers' own implementation, on tiny random checkpoints built offline.

Logits are compared norm-wise (|ours - truth| / |truth|) with transformers' model in float64 as
the truth, and the bound follows from what transformers' own model achieves in the same
precision on the same input: ours may miss the truth by twice as much, plus 16 fp32 roundings
(fp32: ~2.5e-6, bf16: ~3e-2 for these 2-layer models). A fixed bound would depend on the model's
size and depth and on the BLAS; a missed term or a wrong scale lands far outside.
"""
import json
import math
import os
import shutil

import pytest
import torch
from conftest import hf_class

from model import KVCache, ModelConfig, Transformer

ARCHS = ["qwen3", "qwen3_moe", "llama"]
U32 = 2**-24  # fp32 unit roundoff


def rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def hf_truth(path, arch):
    """transformers' model in float64: the truth (MoE experts in eager loops: grouped_mm has no
    fp64). Its RMSNorm and router still compute in fp32, so it is good to ~2e-7, well below the
    ~1e-6 of a whole fp32 forward."""
    return hf_class(arch).from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()


def assert_as_accurate(ours, plain, truth, what=""):
    """ours within 2x the error of `plain` (another implementation, same precision, same input)
    of the float64 truth, + 16 fp32 roundings for when plain happens to be the luckier one."""
    err, bound = rel_err(ours, truth), 2 * rel_err(plain, truth) + 16 * U32
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (plain: {rel_err(plain, truth):.3g})"


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(hf_dirs, arch):
    hf = hf_class(arch).from_pretrained(hf_dirs[arch]).eval()
    ours = Transformer.from_pretrained(hf_dirs[arch])
    x = torch.randint(0, 128, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_as_accurate(ours(x), hf(x).logits, hf_truth(hf_dirs[arch], arch)(x).logits, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(hf_dirs, arch):
    from rollout import generate
    hf = hf_class(arch).from_pretrained(hf_dirs[arch]).eval()
    ours = Transformer.from_pretrained(hf_dirs[arch])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (L,), generator=g).tolist() for L in (5, 11, 3)]
    res = generate(ours, prompts, max_new_tokens=32, temperature=0)
    for p, got in zip(prompts, res.response_ids):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert got == ref


@pytest.mark.parametrize("arch", ARCHS)
def test_save_roundtrips_into_transformers(hf_dirs, arch, tmp_path):
    ours = Transformer.from_pretrained(hf_dirs[arch])
    out = ours.save_pretrained(tmp_path / "saved")
    hf = hf_class(arch).from_pretrained(out).eval()
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert_as_accurate(ours(x), hf(x).logits, hf_truth(out, arch)(x).logits, arch)
    # and back into ours, bit for bit
    again = Transformer.from_pretrained(out)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_sharded_save_and_load(hf_dirs, tmp_path):
    ours = Transformer.from_pretrained(hf_dirs["qwen3_moe"])
    out = ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    again = Transformer.from_pretrained(out)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours(x), again(x))


def test_cached_decoding_equals_full_forward(tiny_model, hf_dirs):
    x = torch.randint(0, 128, (3, 40))
    cache = KVCache(tiny_model.config, 3, 64, torch.float32, "cpu")
    with torch.no_grad():
        full = tiny_model(x)
        parts = [tiny_model(x[:, :25], cache=cache)]
        for t in range(25, 40):
            parts.append(tiny_model(x[:, t:t + 1], cache=cache))
        assert_as_accurate(torch.cat(parts, 1), full, hf_truth(hf_dirs["qwen3"], "qwen3")(x).logits)


def test_hidden_states_and_lm_head(tiny_model):
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        h = tiny_model(x, return_hidden=True)
        assert h.shape == (2, 9, 64)
        # the same 64-term dot products, maybe summed in another order: ~sqrt(64) roundings, twice
        assert rel_err(h @ tiny_model.lm_head_weight.t(), tiny_model(x)) <= 2 * math.sqrt(64) * U32


def test_meta_build_then_materialise(hf_dirs):
    cfg = ModelConfig.from_hf(hf_dirs["qwen3_moe"])
    with torch.device("meta"):
        m = Transformer(cfg)
    assert all(p.is_meta for p in m.parameters())
    m.load_hf_weights(hf_dirs["qwen3_moe"])
    assert not any(p.is_meta for p in m.parameters())
    ref = Transformer.from_pretrained(hf_dirs["qwen3_moe"])
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))


def test_moe_aux_loss_and_grad(hf_dirs):
    m = Transformer.from_pretrained(hf_dirs["qwen3_moe"]).train()
    x = torch.randint(0, 128, (2, 16))
    loss = m(x).logsumexp(-1).mean() + m.router_aux_loss()
    loss.backward()
    aux = m.router_aux_loss().item()
    assert aux > 0  # E * sum(frac * prob) >= coef-scaled positive number
    assert m.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    assert m.layers[0].mlp.gate_proj.grad.abs().sum() > 0


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="this torch has no F.grouped_mm")
def test_moe_grouped_matmul_path_equals_expert_loop(hf_dirs, monkeypatch):
    """The CUDA path (one grouped matmul per projection) on the same sorted rows as the CPU
    loop; run here through F.grouped_mm's CPU forward (fp32, no backward on CPU)."""
    from model import MoE
    m = Transformer.from_pretrained(hf_dirs["qwen3_moe"])
    x = torch.randint(0, 128, (3, 17))
    with torch.no_grad():
        monkeypatch.setattr(MoE, "grouped", False)
        want = m(x)
        monkeypatch.setattr(MoE, "grouped", True)
        got = m(x)
        assert_as_accurate(got, want, hf_truth(hf_dirs["qwen3_moe"], "qwen3_moe")(x).logits)


def test_bf16_forward_close(hf_dirs):
    hf = hf_class("qwen3").from_pretrained(hf_dirs["qwen3"], dtype=torch.bfloat16).eval()
    ours = Transformer.from_pretrained(hf_dirs["qwen3"], dtype=torch.bfloat16)
    x = torch.randint(0, 128, (2, 20))
    with torch.no_grad():  # bf16 against bf16: err_plain is transformers' own bf16 error (~2e-2)
        assert_as_accurate(ours(x), hf(x).logits, hf_truth(hf_dirs["qwen3"], "qwen3")(x).logits)


# ---- bad input: clear errors naming the problem ------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_unsupported_architecture_and_rope(hf_dirs):
    d = json.load(open(os.path.join(hf_dirs["qwen3"], "config.json")))
    with pytest.raises(ValueError, match="unsupported architectures=\\['GPT2LMHeadModel'\\]"):
        ModelConfig.from_hf({**d, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'longrope'"):
        ModelConfig.from_hf({**d, "rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e6}})


@pytest.mark.parametrize("extra", [{}, {"attention_factor": 1.3, "beta_fast": 16, "truncate": False}])
def test_yarn_matches_transformers(tmp_path, extra):
    """YaRN (Qwen3's route past 40,960 positions) against transformers, on sequences 3x longer than
    the original context, where the interpolation and the attention factor both act."""
    from conftest import hf_config
    cfg = hf_config("qwen3")
    cfg.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                           "rope_theta": 10000.0, **extra}
    torch.manual_seed(0)
    hf = hf_class("qwen3")(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(str(tmp_path))
    assert ours.config.rope_scaling["rope_type"] == "yarn"
    x = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(1))
    truth = hf_truth(str(tmp_path), "qwen3")
    with torch.no_grad():
        assert_as_accurate(ours(x), hf(x).logits, truth(x).logits, "yarn")
        plain = Transformer(ModelConfig.from_hf({**ours.config.to_hf(), "rope_parameters": {"rope_theta": 10000.0}}))
        plain.load_state_dict(ours.state_dict())
        assert rel_err(plain(x), truth(x).logits) > 1e-3  # YaRN changes these logits: the test can see it


def test_missing_key_and_shape_mismatch(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy(hf_dirs["qwen3"], tmp_path / "m")
    sd = load_file(os.path.join(d, "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, os.path.join(d, "model.safetensors"))
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        Transformer.from_pretrained(d)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape \(3, 3\)"):
        Transformer.from_pretrained(d)


def test_truncated_and_missing_shard(hf_dirs, tmp_path):
    ours = Transformer.from_pretrained(hf_dirs["qwen3_moe"])
    d = ours.save_pretrained(tmp_path / "s", max_shard_bytes=100_000)
    shard = os.path.join(d, sorted(f for f in os.listdir(d) if f.startswith("model-"))[1])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=os.path.basename(shard)):
        Transformer.from_pretrained(d)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=os.path.basename(shard) + ": shard listed in the index is missing"):
        Transformer.from_pretrained(d)


def test_save_is_atomic(hf_dirs, tmp_path, monkeypatch):
    """A crash mid-save leaves the previous checkpoint intact and no half-written directory."""
    import safetensors.torch
    ours = Transformer.from_pretrained(hf_dirs["qwen3"])
    target = tmp_path / "ckpt"
    ours.save_pretrained(target)
    before = open(target / "model.safetensors", "rb").read()

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with torch.no_grad():
        ours.norm.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        ours.save_pretrained(target)
    assert open(target / "model.safetensors", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    with torch.no_grad():
        ours.norm.weight.sub_(1.0)


def test_tokenizer_files_copied(hf_dirs, tmp_path):
    d = _copy(hf_dirs["qwen3"], tmp_path / "src")
    open(os.path.join(d, "tokenizer_config.json"), "w").write("{}")
    m = Transformer.from_pretrained(d)
    out = m.save_pretrained(tmp_path / "dst")
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))


def test_cached_attention_takes_a_non_contiguous_sdpa_output(tiny_model, monkeypatch):
    """CUDA's memory-efficient SDPA (float mask) can return a non-contiguous output; the cached
    attention must reshape it, not view it. Faked here: the same values, in another layout."""
    import torch.nn.functional as F
    import model as M
    from rollout import generate
    ref = generate(tiny_model, [[5, 6, 7], [8, 9]], max_new_tokens=6, seed=0)
    sdpa = F.scaled_dot_product_attention

    def strided(q, k, v, **kw):
        y = sdpa(q, k, v, **kw)
        return y.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, d] values, [B, T, H, d] memory
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", strided)
    got = generate(tiny_model, [[5, 6, 7], [8, 9]], max_new_tokens=6, seed=0)
    assert got.response_ids == ref.response_ids
    torch.testing.assert_close(got.logprobs, ref.logprobs)
