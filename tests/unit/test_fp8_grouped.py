"""FP8 grouped GEMM for stacked routed-expert weights, and the ``enable_fp8`` opt-in protocol of convert_to_fp8."""
from __future__ import annotations

import copy

import torch
from torch import nn

from raymoe.fp8 import FP8Config, FP8GroupedGEMM, FP8Guard, WeightGradStore, calc_diff, convert_to_fp8, fp8_layers

TOL = 2e-3  # as in test_fp8_linear: one extra E4M3 operand vs the reference path


def _ref(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs, r = [], 0
    for e, c in enumerate(counts):
        outs.append(x[r:r + c] @ w[e])
        r += c
    return torch.cat(outs)


def test_grouped_fprop_dgrad_wgrad_match_reference() -> None:
    torch.manual_seed(0)
    counts = [70, 0, 200, 31]  # an empty expert, segments that are not multiples of 128
    E, D, O = 4, 192, 160
    x = torch.randn(sum(counts), D)
    w = torch.randn(E, D, O) * 0.05
    g = torch.randn(sum(counts), O)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    _ref(xr, wr, counts).backward(g)
    xf, wf = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    layer = FP8GroupedGEMM(FP8Config(enabled=True), "experts")
    y = layer(xf, wf, torch.tensor(counts))
    y.backward(g)
    assert y.shape == (sum(counts), O)
    assert calc_diff(y, _ref(x, w, counts)) < TOL
    assert calc_diff(xf.grad, xr.grad) < TOL
    assert calc_diff(wf.grad, wr.grad) < TOL
    assert wf.grad[1].abs().max() == 0  # the expert with no tokens gets a zero gradient


def test_grouped_deferred_wgrad_identical() -> None:
    torch.manual_seed(1)
    counts = torch.tensor([50, 80])
    x = torch.randn(130, 128)
    w = nn.Parameter(torch.randn(2, 128, 128) * 0.05)
    g = torch.randn(130, 128)
    imm = FP8GroupedGEMM(FP8Config(enabled=True), "imm")
    imm(x, w, counts).backward(g)
    dw_imm = w.grad.clone()
    w.grad = None
    dfr = FP8GroupedGEMM(FP8Config(enabled=True), "dfr")
    dfr.wgrad_store = store = WeightGradStore()
    with store.defer():
        dfr(x, w, counts).backward(g)
    assert w.grad is None
    store.flush()
    assert torch.equal(w.grad, dw_imm)


class _Experts(nn.Module):
    """A routed-experts module with stacked weights that opts in to FP8 the way raymoe.model can."""

    def __init__(self, E: int = 4, D: int = 128, I: int = 256) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(E, D, I) * 0.05)
        self.up_proj = nn.Parameter(torch.randn(E, D, I) * 0.05)
        self.down_proj = nn.Parameter(torch.randn(E, I, D) * 0.05)
        self.fp8: FP8GroupedGEMM | None = None

    def enable_fp8(self, config: FP8Config, name: str, wgrad_store: WeightGradStore | None) -> bool:
        self.fp8 = FP8GroupedGEMM(config, name)
        self.fp8.wgrad_store = wgrad_store
        return True

    def _mm(self, x, w, counts):
        return self.fp8(x, w, counts) if self.fp8 is not None else _ref(x, w, counts.tolist())

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self._mm(x, self.gate_proj, counts)) * self._mm(x, self.up_proj, counts)
        return self._mm(h, self.down_proj, counts)


def test_convert_to_fp8_calls_enable_fp8_and_guard_sees_it() -> None:
    torch.manual_seed(2)
    model = nn.ModuleDict({"experts": _Experts(), "router": _Experts()})
    ref = copy.deepcopy(model)
    sd_keys = set(model.state_dict())
    convert_to_fp8(model)
    assert model["experts"].fp8 is not None and model["router"].fp8 is None  # the filter still applies by name
    assert set(model.state_dict()) == sd_keys  # no new parameters or buffers
    assert "experts.fp8" in fp8_layers(model)
    counts = torch.tensor([40, 60, 0, 28])
    x = torch.randn(128, 128)
    assert calc_diff(model["experts"](x, counts), ref["experts"](x, counts)) < TOL
    guard = FP8Guard(model)
    bad = x.clone()
    bad[5, 3] = float("inf")
    model["experts"](bad, counts).sum().backward()
    assert any(p.startswith("experts: non-finite amax in fprop.input") for p in guard.problems())
