"""The one deferred weight-gradient store (raymoe.wgrad): accumulation through autograd, every store-aware backward
(DeferredLinear, the routed experts' grouped GEMM, FP8Linear, FP8 grouped experts) in one store under one cell, a
deferred W under a real DeepSpeed engine (ZeRO-1 and ZeRO-2), and the fp8 gemm <-> linear import cycle being gone.

Run as a script (``python tests/unit/test_wgrad.py ds``) this file is the DeepSpeed worker that the DeepSpeed test
starts in a subprocess, so torch.distributed state and the DeepSpeed import stay out of the pytest process.
"""
from __future__ import annotations

import ast
import copy
import json
import os
import pathlib
import subprocess
import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raymoe
from raymoe.config import ModelConfig
from raymoe.fp8 import FP8Config, FP8Linear
from raymoe.model.moe import MoE
from raymoe.schedule.executor import DeferredLinear
from raymoe.wgrad import GRAD_READY_ATTR, WeightGradStore, WeightGradStoreError, accumulate_grad, accumulate_grads

HERE = pathlib.Path(__file__).resolve()
PKG = pathlib.Path(raymoe.__file__).resolve().parent


# ------------------------------------------------------------------------------------------ accumulate_grad
def _hooked_param(shape=(3, 4), dtype=torch.float32) -> tuple[nn.Parameter, list[str]]:
    p = nn.Parameter(torch.randn(*shape, dtype=dtype))
    fired: list[str] = []
    p.register_hook(lambda g: fired.append("tensor"))
    p.register_post_accumulate_grad_hook(lambda t: fired.append("post_accumulate"))
    acc = p.expand_as(p).grad_fn.next_functions[0][0]  # the AccumulateGrad node (old DeepSpeed / DDP style)
    acc.register_hook(lambda *_: fired.append("grad_acc_node"))
    p._keep_acc = acc  # keep the node (and its hooks) alive
    return p, fired


@pytest.mark.parametrize("no_grad", [False, True])
def test_accumulate_grad_fires_every_hook_and_sums(no_grad: bool) -> None:
    torch.manual_seed(0)
    p, fired = _hooked_param()
    g1, g2 = torch.randn(3, 4), torch.randn(3, 4)
    with torch.set_grad_enabled(not no_grad):
        accumulate_grad(p, g1)
        assert fired == ["tensor", "post_accumulate", "grad_acc_node"]
        assert torch.equal(p.grad, g1) and not p.grad.requires_grad
        accumulate_grad(p, g2)
    assert fired.count("post_accumulate") == 2 and fired.count("grad_acc_node") == 2
    assert torch.equal(p.grad, g1 + g2)  # same as the hand-written p.grad + g
    assert p.grad.grad_fn is None


def test_accumulate_grads_converts_dtype_and_skips_what_it_should() -> None:
    w = nn.Parameter(torch.zeros(2, 3))
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    g = torch.randn(2, 3).to(torch.bfloat16)
    accumulate_grads([w, None, frozen], [g, torch.ones(1), torch.ones(2)])
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, g.float())
    assert frozen.grad is None
    accumulate_grad(w, None)  # nothing to add
    x = torch.randn(3, requires_grad=True)
    g_with_graph = x * 2  # a grad that carries a graph must not be back-propagated into
    v = nn.Parameter(torch.zeros(3))
    accumulate_grad(v, g_with_graph)
    assert x.grad is None and torch.equal(v.grad, g_with_graph.detach())
    with pytest.raises(ValueError, match="shape"):
        accumulate_grad(w, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="leaf"):
        accumulate_grad(w * 1, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ the store
def test_store_cells_queue_and_errors() -> None:
    store = WeightGradStore()
    ran: list[str] = []
    assert WeightGradStore.active() is None and not store.deferring
    with store.defer(("mb", 0)) as cell:
        assert cell == ("mb", 0) and store.deferring and WeightGradStore.active() is store
        store.put(lambda: ran.append("a"))
        inner = WeightGradStore()
        with inner.defer("x"):  # stores nest; the innermost is the active one
            assert WeightGradStore.active() is inner
        assert WeightGradStore.active() is store
        with pytest.raises(WeightGradStoreError, match="cannot nest"):
            with store.defer("y"):
                pass
    with store.defer():  # queue-style entries
        store.put(lambda: ran.append("q0"))
    with store.defer():
        pass  # recorded even when empty
    assert len(store) == 3 and ("mb", 0) in store and WeightGradStore.active() is None
    with pytest.raises(WeightGradStoreError, match="already pending"):
        with store.defer(("mb", 0)):
            pass
    assert store.pop() == 1 and ran == ["a"]  # oldest first
    assert store.flush() == 1 and ran == ["a", "q0"] and len(store) == 0
    with pytest.raises(WeightGradStoreError, match="no deferred weight grads"):
        store.run(("mb", 0))
    with pytest.raises(WeightGradStoreError, match="empty"):
        store.pop()
    with pytest.raises(WeightGradStoreError, match="outside"):
        store.put(lambda: None)
    assert isinstance(WeightGradStoreError("x"), RuntimeError)


def test_parked_params_are_not_ready_until_their_w_and_run_hooks_fire() -> None:
    store = WeightGradStore()
    p = nn.Parameter(torch.zeros(2))
    seen: list[object] = []
    handle = store.register_run_hook(seen.append)
    with store.defer("c"):
        store.put(lambda: accumulate_grad(p, torch.ones(2)), [p, None])
    assert getattr(p, GRAD_READY_ATTR) is False and p.grad is None  # DeepSpeed's "gradient not final yet"
    store.run("c")
    assert getattr(p, GRAD_READY_ATTR) is True and seen == ["c"] and torch.equal(p.grad, torch.ones(2))
    handle.remove()
    with store.defer("d"):
        pass
    store.run("d")
    assert seen == ["c"]


def test_active_store_is_visible_from_other_threads() -> None:
    """Why a module-level stack and not a thread-local: autograd may run backward functions on its own threads."""
    store = WeightGradStore()
    seen: list[object] = []
    with store.defer("c"):
        t = threading.Thread(target=lambda: seen.append(WeightGradStore.active()))
        t.start()
        t.join()
    assert seen == [store]


def test_one_class_everywhere() -> None:
    import raymoe.fp8
    import raymoe.schedule
    import raymoe.schedule.executor

    assert raymoe.fp8.WeightGradStore is raymoe.schedule.executor.WeightGradStore is WeightGradStore
    assert raymoe.schedule.WeightGradStore is WeightGradStore


# ------------------------------------------------------------------------------------------ all users, one cell
def _tiny_cfg() -> ModelConfig:
    return ModelConfig.preset("tiny").replace(seq_aux_loss_alpha=0.01)


class Mixed(nn.Module):
    """DeferredLinear → MoE (grouped routed experts, optionally FP8) → FP8Linear, fp32 parameters."""

    def __init__(self, fp8_experts: bool = False) -> None:
        super().__init__()
        cfg = _tiny_cfg()
        D = cfg.hidden_size
        self.inp = DeferredLinear(D, D)
        self.moe = MoE(cfg)
        self.out = FP8Linear(D, D, config=FP8Config(enabled=True), name="out")
        with torch.no_grad():
            for p in (self.moe.router.weight, self.moe.experts.gate_proj, self.moe.experts.up_proj,
                      self.moe.experts.down_proj):
                p.normal_(0.0, 0.05)
        if fp8_experts:
            self.moe.experts.enable_fp8(FP8Config(enabled=True), "moe.experts")

    def deferrable(self) -> dict[str, nn.Parameter]:
        """Parameters whose weight grads a store-aware backward defers."""
        e = self.moe.experts
        return {"inp.weight": self.inp.weight, "inp.bias": self.inp.bias, "experts.gate_proj": e.gate_proj,
                "experts.up_proj": e.up_proj, "experts.down_proj": e.down_proj, "out.weight": self.out.weight,
                "out.bias": self.out.bias}

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.inp(x_BTD))
        y, _, aux = self.moe(h)
        return self.out(h + y), aux


def _loss(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out, aux = model(x)
    return (out.float() - t).pow(2).mean() + aux


@pytest.mark.parametrize("fp8_experts", [False, True])
def test_every_store_aware_backward_lands_in_one_cell(fp8_experts: bool) -> None:
    torch.manual_seed(0)
    ref = Mixed(fp8_experts)
    dfr = copy.deepcopy(ref)
    D = _tiny_cfg().hidden_size
    xs = [torch.randn(2, 16, D) for _ in range(2)]
    ts = [torch.randn(2, 16, D) for _ in range(2)]
    for x, t in zip(xs, ts):  # non-deferred reference: two micro-batches, grads summed
        _loss(ref, x, t).backward()

    post_fired: dict[str, int] = {}
    for name, p in dfr.deferrable().items():
        p.register_post_accumulate_grad_hook(lambda _p, n=name: post_fired.__setitem__(n, post_fired.get(n, 0) + 1))
    store = WeightGradStore()
    for mb, (x, t) in enumerate(zip(xs, ts)):
        with store.defer((mb, 0, 0)):  # the schedule's cell: (micro-batch, direction, stage)
            _loss(dfr, x, t).backward()
        if mb == 0:  # after Bi: store-aware params untouched, the others (router, shared experts) have grads
            assert all(p.grad is None for p in dfr.deferrable().values())
            assert dfr.moe.router.weight.grad is not None
            # autograd still ran their AccumulateGrad nodes (with a None grad): the hooks saw them "not ready"
            assert all(getattr(p, GRAD_READY_ATTR) is False for p in dfr.deferrable().values())
            assert post_fired == {n: 1 for n in dfr.deferrable()}
    assert store.cells() == [(0, 0, 0), (1, 0, 0)]
    per_cell = 1 + (3 if fp8_experts else 1) + 1  # DeferredLinear, experts (one closure or one per FP8 GEMM), FP8Linear
    assert store.run((0, 0, 0)) == per_cell
    assert store.run((1, 0, 0)) == per_cell and len(store) == 0
    # every deferred W went through AccumulateGrad (2 Bi with a None grad + 2 W), and the params are ready again
    assert post_fired == {n: 4 for n in dfr.deferrable()}
    assert all(getattr(p, GRAD_READY_ATTR) is True for p in dfr.deferrable().values())

    fp8_params = {"out.weight", "out.bias"} | ({"experts.gate_proj", "experts.up_proj", "experts.down_proj"}
                                               if fp8_experts else set())
    ref_named, dfr_named = dict(ref.named_parameters()), dict(dfr.named_parameters())
    short = {"inp.weight": "inp.weight", "inp.bias": "inp.bias", "out.weight": "out.weight", "out.bias": "out.bias",
             "experts.gate_proj": "moe.experts.gate_proj", "experts.up_proj": "moe.experts.up_proj",
             "experts.down_proj": "moe.experts.down_proj"}
    for n, full in short.items():
        a, b = dfr_named[full].grad, ref_named[full].grad
        assert a is not None and a.abs().sum() > 0, n
        if n in fp8_params:
            assert torch.equal(a, b), n  # FP8: identical to its own non-deferred path
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=n)
    for n, p in ref_named.items():  # parameters with ordinary autograd grads agree too
        if n not in short.values():
            torch.testing.assert_close(dfr_named[n].grad, p.grad, rtol=1e-6, atol=1e-6, msg=n)


def test_no_store_means_no_deferral() -> None:
    torch.manual_seed(1)
    m = Mixed()
    D = _tiny_cfg().hidden_size
    _loss(m, torch.randn(1, 8, D), torch.randn(1, 8, D)).backward()
    assert all(p.grad is not None for p in m.deferrable().values())


# ------------------------------------------------------------------------------------------ DeepSpeed
def _ds_env() -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def ds_result() -> dict:
    pytest.importorskip("deepspeed")
    res = subprocess.run([sys.executable, str(HERE), "ds"], cwd=HERE.parents[2], env=_ds_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, res.stdout[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_deepspeed_deferred_w_matches_immediate(ds_result: dict, zero: int) -> None:
    """bf16 engine, 2 micro-batches per step: Bi, Bi, W, W, engine.step() == backward, backward, engine.step()."""
    r = ds_result[f"zero{zero}"]
    assert zero == 0 or r["optimizer"] == "DeepSpeedZeroOptimizer"
    assert r["closures_per_step"] == 2 * 3  # 2 micro-batches × (DeferredLinear, experts, FP8Linear)
    assert r["deferred_identical"], r  # weights after 3 engine.step()s, bit for bit
    assert r["deferred_grad_norms"] == r["immediate_grad_norms"]
    assert r["immediate_changed"]  # the steps did update the weights


def test_deepspeed_zero2_hooks_see_the_deferred_grads(ds_result: dict) -> None:
    """ZeRO-2 moves each gradient into its partition from a post-accumulate-grad hook and frees ``param.grad``: the
    deferred W reaches it only because accumulate_grad goes through autograd. A hand-written ``p.grad = p.grad + g``
    (what the old stores did) is invisible to ZeRO-2: the deferred grads are silently dropped (grad norm ~20x
    smaller) and the step differs."""
    r = ds_result["zero2"]
    assert r["deferred_grads_taken_by_hook"]  # DeepSpeed's hook fired and took the grad
    assert r["hand_grads_left_on_param"]  # the hand-written add bypassed it
    assert not r["hand_identical"]
    assert all(h < 0.5 * d for h, d in zip(r["hand_grad_norms"], r["deferred_grad_norms"]))


# ------------------------------------------------------------------------------------------ import cycle
def _imports_of(path: pathlib.Path) -> list[str]:
    """Every module an ``import`` anywhere in ``path`` (functions included) names, relative ones resolved."""
    package = ["raymoe", *path.relative_to(PKG).parts[:-1]]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def test_gemm_does_not_import_linear_and_wgrad_imports_only_torch() -> None:
    gemm = _imports_of(PKG / "fp8" / "gemm.py")
    assert "raymoe.fp8.linear" not in gemm, gemm
    assert "raymoe.fp8.step_counter.optimizer_step_count" in gemm
    for leaf in ("wgrad.py", "fp8/step_counter.py"):  # the neutral modules depend on torch only
        assert not [n for n in _imports_of(PKG / leaf) if n.startswith("raymoe")], leaf


_IMPORT_CHECK = """
import pathlib, sys, types
import raymoe
# Import the fp8 submodules without the package __init__ (which imports them all, hiding any order dependence).
pkg = types.ModuleType("raymoe.fp8")
pkg.__path__ = [str(pathlib.Path(raymoe.__file__).parent / "fp8")]
sys.modules["raymoe.fp8"] = pkg
first, other = sys.argv[1:3]
__import__("raymoe.fp8." + first)
import torch
from raymoe.fp8.gemm import WeightDequantCache
q, s = torch.zeros(128, 128).to(torch.float8_e4m3fn), torch.ones(1, 1)
WeightDequantCache().get(q, s, torch.bfloat16, rows=False)  # the call that used to import linear lazily
assert ("raymoe.fp8.linear" in sys.modules) == (first == "linear"), "gemm pulled in linear"
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()
__import__("raymoe.fp8." + other)
from raymoe.fp8.linear import optimizer_step_count
import raymoe.fp8.step_counter as sc
assert optimizer_step_count is sc.optimizer_step_count and sc.optimizer_step_count() == 1
import raymoe.fp8.grouped, raymoe.fp8.guard  # the rest of the package imports cleanly too
print("ok")
"""


@pytest.mark.parametrize("first", ["gemm", "linear"])
def test_fp8_modules_import_in_either_order(first: str) -> None:
    """Fresh interpreter, ``raymoe.fp8.<first>`` imported before anything else of the package (its ``__init__``
    bypassed), then the other; gemm alone must not load linear, even when its weight cache is used."""
    other = "linear" if first == "gemm" else "gemm"
    res = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, first, other], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ------------------------------------------------------------------------------------------ the DeepSpeed worker
@contextmanager
def _hand_written_accumulation() -> Iterator[None]:
    """Make every deferred W add ``p.grad = p.grad + g`` by hand, as the old stores did (for comparison only)."""
    import raymoe.fp8.grouped as grouped
    import raymoe.fp8.linear as linear
    import raymoe.model.moe as moe
    import raymoe.schedule.executor as executor

    def by_hand(params, grads) -> None:
        for p, g in zip(params, grads):
            if p is not None and g is not None and p.requires_grad:
                g = g.to(p.dtype)
                p.grad = g if p.grad is None else p.grad + g

    saved = (executor.accumulate_grads, moe.accumulate_grads, linear.accumulate_grads, grouped.accumulate_grad)
    executor.accumulate_grads = moe.accumulate_grads = linear.accumulate_grads = by_hand
    grouped.accumulate_grad = lambda p, g: by_hand([p], [g])
    try:
        yield
    finally:
        executor.accumulate_grads, moe.accumulate_grads, linear.accumulate_grads, grouped.accumulate_grad = saved


def _ds_worker() -> dict:
    from raymoe.fp8 import deepspeed_hooks as dsh

    dsh.init_single_process_dist()
    D = _tiny_cfg().hidden_size

    def data(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(100 + step)
        return [(torch.randn(2, 16, D, generator=g), torch.randn(2, 16, D, generator=g)) for _ in range(2)]

    def train(zero: int, mode: str) -> dict:
        torch.manual_seed(0)
        model = Mixed()
        cfg = dsh.ds_config(micro_batch_size=2, grad_accum=2, zero_stage=zero, grad_clip=1.0)
        store = WeightGradStore()
        eng, _ = dsh.initialize(model, lambda p: torch.optim.AdamW(p, lr=1e-2), cfg,
                                wgrad_store=store if mode == "deferred" else None)
        p0 = [p.detach().float().clone() for p in eng.module.parameters()]
        out: dict = {"optimizer": type(eng.optimizer).__name__, "grad_norms": [], "closures": 0,
                     "grads_left": None}
        for step in range(3):
            for mb, (x, t) in enumerate(data(step)):
                loss = _loss(eng, x.to(torch.bfloat16), t)
                if mode == "immediate":
                    eng.backward(loss)
                else:
                    with store.defer((mb, 0, 0)):  # "Bi"
                        eng.backward(loss)
            if mode != "immediate":
                with _hand_written_accumulation() if mode == "hand" else nullcontext():
                    out["closures"] = store.run((0, 0, 0)) + store.run((1, 0, 0))  # the two "W"s
                if step == 0:  # did DeepSpeed's post-accumulate hook take the deferred grads off the parameters?
                    out["grads_left"] = [p.grad is not None for p in eng.module.deferrable().values()]
            eng.step()
            out["grad_norms"].append(float(eng.get_global_grad_norm()))
        out["params"] = [p.detach().float().clone() for p in eng.module.parameters()]
        out["changed"] = any(not torch.equal(a, b) for a, b in zip(p0, out["params"]))
        return out

    res: dict = {}
    for zero in (0, 1, 2):  # ZeRO-0 (bf16 optimizer), ZeRO-1 (the FP8 recipe), ZeRO-2 (gradient hooks reduce)
        imm, dfr = train(zero, "immediate"), train(zero, "deferred")
        r = {"optimizer": dfr["optimizer"], "closures_per_step": dfr["closures"],
             "deferred_identical": all(torch.equal(a, b) for a, b in zip(imm["params"], dfr["params"])),
             "immediate_grad_norms": imm["grad_norms"], "deferred_grad_norms": dfr["grad_norms"],
             "immediate_changed": imm["changed"], "deferred_grads_left": dfr["grads_left"]}
        if zero == 2:
            hand = train(zero, "hand")
            r["deferred_grads_taken_by_hook"] = not any(dfr["grads_left"])
            r["hand_grads_left_on_param"] = all(hand["grads_left"])
            r["hand_identical"] = all(torch.equal(a, b) for a, b in zip(imm["params"], hand["params"]))
            r["hand_grad_norms"] = hand["grad_norms"]
        res[f"zero{zero}"] = r
    return res


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = {"ds": _ds_worker}[sys.argv[1]]()
    print("RESULT " + json.dumps(out), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (see fp8_ds_worker.py: a joinable comm thread can abort the process)
