"""Memory of a training step, by construction (no RSS thresholds, which depend on the machine):
the update never makes a [tokens x vocab] tensor, and the gradients do not outlive the step."""
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vocab_kernels as kernels
import mopd
from model import ModelConfig, Transformer
from mopd import pg_update
from train_utils import clip_and_step, return_freed_memory

V, H, CHUNK = 1024, 16, 8
CFG = SimpleNamespace(temperature=1.0, ratio_mode="clip", eps_low=0.2, eps_high=0.28, loss_agg="token-mean",
                      max_new_tokens=32)


class LargestTensor(TorchDispatchMode):
    """The largest storage any op returns (forward and backward: the autograd engine runs
    under the same mode), and the names of the ops that ran."""
    def __init__(self):
        super().__init__()
        self.bytes, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def _model_and_batch():
    cfg = ModelConfig(arch="qwen3", vocab_size=V, hidden_size=H, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    model = Transformer(cfg).init_weights(seed=0).train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (4, 40), generator=g)  # 8 prompt + 32 response tokens per row
    mask = torch.zeros(4, 39, dtype=torch.bool)
    mask[:, 7:] = True
    batch = {"tokens": tokens, "mask": mask, "old_logp": torch.full((4, 39), -7.0)}
    return model, batch


def _largest_in_update(model, batch):
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with LargestTensor() as seen:
        pg_update(model, batch, lambda r, logp, w: adv[r, None].expand(-1, w), CFG, micro_batch=4)
    return seen


def test_pg_update_never_makes_token_by_vocab_logits(monkeypatch):
    """The policy's log-probs go through vocab_kernels.py a chunk of tokens at a time: no tensor of
    the update (forward, loss or backward) is larger than one chunk's logits or one weight-sized
    gradient, while the micro-batch's logits would be 8x that (128 response tokens x V)."""
    monkeypatch.setattr(kernels, "auto_chunk_size", lambda *a, **k: CHUNK)
    model, batch = _model_and_batch()
    logits_bytes = int(batch["mask"].sum()) * V * 4
    seen = _largest_in_update(model, batch)
    assert "embedding_dense_backward" in seen.ops  # the backward ran under the probe too
    assert seen.bytes <= max(CHUNK * V, V * H) * 4 <= logits_bytes / 8
    # the probe catches the regression: the plain log_softmax over the vocabulary
    def naive(m, tok, mask, terms, T=1.0):
        lp = kernels.token_logprobs_ref(m(tok[:, :-1], return_hidden=True), m.lm_head_weight, tok[:, 1:], T, mask)
        return terms(lp).sum(), lp.detach()
    monkeypatch.setattr(mopd, "policy_loss", naive)
    assert _largest_in_update(model, batch).bytes >= logits_bytes


def test_clip_and_step_frees_the_gradients():
    """After the optimiser step no gradient is kept: the next rollout, eval and checkpoint save
    run without a model-sized buffer of dead gradients."""
    model, batch = _model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    _largest_in_update(model, batch)
    assert all(p.grad is not None for p in model.parameters())
    norm = clip_and_step(model, opt, 1.0)
    assert norm > 0 and all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it did step


def test_return_freed_memory_is_harmless():
    """glibc's malloc_trim (a no-op returning False elsewhere); calling it twice is fine."""
    import platform
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert return_freed_memory() is on_glibc and return_freed_memory() is on_glibc
