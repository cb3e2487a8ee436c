"""Serving's weight layouts: fused routed experts (:func:`raymoe.model.moe.fuse_gate_up`: gate/up held as one
``[E, 2I, D]`` tensor, two GEMMs per touched expert) and ``[in, out]`` linears (:func:`raymoe.model.layers.use_kn_layout`).
Checked against the grouped back-end / ``nn.Linear`` of the same weights (1e-5), through shards and in-place weight
updates, and end to end: the engine's greedy tokens and logits with and without them, and with the few-row CPU
kernels (``engine.cpu_kernels``, :mod:`raymoe.model.cpu_kernels`)."""
from __future__ import annotations

import copy

import pytest
import torch

from raymoe.config import ModelConfig
from raymoe.engine import EngineConfig, LLMEngine, SamplingParams
from raymoe.model import DeepSeekV3
from raymoe.model.layers import enable_fused_weight_cache, fused_linear, kn_layout, use_kn_layout
from raymoe.model.moe import RoutedExperts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def experts(E: int = 6, D: int = 16, I: int = 8) -> RoutedExperts:  # noqa: E741
    g = torch.Generator().manual_seed(0)
    m = RoutedExperts(E, D, I)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def grouped_input(counts: list[int], D: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(sum(counts), D, generator=g), torch.tensor(counts)


@pytest.mark.parametrize("counts", [[2, 0, 1, 3, 0, 1], [0, 0, 0, 0, 0, 5], [40, 1, 0, 7, 2, 0], [0] * 6])
def test_fused_equals_grouped(counts: list[int]) -> None:
    ref_mod = experts()
    fused = copy.deepcopy(ref_mod)
    fused.fuse_gate_up()
    assert fused.fused and not ref_mod.fused
    assert torch.equal(fused.gate_proj, ref_mod.gate_proj) and torch.equal(fused.up_proj, ref_mod.up_proj)
    x, c = grouped_input(counts)
    with torch.no_grad():
        want = ref_mod.forward_grouped(x, c)
        got = fused.forward_grouped(x, c)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_follows_in_place_updates_and_shards() -> None:
    m = experts()
    m.fuse_gate_up()
    src = experts()
    with torch.no_grad():  # what SlotShard.load does when a slot changes expert
        m.gate_proj[2].copy_(src.gate_proj[4])
        m.up_proj[2].copy_(src.up_proj[4])
        m.down_proj[2].copy_(src.down_proj[4])
    x, c = grouped_input([0, 0, 3, 0, 0, 0])
    ref = src.shard([4])
    with torch.no_grad():
        torch.testing.assert_close(m.forward_grouped(x, c), ref.forward_grouped(x, torch.tensor([3])),
                                   rtol=1e-5, atol=1e-6)
    sh = m.shard([2, 5])
    assert sh.fused
    x, c = grouped_input([2, 1])
    with torch.no_grad():
        torch.testing.assert_close(sh.forward_grouped(x, c), ref_unfused(m, [2, 5]).forward_grouped(x, c),
                                   rtol=1e-5, atol=1e-6)


def ref_unfused(m: RoutedExperts, ids: list[int]) -> RoutedExperts:
    out = RoutedExperts(len(ids), m.gate_proj.shape[1], m.gate_proj.shape[2])
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(out, name).copy_(getattr(m, name)[ids])
    return out


def test_replaced_weights_are_no_longer_fused_and_training_is_unchanged() -> None:
    m = experts()
    m.fuse_gate_up()
    with torch.no_grad():  # a new gate tensor (as .to() or load_state_dict(assign=True) make): the fused one is stale
        m.gate_proj = torch.nn.Parameter(m.gate_proj.detach().contiguous() * 2.0)
    assert not m.fused
    x, c = grouped_input([1, 2, 0, 0, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(m.forward_grouped(x, c), ref_unfused(m, list(range(6))).forward_grouped(x, c))
    f = experts()
    f.fuse_gate_up()
    y = f.forward_grouped(x, c)  # autograd on: the grouped back-end over the fused halves (views)
    y.square().sum().backward()
    r = experts()
    r.forward_grouped(x, c).square().sum().backward()
    torch.testing.assert_close(f.gate_proj.grad, r.gate_proj.grad)
    torch.testing.assert_close(f.up_proj.grad, r.up_proj.grad)


def test_kn_linears_keep_values_and_outputs() -> None:
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"up": torch.nn.Linear(8, 24, bias=False), "down": torch.nn.Linear(24, 8, bias=False),
                               "a": torch.nn.Linear(8, 6, bias=False), "b": torch.nn.Linear(8, 6, bias=False),
                               "kv_b_proj": torch.nn.Linear(4, 16, bias=False)})
    ref = copy.deepcopy(net)
    assert kn_layout(24, 8) and not kn_layout(8, 24) and kn_layout(12, 8)
    assert use_kn_layout(net, skip=("kv_b_proj",)) == 1  # up only: down has in > out, a and b alone too
    assert net["up"].weight.stride() == (1, 24) and net["down"].weight.is_contiguous()
    assert net["kv_b_proj"].weight.is_contiguous()  # skipped by name
    sd, ref_sd = net.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(net["up"](x), ref["up"](x))
        enable_fused_weight_cache(net, kn=True)
        got = fused_linear(x, net["a"], net["b"])  # the fused [12, 8] group: kept as [8, 12]
        assert net["a"]._fused_weight_cache["w"].stride() == (1, 12)
    for g, w in zip(got, (ref["a"](x), ref["b"](x))):
        torch.testing.assert_close(g, w)


# (fused_experts, kn_linears, cpu_kernels) of the "on" engine; the "off" engine has none of them
@pytest.mark.parametrize("fused,kn,native", [(True, False, False), (False, True, False), (True, True, False),
                                             (True, False, True), (False, False, True)])
def test_engine_greedy_tokens_and_logits_equal_with_and_without_layouts(fused: bool, kn: bool, native: bool,
                                                                        monkeypatch) -> None:
    from raymoe.model import cpu_kernels

    calls: dict[str, int] = {}
    for name in ("mla_decode_layer", "swiglu_packed", "moe_layer"):  # the one-call paths of the kernels
        def spy(*a, _f=getattr(cpu_kernels, name), _n=name, **k):
            out = _f(*a, **k)
            calls[_n] = calls.get(_n, 0) + (out is not None)
            return out

        monkeypatch.setattr(cpu_kernels, name, spy)
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny").replace(vocab_size=256)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 17, 30)]
    outs, logs = {}, {}
    for on in (False, True):
        eng = LLMEngine(copy.deepcopy(model), None, EngineConfig(
            block_size=4, num_blocks=128, prefill_chunk=64, fused_experts=fused and on, kn_linears=kn and on,
            cpu_kernels="on" if native and on else "off"))
        routed = [m for m in eng.model.modules() if isinstance(m, RoutedExperts)]
        assert routed and all(m.fused == (fused and on) for m in routed)
        assert all(m.native == (fused and native and on) for m in routed)
        assert (eng.model.lm_head.weight.stride(0) == 1) == (kn and on)
        assert ("forward" in eng.model.lm_head.__dict__) == (native and on)  # the few-row linear of cpu_kernels
        log: list[torch.Tensor] = []
        inner = eng._forward

        def forward(ids, segments, logit_rows, inner=inner, log=log):
            h, logits = inner(ids, segments, logit_rows)
            log.append(logits.clone())
            return h, logits

        eng._forward = forward  # type: ignore[method-assign]
        res = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        outs[on] = [r.outputs[0].token_ids for r in res]
        logs[on] = log
    # with the kernels: every decode step's MLA layers and dense FFNs ran as one call each (and, with fused experts,
    # each MoE layer: router, routed and shared experts); without them, none did
    assert (calls.get("mla_decode_layer", 0) > 0) == (calls.get("swiglu_packed", 0) > 0) == native
    assert (calls.get("moe_layer", 0) > 0) == (native and fused)
    assert outs[True] == outs[False]
    assert len(logs[True]) == len(logs[False])
    for a, b in zip(logs[True], logs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["fused_experts", "kn_linears"])
def test_engine_config_rejects_non_bool_layout_switches(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        EngineConfig(**{key: "yes"})


def test_engine_cpu_kernels_option() -> None:
    with pytest.raises(ValueError, match="engine.cpu_kernels must be one of auto, on, off; got 'fast'"):
        EngineConfig(cpu_kernels="fast")
    assert EngineConfig(cpu_kernels=False).cpu_kernels == "off"  # YAML's bare off
    assert EngineConfig(cpu_kernels=True).cpu_kernels == "on"
    model = DeepSeekV3(ModelConfig.preset("tiny").replace(vocab_size=256)).to(torch.bfloat16).eval()
    with pytest.raises(ValueError, match=r"cpu_kernels=on, but .*fp32 CPU models only \(this engine: torch.bfloat16"):
        LLMEngine(model, None, EngineConfig(block_size=4, num_blocks=16, cpu_kernels="on"))
    eng = LLMEngine(model, None, EngineConfig(block_size=4, num_blocks=16))  # auto: quietly the torch path
    assert not eng.cpu_kernels and not any(getattr(m, "native", False) for m in eng.model.modules())
