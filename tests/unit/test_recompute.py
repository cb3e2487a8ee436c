"""train.recompute: selective (RMSNorm outputs + MLA up-projections) and full-block recompute give the gradients of
no recompute (same kernels: equal to 1e-6 relative; in practice bitwise), count routing once, and selective keeps
exactly the bytes it should not keep out of the saved tensors."""
from __future__ import annotations

import pytest
import torch

from raymoe.config import ModelConfig
from raymoe.model.recompute import SavedAsRecipe, set_recompute
from raymoe.train import parallelize as par

TINY = ModelConfig.preset("tiny").replace(seq_aux_loss_alpha=1e-3)


def _batch(B: int = 2, T: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, TINY.vocab_size, (B, T), generator=g)
    return x, torch.roll(x, -1, 1)


def _grads(mode: str, autocast: bool = False, attn_impl: str | None = None):
    m = par.build_model(TINY, 3)
    set_recompute(m, mode)
    if attn_impl is not None:
        for mod in m.modules():
            if hasattr(mod, "attn_impl"):
                mod.attn_impl = attn_impl
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(x, labels=y)
    out.loss.backward()
    return out, {n: p.grad for n, p in m.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_loss_and_gradients(mode, autocast) -> None:
    ref_out, ref = _grads("none", autocast)
    out, got = _grads(mode, autocast)
    assert torch.equal(out.loss, ref_out.loss)
    assert torch.equal(out.expert_counts, ref_out.expert_counts)  # routing counted once, not again in the recompute
    assert len(out.mtp_losses) == 1 and out.aux_loss is not None
    assert set(got) == set(ref)
    for n in ref:
        assert ref[n] is not None and _rel(got[n], ref[n]) <= 1e-6, (mode, n, _rel(got[n], ref[n]))


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_pad_v"])
def test_selective_recompute_with_sdpa_attention(impl) -> None:
    _, ref = _grads("none", attn_impl=impl)
    _, got = _grads("selective", attn_impl=impl)
    assert all(_rel(got[n], ref[n]) <= 1e-6 for n in ref)


def _saved_bytes(mode: str, B: int, T: int, autocast: bool = False) -> int:
    """Bytes of the distinct storages autograd saves for backward (parameters excluded), via saved-tensor hooks."""
    m = par.build_model(TINY, 3)
    set_recompute(m, mode)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved: list[torch.Tensor] = []  # held until counted: no storage is freed and its address reused meanwhile

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x, y = _batch(B, T)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = m(x, labels=y).loss
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    loss.backward()
    return sum(n for ptr, n in sizes.items() if ptr not in params)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_selective_drops_exactly_the_norm_outputs_and_up_projections(autocast) -> None:
    B, T = 2, 24
    c = TINY
    tokens = B * (T * c.num_hidden_layers + (T - 1) * c.num_nextn_predict_layers)  # the MTP block sees T-1
    per_token = (2 * c.hidden_size + c.q_lora_rank + c.kv_lora_rank  # four RMSNorm outputs feeding GEMMs
                 + c.num_attention_heads * (2 * c.qk_head_dim + c.v_head_dim))  # per-head q, k, v
    if not autocast:
        expected = 4 * tokens * per_token  # fp32
    else:  # bf16 copies that autocast made for the GEMMs; an MoE block's post-attention norm output is cast twice
        moe_tokens = B * (T * (c.num_hidden_layers - c.first_k_dense_replace) + (T - 1) * c.num_nextn_predict_layers)
        expected = 2 * (tokens * per_token + moe_tokens * c.hidden_size)
    none, sel = _saved_bytes("none", B, T, autocast), _saved_bytes("selective", B, T, autocast)
    assert none - sel == expected, (none, sel, expected)


def test_saved_as_recipe_rebuilds_views_and_passes_the_rest_to_outer_hooks() -> None:
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(6, 3, requires_grad=True)
    outer: list[int] = []
    calls = []

    def rebuild():
        calls.append(1)
        return [torch.tanh(x)]

    def outer_pack(t):
        outer.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(outer_pack, lambda t: t):
        h = torch.tanh(x)  # saves its output h: outside the recipe, the outer hook sees it
        with SavedAsRecipe([h], rebuild):
            y = (h[1:] @ w[:, :2]).sum() + (h @ w).sum()  # saves the view h[1:], w[:, :2], h, w
    assert outer == [24, 12, 18]  # h by tanh (outside), then only the views of w: h and h[1:] became tokens
    y.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    assert len(calls) == 1  # rebuilt once for both saved uses
    x.grad = w.grad = None
    h = torch.tanh(x)
    ((h[1:] @ w[:, :2]).sum() + (h @ w).sum()).backward()
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)


def test_unknown_mode_is_refused() -> None:
    from raymoe.config import ConfigError, TrainConfig

    with pytest.raises(ValueError, match="allowed: none, selective, full"):
        set_recompute(par.build_model(TINY, 0, device="meta"), "some")
    with pytest.raises(ConfigError, match="train.recompute='some'; allowed: none, selective, full"):
        TrainConfig(recompute="some")


def test_recompute_under_fp8_gives_the_same_gradients() -> None:
    """Block-scaled FP8 GEMMs (bf16 autocast): the recomputed inputs quantize to the same FP8 values."""
    from raymoe.fp8 import convert_to_fp8
    from raymoe.fp8.config import FP8Config

    x, y = _batch(2, 16)
    got = {}
    for mode in ("none", "selective", "full"):
        m = par.build_model(TINY, 3)
        set_recompute(m, mode)
        convert_to_fp8(m, config=FP8Config(enabled=True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, labels=y)
        out.loss.backward()
        got[mode] = (out.loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    for mode in ("selective", "full"):
        assert torch.equal(got[mode][0], got["none"][0])
        for n, g in got["none"][1].items():
            assert _rel(got[mode][1][n], g) <= 1e-6, (mode, n)
