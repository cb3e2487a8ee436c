"""`python -m raymoe.jobs.bench gemm_read [model=small] [rows=1,16] [reps=7] [compile=0] [pool_mb=256]`: how fast
decode-shaped GEMMs read their weights on this host.

A decode step of B sequences multiplies a few rows by every weight it touches, so its floor is the weight bytes over
the machine's read bandwidth (the ``floor`` column of ``bench serve``). Whether a step reaches that floor depends on
the GEMM kernels at 1–16 rows. For the model's routed experts of one layer (E matrices ``[D, I]``, every expert
touched) and its lm_head (``[V, D]``) this suite times each way to run the product and reports the effective read rate
(weight bytes / time) next to a ``sum`` over the same tensors (the read ``bench serve`` takes as its bandwidth floor).
Enough copies of every weight are rotated (``pool_mb``, default 256 MB per pass) that nothing is served from cache.

Ways (``x`` has ``rows`` rows; experts get ``rows`` rows each):

* ``mm``: ``x @ W.T``, W ``[N, K]`` (the ``nn.Linear`` layout); ``mm_kn``: ``x @ W``, W ``[K, N]`` (what the engine's
  ``kn_linears`` does for ``N ≥ K``);
* ``W·xᵀ (per expert)``: ``W_e [N, K] @ x_eᵀ`` per expert, the orientation of the engine's fused routed experts
  (``fuse_gate_up``); with the ``routed gate+up`` shape ``[E, D, 2I]`` the suite times the fused gate/up product;
* ``mv`` (rows = 1): ``torch.mv``;
* ``bmm`` (experts): one ``[E, rows, D] @ [E, D, I]``;
* ``grouped_mm`` (experts): ``torch._grouped_mm`` over the experts' row groups;
* ``mkl``: ``torch.ops.mkl._mkl_linear`` on MKL-packed weights (fp32 builds with MKL);
* ``native``: raymoe's row-streaming kernel (:func:`raymoe.model.cpu_kernels.linear`) on the ``[N, K]`` weight; for
  experts one call per expert on ``W_eᵀ`` (the engine runs a whole layer in one call); ``native packed``: the
  panel-packed kernel the engine runs its dense linears through (:func:`raymoe.model.cpu_kernels.linear_packed`);
* ``chunks`` (lm_head): the product in 1024-column slices;
* ``bf16``: ``mm`` in bfloat16;
* ``compiled`` (``compile=1``): ``torch.compile`` of ``mm`` (its compile time is reported).

The ``sum`` is not a proven floor: when a GEMM reads faster than it, the bench says so (that host's bandwidth is
higher than a ``sum`` shows, and a floor computed from it is too low a bar).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Optional

import torch
from rich.console import Console
from rich.table import Table

from raymoe.config import ModelConfig
from raymoe.model import cpu_kernels as ck
from raymoe.jobs.benches import median_seconds

console = Console() if sys.stdout.isatty() else Console(width=160)

__all__ = ["run", "measure"]

_SLACK = 1.10  # beating the sum read by less than this is timing noise


def _copies(nbytes: int, pool_bytes: int) -> int:
    return max(2, math.ceil(pool_bytes / nbytes))


def _rate(fn: Callable[[int], Any], n: int, nbytes: int, reps: int) -> tuple[float, float]:
    """(ms per call, GB/s) of ``fn(i)`` over ``n`` rotated copies."""
    def one_pass() -> None:
        for i in range(n):
            fn(i)

    t = median_seconds(one_pass, reps, warmup=1) / n
    return 1e3 * t, nbytes / t / 1e9


def measure(name: str, shape_WNK: tuple[int, ...], rows: int, reps: int, compile_mm: bool,
            pool_bytes: int = 256 * 2**20) -> list[dict[str, Any]]:
    """Rows of ``{shape, way, rows, ms, GB/s}`` for one weight shape: ``[N, K]`` (a linear) or ``[E, K, N]``
    (experts, ``x_e [rows, K] @ W_e [K, N]``)."""
    g = torch.Generator().manual_seed(0)
    experts = len(shape_WNK) == 3
    nbytes = math.prod(shape_WNK) * 4
    n = _copies(nbytes, pool_bytes)
    Ws = [torch.randn(*shape_WNK, generator=g) for _ in range(n)]
    out: list[dict[str, Any]] = []

    def add(way: str, fn: Callable[[int], Any], nb: int = nbytes, note: str = "") -> None:
        ms, gbs = _rate(fn, n, nb, reps)
        out.append({"shape": name, "way": way, "rows": rows, "ms": ms, "GB/s": gbs, "note": note})

    add("sum (read)", lambda i: Ws[i].sum())
    if experts:
        E, K, N = shape_WNK
        x = torch.randn(E, rows, K, generator=g)
        add("mm (per expert)", lambda i: [x[e] @ Ws[i][e] for e in range(E)])
        Wt = [w.transpose(1, 2).contiguous() for w in Ws]
        add("W·xᵀ (per expert)", lambda i: [torch.mm(Wt[i][e], x[e].t()) for e in range(E)])
        if ck.available():
            add("native (per expert)", lambda i: [ck.linear(x[e], Wt[i][e], max_rows=rows) for e in range(E)])
        del Wt
        add("bmm", lambda i: torch.bmm(x, Ws[i]))
        if hasattr(torch, "_grouped_mm"):
            xf = x.reshape(E * rows, K)
            offs = torch.arange(1, E + 1, dtype=torch.int32) * rows
            try:
                torch._grouped_mm(xf, Ws[0], offs=offs)
                add("grouped_mm", lambda i: torch._grouped_mm(xf, Ws[i], offs=offs))
            except RuntimeError as e:  # not on this build / dtype
                out.append({"shape": name, "way": "grouped_mm", "rows": rows, "ms": None, "GB/s": None,
                            "note": str(e)[:60]})
        Wb = [w.to(torch.bfloat16) for w in Ws]
        xb = x.to(torch.bfloat16)
        add("bf16 bmm", lambda i: torch.bmm(xb, Wb[i]), nb=nbytes // 2)
        return out
    N, K = shape_WNK
    x = torch.randn(rows, K, generator=g)
    add("mm (x @ W.T)", lambda i: x @ Ws[i].T)
    Wkn = [w.T.contiguous() for w in Ws]
    add("mm_kn (x @ W)", lambda i: x @ Wkn[i])
    if rows == 1:
        v = x[0]
        add("mv", lambda i: torch.mv(Ws[i], v))
    if ck.available():
        add("native", lambda i: ck.linear(x, Ws[i], max_rows=rows))
        packed = [ck.pack(w) for w in Ws]
        add("native packed", lambda i: ck.linear_packed(x, packed[i], max_rows=rows))
        del packed
    add("chunks of 1024 cols", lambda i: torch.cat([x @ w.T for w in Ws[i].split(1024)], dim=-1))
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        try:
            packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in Ws]
            add("mkl packed", lambda i: torch.ops.mkl._mkl_linear(x, packed[i], Ws[i], None, rows))
        except (RuntimeError, AttributeError) as e:
            out.append({"shape": name, "way": "mkl packed", "rows": rows, "ms": None, "GB/s": None,
                        "note": str(e)[:60]})
    Wb = [w.to(torch.bfloat16) for w in Ws]
    xb = x.to(torch.bfloat16)
    add("bf16 mm", lambda i: xb @ Wb[i].T, nb=nbytes // 2)
    if compile_mm:
        f = torch.compile(lambda a, b: a @ b.T, dynamic=False)
        t0 = time.perf_counter()
        f(x, Ws[0])
        c = time.perf_counter() - t0
        add("compiled mm", lambda i: f(x, Ws[i]), note=f"compile {c:.1f} s")
    return out


def run(args: dict[str, str]) -> dict[str, Any]:
    model = args.get("model", "small")
    rows_list = [int(r) for r in args.get("rows", "1,16").split(",") if r.strip()]
    reps = int(args.get("reps", "7"))
    compile_mm = args.get("compile", "0") == "1"
    pool = int(args.get("pool_mb", "256")) * 2**20
    threads: Optional[str] = args.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    cfg = ModelConfig.preset(model)
    shapes = {
        f"routed experts [{cfg.n_routed_experts}, {cfg.hidden_size}, {cfg.moe_intermediate_size}]":
            (cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size),
        f"routed gate+up [{cfg.n_routed_experts}, {cfg.hidden_size}, {2 * cfg.moe_intermediate_size}]":
            (cfg.n_routed_experts, cfg.hidden_size, 2 * cfg.moe_intermediate_size),
        f"lm_head [{cfg.vocab_size}, {cfg.hidden_size}]": (cfg.vocab_size, cfg.hidden_size),
    }
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, shape in shapes.items():
            for r in rows_list:
                rows += measure(name, shape, r, reps, compile_mm, pool)
    t = Table(title=f"Weight read rate of decode-shaped GEMMs ({model}, fp32 unless noted, {torch.get_num_threads()} "
                    f"threads; weights rotated through ≥ {pool >> 20} MB)")
    for c in ("shape", "rows", "way", "ms / call", "GB/s", "vs sum", "note"):
        t.add_column(c, justify="left" if c in ("shape", "way", "note") else "right")
    faster = []
    for name in shapes:
        for r in rows_list:
            group = [x for x in rows if x["shape"] == name and x["rows"] == r]
            ref = group[0]["GB/s"]
            for x in group:
                x["vs_sum"] = x["GB/s"] / ref if x["GB/s"] else None
                if x["vs_sum"] and x["vs_sum"] > _SLACK:
                    faster.append(f"{name.split(' [')[0]} rows={r} {x['way']} {x['GB/s']:.1f} GB/s")
                t.add_row(name, str(r), x["way"], "-" if x["ms"] is None else f"{x['ms']:.3f}",
                          "-" if x["GB/s"] is None else f"{x['GB/s']:.1f}",
                          "-" if x["vs_sum"] is None else f"{x['vs_sum']:.2f}", x["note"])
    console.print(t)
    if faster:
        console.print("[bold]faster than a sum over the same weights[/bold] (so a sum-based floor is too low a bar "
                      "on this host): " + "; ".join(faster))
    return {"model": model, "threads": torch.get_num_threads(), "rows": rows, "faster_than_sum": faster}
