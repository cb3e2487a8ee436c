"""`python -m raymoe.jobs.bench recompute`: activation memory kept for backward, and step time, per ``train.recompute``.

For each preset (``presets=tiny,small``) and dtype (``dtypes=float32,bfloat16``; bf16 = autocast with fp32 weights,
as training runs it) one training step (forward, loss, backward) of the same weights and batch (``batch``, ``seq``)
runs under ``none``, ``selective`` and ``full``. Reported per mode:

* **activation bytes**: bytes of the tensor storages created during the forward that are still alive when backward
  starts (parameters and the loss aside: what the graph holds for backward). Counted by a ``TorchDispatchMode`` that
  sees every aten op's outputs and follows each new storage's life (weak references on the tensors), so it counts
  whatever keeps a tensor alive — autograd's saved tensors, a checkpoint's saved inputs, the recipes — without
  relying on saved-tensor hooks (``full`` mode's checkpoint owns those inside a block);
* the **saving against ``none``**, and for ``selective`` the saving the formula predicts: per block and token, the
  four RMSNorm outputs feeding GEMMs (``2·D + q_lora + C``) and the per-head ``q, k, v`` (``H·(2·(N+R) + V)``), in
  fp32; under bf16 autocast all of them in bf16 (the GEMMs save autocast's bf16 copies of the fp32 norm outputs,
  and the recipe rebuilds those), where an MoE block's post-attention norm output has two copies (the router's
  and the shared experts' GEMM each cast it);
* **step time relative to ``none``** (median of interleaved rounds, each step after an untimed one): the price
  of recomputing;

Under bf16 autocast the graph also holds the bf16 copies of the weights that autocast made for the GEMMs (one per
forward, not per token): ``none`` and ``selective`` keep them, ``full`` casts them again in the recompute.
* the largest relative gradient difference to ``none`` (same kernels: ~0; the bench fails above 1e-6).
"""
from __future__ import annotations

import statistics
import time
import warnings
import weakref
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from raymoe.config import ModelConfig
from raymoe.model.recompute import RECOMPUTE_MODES, set_recompute
from raymoe.train.parallelize import build_model

console = Console(width=150)


class LiveBytes(TorchDispatchMode):
    """Bytes of storages created by aten ops while active and still alive: ``live`` (now) and ``peak``."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors on it]

    def _drop(self, ptr: int) -> None:
        ent = self._refs.get(ptr)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] == 0:
            del self._refs[ptr]
            self.live -= ent[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in self._refs:
                self._refs[ptr][1] += 1
            elif ptr not in inputs and st.nbytes():
                self._refs[ptr] = [st.nbytes(), 1]
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            else:
                continue
            weakref.finalize(t, self._drop, ptr)
        return out


def _selective_formula(cfg: ModelConfig, B: int, T: int, dtype: torch.dtype) -> int:
    """Bytes selective recompute does not keep (module docstring)."""
    tokens = B * (T * cfg.num_hidden_layers + (T - 1) * cfg.num_nextn_predict_layers)
    norms = 2 * cfg.hidden_size + cfg.q_lora_rank + cfg.kv_lora_rank
    heads = cfg.num_attention_heads * (2 * cfg.qk_head_dim + cfg.v_head_dim)
    if dtype == torch.float32:
        return 4 * tokens * (norms + heads)
    moe_tokens = B * (T * (cfg.num_hidden_layers - cfg.first_k_dense_replace) + (T - 1) * cfg.num_nextn_predict_layers)
    extra = moe_tokens * cfg.hidden_size if cfg.n_shared_experts else 0  # the second bf16 copy in MoE blocks
    return torch.tensor([], dtype=dtype).element_size() * (tokens * (norms + heads) + extra)


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return model(x, labels=y).loss


def run(args: dict[str, str]) -> dict:
    warnings.filterwarnings("ignore")
    presets = args.get("presets", "tiny,small").split(",")
    dtypes = [getattr(torch, d) for d in args.get("dtypes", "float32,bfloat16").split(",")]
    batch, seq, iters = int(args.get("batch", 4)), int(args.get("seq", 256)), int(args.get("iters", 3))
    results: dict[str, Any] = {"batch": batch, "seq": seq, "torch_threads": torch.get_num_threads(), "rows": []}
    table = Table(title=f"train.recompute: activations kept for backward, B={batch} T={seq}")
    for col in ("model", "dtype", "mode", "activation MiB", "saved MiB", "formula MiB", "saved %", "time / none",
                "grad rel diff"):
        table.add_column(col, justify="right")
    for name in presets:
        cfg = ModelConfig.preset(name)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        y = torch.roll(x, -1, 1)
        for dtype in dtypes:
            models = {}
            for mode in RECOMPUTE_MODES:
                models[mode] = build_model(cfg, 0)
                set_recompute(models[mode], mode)
            mem, grads = {}, {}
            for mode, m in models.items():
                with LiveBytes() as lb:
                    loss = _step(m, x, y, dtype)
                    loss_bytes = loss.untyped_storage().nbytes()
                    mem[mode] = lb.live - loss_bytes
                    loss.backward()
                    del loss
                grads[mode] = {n: p.grad.clone() for n, p in m.named_parameters()}
                m.zero_grad(set_to_none=True)
            times: dict[str, list[float]] = {mode: [] for mode in models}
            for _ in range(iters):
                for mode, m in models.items():
                    for timed in (False, True):  # settle first: switching models pays fresh page faults
                        t0 = time.perf_counter()
                        _step(m, x, y, dtype).backward()
                        if timed:
                            times[mode].append(time.perf_counter() - t0)
                        m.zero_grad(set_to_none=True)
            med = {mode: statistics.median(v) for mode, v in times.items()}
            formula = _selective_formula(cfg, batch, seq, dtype)
            for mode in models:
                diff = max(float((grads[mode][n] - g0).abs().max() / g0.abs().max().clamp_min(1e-30))
                           for n, g0 in grads["none"].items())
                if diff > 1e-6:
                    raise RuntimeError(f"{name} {dtype} recompute={mode}: gradients differ from none by {diff:.2e}")
                saved = mem["none"] - mem[mode]
                row = {"model": name, "dtype": str(dtype).removeprefix("torch."), "mode": mode,
                       "activation_bytes": mem[mode], "saved_bytes": saved,
                       "formula_bytes": formula if mode == "selective" else None,
                       "saved_frac": saved / mem["none"], "time_vs_none": med[mode] / med["none"],
                       "grad_rel_diff": diff}
                results["rows"].append(row)
                table.add_row(name, row["dtype"], mode, f"{mem[mode] / 2**20:.1f}", f"{saved / 2**20:.1f}",
                              f"{formula / 2**20:.1f}" if mode == "selective" else "",
                              f"{100 * row['saved_frac']:.0f}%", f"{row['time_vs_none']:.2f}", f"{diff:.1e}")
    console.print(table)
    return results
