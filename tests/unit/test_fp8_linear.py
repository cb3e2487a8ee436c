"""FP8Linear autograd (Fprop/Dgrad/Wgrad), FP8 input caching, deferred Wgrad, conversion filter, NaN guard."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raymoe.fp8 import (
    E4M3,
    FP8Config,
    FP8Guard,
    FP8Linear,
    WeightGradStore,
    calc_diff,
    convert_to_fp8,
    fp8_layers,
)

# Tolerances: E4M3 rounding gives calc_diff ≈ 7e-4 per quantized operand pair (docs/fp8.md §3). Dgrad/Wgrad see
# one more quantized operand than the fp32 reference path, so 2e-3 is the bound used for every GEMM output here.
TOL = 2e-3


def _pair(in_f: int = 300, out_f: int = 200, bias: bool = True, **cfg) -> tuple[nn.Linear, FP8Linear]:
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias)
    fp8 = FP8Linear.from_linear(copy.deepcopy(ref), FP8Config(enabled=True, **cfg), "lin")
    return ref, fp8


def _grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    out = (y.detach(), x.grad, layer.weight.grad)
    return out + ((layer.bias.grad,) if layer.bias is not None else ())


@pytest.mark.parametrize("cfg", [{}, {"pow2_scales": True}, {"fp8_wgrad": False}])
def test_fprop_dgrad_wgrad_match_fp32_reference(cfg: dict) -> None:
    ref, fp8 = _pair(**cfg)
    torch.manual_seed(1)
    x = torch.randn(4, 50, 300)
    g = torch.randn(4, 50, 200)
    r = _grads(ref, x, g)
    f = _grads(fp8, x, g)
    names = ("y", "dx", "dW", "db")
    for name, a, b in zip(names, f, r):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert calc_diff(a, b) < TOL, (name, calc_diff(a, b))


def test_bf16_inputs_give_bf16_outputs() -> None:
    ref, fp8 = _pair(256, 256, bias=False)
    fp8 = fp8.to(torch.bfloat16)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x)
    y.float().pow(2).sum().backward()
    assert y.dtype == x.grad.dtype == fp8.weight.grad.dtype == torch.bfloat16
    assert calc_diff(y, ref(x.float().detach())) < TOL


def test_input_is_cached_in_fp8() -> None:
    _, fp8 = _pair(256, 128, bias=False)
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    x = torch.randn(32, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fp8(x)
    # saved: x as E4M3, its fp32 1×128 scales, and the weight parameter itself (never a high-precision x copy)
    assert saved == [E4M3, torch.float32, torch.float32]


def test_weight_quantized_once_per_version() -> None:
    _, fp8 = _pair(256, 128, bias=False)
    calls = {"n": 0}
    real = fp8._ops(torch.device("cpu")).blocks

    def counting(w):
        calls["n"] += 1
        return real(w)

    fp8._ops(torch.device("cpu")).blocks = counting
    x = torch.randn(8, 256, requires_grad=True)
    for _ in range(3):  # three micro-batches: Fprop + Dgrad each, one weight quantization
        fp8(x).sum().backward()
    assert calls["n"] == 1
    with torch.no_grad():
        fp8.weight.add_(0.01)  # optimizer step
    fp8(x).sum().backward()
    assert calls["n"] == 2


def test_weight_cache_sees_updates_that_bump_no_version() -> None:
    """DeepSpeed writes updated weights through flat buffers / ``.data``: no version bump. Any optimizer step (the
    global post-step hook) or ``invalidate_weight_caches`` must still refresh the FP8 weight."""
    from raymoe.fp8 import invalidate_weight_caches

    _, fp8 = _pair(256, 128, bias=False)
    x = torch.randn(8, 256)
    y0 = fp8(x)
    fp8.weight.data.mul_(2.0)  # bypasses the parameter's version counter
    torch.testing.assert_close(fp8(x), y0)  # stale by design until told
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1).step()  # some optimizer stepped somewhere
    torch.testing.assert_close(fp8(x), 2 * y0, rtol=2e-2, atol=2e-2)
    fp8.weight.data.mul_(0.5)
    invalidate_weight_caches(fp8)
    torch.testing.assert_close(fp8(x), y0, rtol=2e-2, atol=2e-2)


def test_deferred_wgrad_is_bit_identical_and_fires_hooks() -> None:
    ref, fp8 = _pair()
    imm = copy.deepcopy(fp8)
    store = WeightGradStore()
    fp8.wgrad_store = store
    torch.manual_seed(2)
    xs = [torch.randn(16, 300) for _ in range(2)]
    gs = [torch.randn(16, 200) for _ in range(2)]
    dx_imm = []
    for x, g in zip(xs, gs):
        xi = x.clone().requires_grad_(True)
        imm(xi).backward(g)
        dx_imm.append(xi.grad)
    fired: list[int] = []
    fp8.weight.register_post_accumulate_grad_hook(lambda p: fired.append(int(p.grad is not None)))
    for i, (x, g) in enumerate(zip(xs, gs)):
        xd = x.clone().requires_grad_(True)
        with store.defer():  # "Bi": input grad now
            fp8(xd).backward(g)
        assert torch.equal(xd.grad, dx_imm[i])
    assert fp8.weight.grad is None and len(store) == 2
    store.pop()  # "W" of micro-batch 0
    store.pop()  # "W" of micro-batch 1
    assert torch.equal(fp8.weight.grad, imm.weight.grad) and torch.equal(fp8.bias.grad, imm.bias.grad)
    assert 1 in fired  # the deferred accumulation went through AccumulateGrad (DeepSpeed's hooks see it)
    with pytest.raises(RuntimeError, match="empty"):
        store.pop()


class _Toy(nn.Module):
    """Names as in the DeepSeek-V3 model: embed_tokens, router, gate (HF router name), gate_proj, lm_head, norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 128)
        self.norm = nn.LayerNorm(128)
        self.router = nn.Linear(128, 16, bias=False)
        self.gate = nn.Linear(128, 16, bias=False)
        self.gate_proj = nn.Linear(128, 256, bias=False)
        self.up_proj = nn.Linear(128, 256, bias=False)
        self.down_proj = nn.Linear(256, 128, bias=False)
        self.lm_head = nn.Linear(128, 100, bias=False)
        self.tiny = nn.Linear(128, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed_tokens(ids))
        h = h + 0 * (self.router(h).sum() + self.gate(h).sum() + self.tiny(h).sum())
        h = h + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.lm_head(h)


def _assert_no_fp8_outside_fp8linear(model: nn.Module, run) -> None:
    seen: list[str] = []

    def hook(mod, args, out):
        for t in list(args) + [out]:
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                seen.append(type(mod).__name__)

    hs = [m.register_forward_hook(hook) for m in model.modules() if not isinstance(m, FP8Linear)]
    try:
        run()
    finally:
        for h in hs:
            h.remove()
    assert not seen, f"FP8 tensors reached high-precision modules: {seen}"


def test_default_filter_keeps_embedding_head_router_gate_in_high_precision() -> None:
    torch.manual_seed(3)
    model = _Toy()
    ids = torch.randint(0, 100, (2, 8))
    ref_out = model(ids)
    convert_to_fp8(model)
    assert set(fp8_layers(model)) == {"gate_proj", "up_proj", "down_proj"}
    for name in ("router", "gate", "lm_head", "tiny"):
        assert type(getattr(model, name)) is nn.Linear, name
    assert type(model.embed_tokens) is nn.Embedding and type(model.norm) is nn.LayerNorm
    _assert_no_fp8_outside_fp8linear(model, lambda: model(ids).sum().backward())
    assert calc_diff(model(ids), ref_out) < TOL
    convert_to_fp8(model)  # idempotent
    assert len(fp8_layers(model)) == 3


def test_custom_filter_and_shared_modules() -> None:
    shared = nn.Linear(128, 128)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared), "c": nn.Linear(128, 128)})
    convert_to_fp8(model, filter=lambda name, m: not name.startswith("c"))
    assert isinstance(model["a"][0], FP8Linear) and model["a"][0] is model["b"][0]
    assert model["a"][0].weight is shared.weight  # parameters are shared, not copied
    assert type(model["c"]) is nn.Linear


def test_deepseek_v3_tiny_conversion_keeps_high_precision_parts() -> None:
    mod = pytest.importorskip("raymoe.model")
    from raymoe.config import ModelConfig

    torch.manual_seed(4)
    model = mod.DeepSeekV3(ModelConfig.preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    ref_loss = model(ids, labels=ids).loss.item()
    convert_to_fp8(model)
    names = set(fp8_layers(model))
    assert names, "no Linear was converted"
    from raymoe.model.moe import RoutedExperts

    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedExperts)]
    assert experts and all(f"{n}.fp8" in names for n, _ in experts), "routed experts were not converted"
    for n in names:
        parts = n.lower().split(".")
        assert not any("embed" in p or p.endswith("head") or p in ("router", "gate") for p in parts), n
    for n, m in model.named_modules():
        if any(k in n.split(".")[-1] for k in ("embed", "lm_head", "router", "norm")):
            assert not isinstance(m, FP8Linear), n
    _assert_no_fp8_outside_fp8linear(model, lambda: model(ids, labels=ids).loss.backward())
    loss = model(ids, labels=ids).loss.item()
    assert abs(loss - ref_loss) / ref_loss < 0.01, (loss, ref_loss)


def test_guard_names_layer_and_skips_step() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    convert_to_fp8(model, config=FP8Config(enabled=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = FP8Guard(model)
    x = torch.randn(8, 256)
    model(x).pow(2).mean().backward()
    assert guard.step(opt, step=0)  # finite: applied
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    bad = x.clone()
    bad[3, 17] = float("inf")
    loss = model(bad).pow(2).mean()
    loss.backward()
    assert not guard.step(opt, loss, step=1)
    probs = guard.last_problems
    assert any(p.startswith("0: non-finite amax in fprop.input") for p in probs), probs
    assert any(p.startswith("loss=") for p in probs) and any("non-finite grad" in p for p in probs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state_dict()["state"][0]["step"] == state_before["state"][0]["step"]
    assert guard.skipped_steps == 1 and all(p.grad is None for p in model.parameters())
    model(x).pow(2).mean().backward()  # the next clean step goes through and flags were reset
    assert guard.step(opt, step=2) and guard.last_problems == []


def test_fp8_training_tracks_fp32_training() -> None:
    """A small MLP regression trained 40 steps in fp32 and in FP8 (same seed/data): losses stay within 2 %."""
    def run(fp8: bool) -> list[float]:
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
        if fp8:
            convert_to_fp8(model, config=FP8Config(enabled=True))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(7)
        target = nn.Linear(128, 128)
        losses = []
        for _ in range(40):
            x = torch.randn(64, 128, generator=g)
            with torch.no_grad():
                y = torch.tanh(target(x))
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref, fp8 = run(False), run(True)
    assert fp8[-1] < 0.5 * fp8[0]
    gap = max(abs(a - b) / b for a, b in zip(fp8, ref))
    assert gap < 0.02, gap
