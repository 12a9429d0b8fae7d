"""Shared test fixtures: tiny random Hugging Face checkpoints built offline, and our loader."""
import atexit
import contextlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the vLLM tier (tests/test_vllm.py) runs in its own venv (requirements-vllm.txt, .ci/run); the
# main suite, where vllm is not installed, does not collect it
import importlib.util  # noqa: E402
collect_ignore = [] if importlib.util.find_spec("vllm") else ["test_vllm.py"]

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2)  # sharper than the default, so greedy argmax has no near-ties


def hf_config(arch):
    """A tiny transformers config per family, exercising each family's quirks."""
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig
    if arch == "qwen3":  # head_dim independent of hidden/heads, GQA, tied embeddings
        return Qwen3Config(head_dim=24, tie_word_embeddings=True, **COMMON)
    if arch == "qwen3_moe":  # 8 experts, top-2, renormalised, one dense layer, untied
        return Qwen3MoeConfig(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                              norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False, **COMMON)
    if arch == "llama":  # llama3 RoPE scaling, untied, biased attention
        return LlamaConfig(tie_word_embeddings=False, attention_bias=True,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                           **COMMON)
    raise ValueError(arch)


def hf_class(arch):
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM
    return {"qwen3": Qwen3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM, "llama": LlamaForCausalLM}[arch]


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """arch -> directory of a random transformers model saved with save_pretrained."""
    out = {}
    for arch in ("qwen3", "qwen3_moe", "llama"):
        torch.manual_seed(0)
        model = hf_class(arch)(hf_config(arch)).eval()
        d = str(tmp_path_factory.mktemp(f"hf_{arch}"))
        model.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def tiny_model(hf_dirs):
    """Our Qwen3 model loaded from the tiny random checkpoint (fp32, CPU)."""
    from model import Transformer
    return Transformer.from_pretrained(hf_dirs["qwen3"])


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A tiny S0 and two 'teachers' (S0 with perturbed weights) for domains rev and sort."""
    return build_toy(tmp_path_factory.mktemp("mopd"))


def build_toy(root, sft_args=(), noise=0.05):
    """{"base": S0, "rev": teacher, "sort": teacher} under root: the tiny preset's S0 (10 SFT steps,
    sft_args appended) and, per domain, S0 with independent weight noise of std `noise`."""
    import train_sft
    from model import Transformer
    base = str(root / "base")
    train_sft.main(["--preset=tiny", f"--out_dir={base}", "--domains=rev,sort", "--steps=10", *sft_args])
    out = {"base": base}
    for i, d in enumerate(("rev", "sort")):
        m = Transformer.from_pretrained(base)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
        out[d] = m.save_pretrained(root / f"teacher_{d}")
    return out


# ---- two torchrun-like ranks inside pytest (torch.multiprocessing.spawn) ------------------

_served = []  # the rendezvous store of the latest spawned group: see free_port()
atexit.register(_served.clear)  # its server thread stopped while the interpreter is whole


def free_port():
    """The rendezvous port for the next group of spawned ranks (join_ranks), *held*: this (pytest)
    process serves a TCPStore there on a port the OS picked, and keeps it until the next call.
    The ranks join it as clients, as torchrun's ranks join their agent's store.
    Two races this removes. (1) A port found free by bind-then-close is free only until the
    ranks bind it seconds later (spawned interpreters import torch first): any process on the
    machine (another test run, a gloo listener, an outgoing connection) can take it meanwhile.
    (2) Without an outside store, rank 0 serves it: every rank's process group (and so the
    store, which FSDP-sharded modules keep alive past destroy_process_group) then depends on
    rank 0's process, whose server thread is torn down only at its interpreter's exit, possibly
    while the other rank is still leaving the group. The name stays free_port for the callers
    (tests/test_plan_memory.py)."""
    import torch.distributed as dist
    _served[:] = [dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)]
    return _served[0].port


def join_ranks(rank, port, world=2):
    """In a spawned worker: torchrun's environment (a client of the store free_port() serves, as
    torchrun's agent store), one thread, then the project's own init_distributed (gloo, a 60 s
    timeout so that a hang fails the test instead of CI)."""
    import distributed
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    return distributed.init_distributed(timeout_s=60)


@pytest.fixture
def one_thread():
    """Tiny models: with 2 intra-op threads on a loaded 2-core machine every small MoE op
    (index_add_) waits on the other thread, ~100x slower. Restored after the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def killed_after_step(step):
    """The training run inside this block dies (KeyboardInterrupt) right after its checkpoint
    of `step` is complete, like a job killed between two steps."""
    import checkpoint
    save = checkpoint.save_checkpoint

    def save_then_die(path, model, tokenizer_dir, state, opt=None):
        save(path, model, tokenizer_dir, state, opt)
        if state["step"] == step:
            raise KeyboardInterrupt
    checkpoint.save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        checkpoint.save_checkpoint = save
