"""Shared test settings: loopback-only Ray, offline wandb, CPU DeepSpeed, a per-session data cache; and the fixtures
every layer shares: the tiny trained checkpoint (built once per session) and its loaded model."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # must precede `import ray`
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module's tests, restored afterwards (the CI box is shared: one thread is much
    faster than two oversubscribed). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny model of :mod:`raymoe.engine.tiny`, trained for 30 steps on its bundled text, exported as a HF
    checkpoint directory with its tokenizer (built on one torch thread: the CI box is shared)."""
    import torch

    from raymoe.engine.tiny import build_tiny_checkpoint

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_base(tiny_ckpt):
    """``(model, tokenizer, eos_token_id)`` of :func:`tiny_ckpt`, loaded once; tests deep-copy the model."""
    from raymoe.engine import LLMEngine

    eng = LLMEngine.from_pretrained(tiny_ckpt)
    return eng.model, eng.tokenizer, eng.eos_token_id


@pytest.fixture
def tiny_mla_paged():
    """``(model, mla, cache, block tables)``: a tiny-preset model (vocab 256, seed 0), its first MLA, and a one-layer
    paged latent cache (blocks of 4 tokens) holding three sequences of 6, 11 and 3 random latents."""
    import torch

    from raymoe.config import ModelConfig
    from raymoe.engine.paged import PagedLatentCache
    from raymoe.model import DeepSeekV3

    torch.manual_seed(0)
    m = DeepSeekV3(ModelConfig.preset("tiny").replace(vocab_size=256)).eval()
    mla = m.layers[0].self_attn
    c = PagedLatentCache(num_layers=1, num_blocks=16, block_size=4, values_per_token=mla.kv_lora_rank + mla.rope_dim)
    tables: list[list[int]] = [[], [], []]
    for bt, n in zip(tables, (6, 11, 3)):
        assert c.ensure(bt, n)
    c.buf.normal_()
    return m, mla, c, tables
