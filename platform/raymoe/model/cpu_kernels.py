"""Native CPU kernels for decode-shaped products (``cpu_kernels.c``), built on first use for the host that runs them.

Why: a decode step multiplies a few rows (one per sequence, ~2 per routed expert) by weights that must be streamed
from memory, in dozens of small ops per layer. At 1–4 rows the BLAS torch calls (MKL) reads those weights at a
fraction of the machine's streaming read rate (5–10 GB/s against 20–23 GB/s for a ``sum`` over the same tensors on
the 2-core AMD EPYC dev host; ``python -m raymoe.jobs.bench gemm_read``, its ``native`` rows), and at 16 rows it
runs at 25–44 GFLOP/s of a 95–99 GFLOP/s peak. The kernels:

* ``rm_linear`` (:func:`linear`): ``x · Wᵀ`` for ``W [N, K]``, one weight row at a time against all the rows of ``x``
  (one sequential stream: 16–22 GB/s at 1–2 rows), 4×4 register tiles from 8 rows on;
* ``rm_linear_packed`` (:func:`pack`, :func:`linear_packed`): the same product on a copy of ``W`` packed in column
  panels ``[⌈N/w⌉, K, w]`` (``w`` = 1 vector with AVX-512, 2 with AVX2), up to 16 rows (6 with AVX2) broadcast
  against each panel in one pass, no horizontal sums: the lm_head ``[8192, 512]`` at 16 rows with its weights streamed
  from memory runs at 82–85 GFLOP/s on one thread, where the two 8-row passes this replaced ran at 64–67 (the first
  stalled on reads) and MKL at 36; 144 on two threads (``bench gemm_read rows=16``, its ``native packed`` row);
* ``rm_experts`` (:func:`experts`) / ``rm_moe_routed`` (:func:`moe_routed`): a layer's routed SwiGLU experts over
  their grouped rows (or with dispatch and weighted combine) in one call, skipping untouched experts;
* ``rm_route`` (:func:`route`): DeepSeek-V3's group-limited top-k selection from the sigmoid scores;
* ``rm_mla_decode`` (:func:`mla_decode`, :func:`mla_decode_absorbed`): absorbed MLA decode attention of each row
  against its own keys where they lie in a paged latent cache (no gathered copy, no mask);
* ``rm_rms_norm`` (:func:`rms_norm`), ``rm_rope`` (:func:`rope`: a decode batch's RoPE).

Build: ``$CC`` (else ``cc``/``gcc``) with ``-O3 -march=native -shared -fPIC -std=gnu11 -ffp-contract=fast`` (gnu11:
ISO C mode turns off the fused multiply-adds the products rely on), into ``$RAYMOE_KERNEL_CACHE`` (else
``$XDG_CACHE_HOME/raymoe/kernels`` or ``~/.cache/raymoe/kernels``), one file per (source, compiler, flags, CPU flags)
so a cluster's nodes and a shared home directory never mix builds; written to a temporary name and renamed, so
concurrent builds (several replicas on one node) are safe. Under a second; nothing is downloaded.
``$RAYMOE_KERNEL_MARCH`` overrides ``-march`` (the tests build ``x86-64-v3`` and ``x86-64-v2`` to cover the AVX2 and
SSE paths on an AVX-512 host). No compiler, a non-x86-64 or non-Linux host, or a failed build: :func:`available` is
False, :func:`why_unavailable` says why (logged once), and every caller keeps its torch path
(``engine.cpu_kernels: on`` makes that an error instead).

Scope and numerics: fp32, CPU tensors, no autograd (serving only). Sums are accumulated in another order than the
BLAS: results agree to rounding (each kernel is tested against torch), not bit for bit.

Threads: built with OpenMP (``-fopenmp``; ``$RAYMOE_KERNEL_OPENMP=0`` or a compiler without it builds them
single-threaded), each kernel splits its outer loop over torch's intra-op thread count (:func:`torch.get_num_threads`,
read on every call): the panels of a packed weight, the touched experts of a MoE layer, the rows of a decode batch,
the heads of a per-head product. Each output is still computed by one thread in one order, so results do not depend on
the thread count (tested bit for bit). The build needs ``libgomp.so.1``, the soname of the OpenMP runtime torch loads
itself, so the kernels run on torch's own thread pool rather than a second one competing with it. A single-threaded
build under several intra-op threads takes only the products the BLAS cannot parallelise well (:func:`row_limit`).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform as _platform  # the stdlib module (this package's own platform/ folder is not a package)
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import NamedTuple, Optional

import torch

__all__ = ["available", "why_unavailable", "vector_width", "row_limit", "library_path", "linear", "PackedWeight",
           "pack", "panel_width", "linear_packed", "swiglu_packed", "experts", "moe_routed", "route", "rms_norm", "rope", "mla_decode",
           "mla_decode_absorbed", "mla_decode_layer", "moe_layer", "threaded", "ROW_LIMIT", "EXPERT_ROW_LIMIT", "MEMORY_BOUND_ROWS"]

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.c")
ABI_VERSION = 13
# Rows up to which the kernels replace F.linear on one intra-op thread. Time of MKL's F.linear over rm_linear's on the
# dev host (weights rotated through 256 MB so they stream from memory, as in `bench gemm_read`): 1.5-2.0x at 1 row,
# 2.1-4.3x at 2, 1.6-2.3x at 4, 1.0-1.2x at 8, 0.97-1.2x at 16 (decode shapes of the small model and its lm_head);
# rm_linear_packed, which dense linears use, is 1.4-2.8x rm_linear at 8-16 rows.
ROW_LIMIT = 16
# The same for one routed expert's rows inside rm_experts (which also saves a Python call per expert).
EXPERT_ROW_LIMIT = 16
MEMORY_BOUND_ROWS = 2  # with several intra-op threads: only products this small (the BLAS parallelises the rest)
# gnu11, not c11: ISO mode turns floating-point contraction off, and the products need fused multiply-adds
FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=fast")
# OpenMP for the kernels' threads: the build then needs libgomp.so.1, the soname torch's own OpenMP runtime has, so the
# loader hands the kernels torch's runtime (one thread pool for both). A compiler without OpenMP: built without it;
# $RAYMOE_KERNEL_OPENMP=0 asks for that.
OPENMP_FLAG = "-fopenmp"


def _openmp_flags() -> tuple[str, ...]:
    return () if os.environ.get("RAYMOE_KERNEL_OPENMP", "1").strip().lower() in ("0", "false", "off", "no") \
        else (OPENMP_FLAG,)


def _march() -> str:
    """``-march`` of the build: ``$RAYMOE_KERNEL_MARCH`` (e.g. ``x86-64-v3`` for an AVX2 build on an AVX-512 host, as
    the tests do to cover every vector path), else ``native``."""
    return os.environ.get("RAYMOE_KERNEL_MARCH") or "native"

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_tried = False
_threads = 1  # the kernels' thread count last set (rm_set_threads)
_openmp = False  # the build splits its loops over threads


def _cache_dir() -> pathlib.Path:
    d = os.environ.get("RAYMOE_KERNEL_CACHE")
    if d:
        return pathlib.Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "raymoe" / "kernels"


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return _platform.processor()


def library_path() -> pathlib.Path:
    """Where this host's build lives (whether or not it exists yet)."""
    cc = _compiler() or "none"
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        ver = ""
    h = hashlib.sha256()
    flags = " ".join((*FLAGS, *_openmp_flags(), f"-march={_march()}"))
    for part in (SOURCE.read_bytes(), cc.encode(), ver.encode(), flags.encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return _cache_dir() / f"raymoe_cpu_kernels-{h.hexdigest()[:20]}.so"


def _build(out: pathlib.Path) -> None:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        base = [cc, *FLAGS, f"-march={_march()}", str(SOURCE), "-o", tmp]
        r = subprocess.run([*base[:1], *_openmp_flags(), *base[1:], "-lm"], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0 and _openmp_flags():  # no OpenMP with this compiler: single-threaded kernels
            log.info("CPU kernels: %s %s failed, building without threads", cc, OPENMP_FLAG)
            r = subprocess.run([*base, "-lm"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _error, _tried, _openmp
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if not sys.platform.startswith("linux") or _platform.machine() not in ("x86_64", "AMD64"):
                raise RuntimeError(f"built for x86-64 Linux only, this is {sys.platform}/{_platform.machine()}")
            path = library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
            if lib.rm_abi_version() != ABI_VERSION:
                raise RuntimeError(f"{path} has ABI {lib.rm_abi_version()}, expected {ABI_VERSION}")
            L, P = ctypes.c_long, ctypes.c_void_p
            lib.rm_linear.argtypes = [P, L, L, L, P, L, P, L]
            lib.rm_linear.restype = None
            lib.rm_experts.argtypes = [P, P, L, L, L, P, P, P, P, L]
            lib.rm_experts.restype = None
            lib.rm_mla_decode.argtypes = [P, L, L, L, L, P, P, L, P, ctypes.c_float, P, P]
            lib.rm_mla_decode.restype = None
            lib.rm_linear_packed.argtypes = [P, L, L, L, P, L, P, L]
            lib.rm_linear_packed.restype = None
            lib.rm_swiglu_packed.argtypes = [P, L, L, L, P, L, P, P, P]
            lib.rm_swiglu_packed.restype = None
            lib.rm_per_head.argtypes = [P, L, L, L, L, L, P, L, L, P, L, L]
            lib.rm_per_head.restype = None
            Fl = ctypes.c_float
            lib.rm_mla_decode_layer.argtypes = [P, L, L, L, P, L, L, L, P, P, Fl, Fl, P, L, L, P, P, P, P, P, L, P, Fl,
                                                P, P, L, L, P, L, P, L, P]
            lib.rm_mla_decode_layer.restype = None
            lib.rm_moe_layer.argtypes = [P, L, L, P, L, P, L, L, L, Fl, ctypes.c_int, L, P, P, L, P, L, P, P, P, P, P,
                                         P, P]
            lib.rm_moe_layer.restype = ctypes.c_int
            lib.rm_route.argtypes = [P, P, L, L, L, L, L, ctypes.c_float, ctypes.c_int, P, P, P]
            lib.rm_route.restype = None
            lib.rm_moe_routed.argtypes = [P, L, L, P, P, L, P, L, L, P, P, P, P]
            lib.rm_moe_routed.restype = None
            lib.rm_rms_norm.argtypes = [P, L, L, L, P, ctypes.c_float, P]
            lib.rm_rms_norm.restype = None
            lib.rm_rope.argtypes = [P, L, L, L, L, L, P, P, P]
            lib.rm_rope.restype = None
            lib.rm_set_threads.argtypes = [ctypes.c_int]
            lib.rm_set_threads.restype = None
            _openmp = bool(lib.rm_openmp())
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: keep the torch path, say why
            _error = f"{type(e).__name__}: {e}"
            log.warning("raymoe CPU kernels unavailable, using torch's GEMMs: %s", _error)
        _tried = True
    return _lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def why_unavailable() -> Optional[str]:
    """None when :func:`available`, else the reason."""
    _load()
    return _error


def vector_width() -> int:
    """Floats per SIMD vector the build uses (16 with AVX-512, 8 with AVX2)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable: {_error}")
    return int(lib.rm_vector_width())


def threaded() -> bool:
    """Whether this build splits its kernels over torch's intra-op threads (built with OpenMP)."""
    return _load() is not None and _openmp


def _kernels() -> Optional[ctypes.CDLL]:
    """The loaded kernels, their thread count set to torch's intra-op thread count (:func:`torch.get_num_threads`,
    which a serving replica leaves at the node's cores and the benches set)."""
    global _threads
    lib = _load()
    if lib is not None:
        n = torch.get_num_threads()
        if n != _threads:
            lib.rm_set_threads(n)
            _threads = n
    return lib


def _nthreads() -> int:
    """Threads the next kernel call may use (its scratch has a slice per thread)."""
    return _threads if threaded() else 1


def row_limit(experts: bool = False) -> int:
    """The most rows :func:`linear` (``experts``: one expert in :func:`experts`) takes: ``ROW_LIMIT``
    (``EXPERT_ROW_LIMIT``) when the kernels run on one intra-op thread or are threaded themselves; a single-threaded
    build under several intra-op threads takes only ``MEMORY_BOUND_ROWS``, leaving the compute-bound products to the
    parallel BLAS."""
    if torch.get_num_threads() != 1 and not threaded():
        return MEMORY_BOUND_ROWS
    return EXPERT_ROW_LIMIT if experts else ROW_LIMIT


def _eligible(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


def _rows(x: torch.Tensor, K: int, max_rows: Optional[int]) -> Optional[tuple[torch.Tensor, int, int]]:
    """``x [..., K]`` as ``(rows [M, K] with unit column stride, M, row stride)`` for a few-row kernel, or None when
    it has no rows or more than ``max_rows`` (default :func:`row_limit`)."""
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0 or M > (row_limit() if max_rows is None else max_rows):
        return None
    if x2.stride(-1) != 1 or (M > 1 and x2.stride(0) < K):
        x2 = x2.contiguous()
    return x2, M, x2.stride(0) if M > 1 else K


def _routable(E: int, n_group: int, topk_group: int, top_k: int) -> bool:
    """Whether ``rm_route`` takes this routing: ``E <= 1024`` experts in ``n_group`` equal groups, ``top_k`` of those
    in the kept groups."""
    return (E <= 1024 and n_group >= 1 and E % n_group == 0
            and 1 <= top_k <= (topk_group if n_group > 1 and topk_group < n_group else n_group) * (E // n_group))


def _slots_and_lens(slots_NS: torch.Tensor, lens_N: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's key slots and key count as contiguous int64; raises unless every row sees 1..S keys."""
    S = slots_NS.shape[1]
    slots = slots_NS.to(dtype=torch.int64).contiguous()
    lens = lens_N.to(dtype=torch.int64).contiguous()
    if lens.numel() and (int(lens.min()) < 1 or int(lens.max()) > S):
        raise ValueError(f"{what}: every row must see 1..{S} keys, got lengths {lens.tolist()}")
    return slots, lens


def linear(x: torch.Tensor, w: torch.Tensor, max_rows: Optional[int] = None) -> Optional[torch.Tensor]:
    """``F.linear(x, w)`` (``x [..., K]``, ``w [N, K]`` contiguous) through ``rm_linear`` when ``x`` has at most
    ``max_rows`` (default :func:`row_limit`) rows and both are fp32 CPU tensors; None otherwise (the caller runs its
    own path). No autograd: call it under ``torch.no_grad()`` / inference."""
    lib = _kernels()
    K = x.shape[-1]
    if lib is None or w.dim() != 2 or w.shape[1] != K or not w.is_contiguous() or not _eligible(x, w):
        return None
    rows = _rows(x, K, max_rows)
    if rows is None:
        return None
    x2, M, ldx = rows
    N = w.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    lib.rm_linear(x2.data_ptr(), M, K, ldx, w.data_ptr(), N, y.data_ptr(), N)
    return y.view(*x.shape[:-1], N)


class PackedWeight(NamedTuple):
    """A linear's ``[N, K]`` weight in column panels ``[ceil(N / w), K, w]`` (``w`` = :func:`panel_width`, the last
    panel zero-padded): the layout ``rm_linear_packed`` streams."""

    panels: torch.Tensor
    N: int
    K: int


def panel_width() -> int:
    """Columns per panel of :func:`pack` in this build (16 with AVX-512: one vector; 16 with AVX2 and 8 with
    SSE: two)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable: {_error}")
    return int(lib.rm_panel_width())


def pack(w: torch.Tensor) -> Optional[PackedWeight]:
    """``w [N, K]`` (fp32, CPU) → :class:`PackedWeight` (a copy); None when the kernels or the tensor do not fit."""
    if _load() is None or w.dim() != 2 or not _eligible(w):
        return None
    N, K = w.shape
    nr = panel_width()
    n_pad = -(-N // nr) * nr
    with torch.no_grad():
        wp = w.detach()
        if n_pad != N:
            wp = torch.cat([wp, wp.new_zeros(n_pad - N, K)])
        panels = wp.reshape(n_pad // nr, nr, K).transpose(1, 2).contiguous()
    return PackedWeight(panels, N, K)


def linear_packed(x: torch.Tensor, pw: PackedWeight, max_rows: Optional[int] = None) -> Optional[torch.Tensor]:
    """``F.linear(x, w)`` for the weight packed as ``pw`` (:func:`pack`), through ``rm_linear_packed``, when ``x``
    (``[..., K]``, fp32 CPU) has at most ``max_rows`` (default :func:`row_limit`) rows; None otherwise."""
    lib = _kernels()
    K = pw.K
    if lib is None or x.shape[-1] != K or not _eligible(x):
        return None
    rows = _rows(x, K, max_rows)
    if rows is None:
        return None
    x2, M, ldx = rows
    y = torch.empty(M, pw.N, dtype=torch.float32)
    lib.rm_linear_packed(x2.data_ptr(), M, K, ldx, pw.panels.data_ptr(), pw.N, y.data_ptr(), pw.N)
    return y.view(*x.shape[:-1], pw.N)


def swiglu_packed(x: torch.Tensor, gate_up: PackedWeight, down: PackedWeight,
                  max_rows: Optional[int] = None) -> Optional[torch.Tensor]:
    """A dense SwiGLU ``down(silu(gate(x)) ⊙ up(x))`` in one call, ``gate_up`` the packing of ``[W_gate; W_up]``
    (``[2I, D]``) and ``down`` of ``W_down`` (``[D, I]``), when ``x [..., D]`` has at most ``max_rows`` (default
    :func:`row_limit`) rows; None otherwise."""
    lib = _kernels()
    D, I = gate_up.K, down.K  # noqa: E741
    if lib is None or x.shape[-1] != D or gate_up.N != 2 * I or down.N != D or not _eligible(x):
        return None
    rows = _rows(x, D, max_rows)
    if rows is None:
        return None
    x2, M, ldx = rows
    y = torch.empty(M, D, dtype=torch.float32)
    scratch = torch.empty(M * 3 * I, dtype=torch.float32)
    lib.rm_swiglu_packed(x2.data_ptr(), M, D, ldx, gate_up.panels.data_ptr(), I, down.panels.data_ptr(), y.data_ptr(),
                         scratch.data_ptr())
    return y.view(*x.shape[:-1], D)


def experts(x_ND: torch.Tensor, counts_E: torch.Tensor, w_gu: torch.Tensor, w_dn: torch.Tensor,
            max_rows: Optional[int] = None) -> Optional[tuple[torch.Tensor, list[int]]]:
    """Routed SwiGLU experts over rows grouped by expert (``counts_E[e]`` consecutive rows for expert ``e``):
    ``w_gu [E, 2I, D]`` (gate rows, then up rows), ``w_dn [E, D, I]``, both contiguous fp32. Returns ``y [N, D]``
    (unweighted) and the experts it left to the caller: those with more than ``max_rows`` rows (default
    :func:`row_limit`), whose rows of ``y`` are uninitialised. None when the kernels are unavailable or the tensors
    do not fit (the caller runs its own path)."""
    lib = _kernels()
    if lib is None or not _eligible(x_ND, w_gu, w_dn) or not (w_gu.is_contiguous() and w_dn.is_contiguous()):
        return None
    E, D, I = w_dn.shape  # noqa: E741
    if w_gu.shape != (E, 2 * I, D) or x_ND.dim() != 2 or x_ND.shape[1] != D or counts_E.numel() != E:
        return None
    limit = row_limit(experts=True) if max_rows is None else max_rows
    x = x_ND.contiguous()
    counts = counts_E.to(device="cpu", dtype=torch.int64).contiguous()
    cl = counts.tolist()
    if sum(cl) != x.shape[0] or any(c < 0 for c in cl):
        raise ValueError(f"expert row counts {cl} do not add up to x's {x.shape[0]} rows")
    y = torch.empty(x.shape[0], D, dtype=torch.float32)
    done = [c for c in cl if c <= limit]
    if any(done):
        scratch = torch.empty(_nthreads() * max(done) * 3 * I, dtype=torch.float32)
        lib.rm_experts(x.data_ptr(), counts.data_ptr(), E, D, I, w_gu.data_ptr(), w_dn.data_ptr(), y.data_ptr(),
                       scratch.data_ptr(), limit)
    return y, [e for e, c in enumerate(cl) if c > limit]


def route(scores_TE: torch.Tensor, bias_E: torch.Tensor, n_group: int, topk_group: int, top_k: int, scale: float,
          norm: bool) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The expert choice of :func:`raymoe.model.moe.route` from its sigmoid scores ``[T, E]`` (fp32): ``(topk_idx
    [T, k] int64, topk_weight [T, k], counts [E] int64)``, the chosen experts in descending biased score. Same sets
    as torch's ``topk`` (on equal scores the lower expert id wins; torch leaves that order unspecified) and the same
    gates up to the order of one k-term sum. None when the kernels or the shapes do not fit."""
    lib = _kernels()
    if lib is None or not _eligible(scores_TE, bias_E) or scores_TE.dim() != 2:
        return None
    T, E = scores_TE.shape
    if bias_E.numel() != E or not _routable(E, n_group, topk_group, top_k):
        return None
    sc, b = scores_TE.contiguous(), bias_E.contiguous()
    idx = torch.empty(T, top_k, dtype=torch.int64)
    w = torch.empty(T, top_k, dtype=torch.float32)
    counts = torch.empty(E, dtype=torch.int64)
    lib.rm_route(sc.data_ptr(), b.data_ptr(), T, E, n_group, topk_group, top_k, float(scale), int(bool(norm)),
                 idx.data_ptr(), w.data_ptr(), counts.data_ptr())
    return idx, w, counts


def moe_routed(x_TD: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, counts_E: torch.Tensor,
               w_gu: torch.Tensor, w_dn: torch.Tensor, max_rows: Optional[int] = None) -> Optional[torch.Tensor]:
    """A MoE layer's routed part in one call: ``y[t] = Σ_k topk_weight[t, k] · expert_{topk_idx[t, k]}(x[t])``
    (dispatch, :func:`experts`, weighted combine), ``w_gu [E, 2I, D]``, ``w_dn [E, D, I]`` contiguous fp32.
    ``counts_E`` must be the routing's tokens per expert. None when the kernels or the tensors do not fit, or when an
    expert has more than ``max_rows`` (default :func:`row_limit` for experts) rows: the caller's grouped path then
    runs it (the BLAS is faster on many rows)."""
    lib = _kernels()
    if (lib is None or not _eligible(x_TD, topk_weight, w_gu, w_dn)
            or not (w_gu.is_contiguous() and w_dn.is_contiguous())):
        return None
    E, D, I = w_dn.shape  # noqa: E741
    T, K = topk_idx.shape
    if w_gu.shape != (E, 2 * I, D) or x_TD.shape != (T, D) or topk_weight.shape != (T, K) or counts_E.numel() != E:
        return None
    counts = counts_E.to(dtype=torch.int64).contiguous()
    cl = counts.tolist()
    if sum(cl) != T * K:
        raise ValueError(f"expert counts add up to {sum(cl)}, the routing has {T * K} (token, expert) pairs")
    cmax = max(cl, default=0)
    if cmax > (row_limit(experts=True) if max_rows is None else max_rows):
        return None
    idx = topk_idx.to(dtype=torch.int64).contiguous()
    if T * K and (int(idx.min()) < 0 or int(idx.max()) >= E):
        raise ValueError(f"expert ids must be in 0..{E - 1}")
    x, w = x_TD.contiguous(), topk_weight.to(torch.float32).contiguous()
    y = torch.empty(T, D, dtype=torch.float32)
    scratch = torch.empty(T * K * D + _nthreads() * cmax * (2 * D + 3 * I) + 1, dtype=torch.float32)
    lib.rm_moe_routed(x.data_ptr(), T, D, idx.data_ptr(), w.data_ptr(), K, counts.data_ptr(), E, I, w_gu.data_ptr(),
                      w_dn.data_ptr(), y.data_ptr(), scratch.data_ptr())
    return y


def moe_layer(x_TD: torch.Tensor, gate: PackedWeight, bias_E: torch.Tensor, n_group: int, topk_group: int,
              top_k: int, scale: float, norm: bool, w_gu: torch.Tensor, w_dn: torch.Tensor,
              shared: Optional[tuple[PackedWeight, PackedWeight]], max_rows: Optional[int] = None):
    """A MoE layer's decode forward in one call: the router's sigmoid scores from the packed gate, the selection of
    :func:`route`, the routed experts as :func:`moe_routed` and the shared expert as :func:`swiglu_packed` (``shared``
    = its packed ``[gate; up]`` and ``down``, or None: the caller adds it). Returns ``(y [T, D] or None, topk_idx,
    topk_weight, scores, counts)``: y is None when an expert got more than ``max_rows`` (default :func:`row_limit`
    for experts) rows (the routing stands; the caller's grouped path runs the experts and the shared expert). None
    when the kernels or the tensors do not fit."""
    lib = _kernels()
    if lib is None or x_TD.dim() != 2 or not _eligible(x_TD, bias_E, w_gu, w_dn):
        return None
    T, D = x_TD.shape
    E, _, I = w_dn.shape  # noqa: E741
    if (T == 0 or gate.K != D or gate.N != E or bias_E.numel() != E or w_gu.shape != (E, 2 * I, D)
            or w_dn.shape != (E, D, I) or not (w_gu.is_contiguous() and w_dn.is_contiguous())
            or not _routable(E, n_group, topk_group, top_k)):
        return None
    Ish = 0
    if shared is not None:
        gu, dn = shared
        Ish = dn.K
        if gu.K != D or gu.N != 2 * Ish or dn.N != D:
            return None
    limit = row_limit(experts=True) if max_rows is None else max_rows
    x = x_TD.contiguous()
    b = bias_E.to(torch.float32).contiguous()
    scores = torch.empty(T, E, dtype=torch.float32)
    idx = torch.empty(T, top_k, dtype=torch.int64)
    tw = torch.empty(T, top_k, dtype=torch.float32)
    counts = torch.empty(E, dtype=torch.int64)
    y = torch.empty(T, D, dtype=torch.float32)
    n = max(T * top_k * D + _nthreads() * min(T, limit) * (2 * D + 3 * I), T * D + T * 3 * Ish) + 1
    scratch = torch.empty(n, dtype=torch.float32)
    rc = lib.rm_moe_layer(x.data_ptr(), T, D, gate.panels.data_ptr(), E, b.data_ptr(), n_group, topk_group, top_k,
                          float(scale), int(bool(norm)), limit, w_gu.data_ptr(), w_dn.data_ptr(), I,
                          shared[0].panels.data_ptr() if shared else None, Ish,
                          shared[1].panels.data_ptr() if shared else None, scores.data_ptr(), idx.data_ptr(),
                          tw.data_ptr(), counts.data_ptr(), y.data_ptr(), scratch.data_ptr())
    return (y if rc == 0 else None), idx, tw, scores, counts


def mla_decode(q_NHK: torch.Tensor, buf: torch.Tensor, slots_NS: torch.Tensor, lens_N: torch.Tensor, scale: float,
               C: int) -> Optional[torch.Tensor]:
    """Absorbed MLA decode attention read straight from a paged latent cache: row ``i``'s ``H`` queries
    ``q [N, H, C+R]`` against the keys in cache rows ``slots[i, :lens[i]]`` of ``buf [*, C+R]`` (its own sequence's
    positions ``0..lens[i]-1``), values their first ``C`` floats → ``[N, H, C]`` = ``softmax(scale·q·kᵀ)·c``. Only a
    row's visible keys are read (no gathered copy, no mask), so a non-finite latent reaches only the rows that see it
    (their output is NaN, as torch's softmax makes it). None when the kernels or the tensors do not fit."""
    lib = _kernels()
    if lib is None or not _eligible(q_NHK, buf) or not buf.is_contiguous() or q_NHK.dim() != 3:
        return None
    N, H, Dk = q_NHK.shape
    if buf.dim() != 2 or buf.shape[1] != Dk or not 0 < C <= Dk or slots_NS.dim() != 2 or slots_NS.shape[0] != N:
        return None
    S = slots_NS.shape[1]
    slots, lens = _slots_and_lens(slots_NS, lens_N, "mla_decode")
    q = q_NHK.contiguous()
    out = torch.empty(N, H, C, dtype=torch.float32)
    scratch = torch.empty(max(_nthreads() * H * S, 1), dtype=torch.float32)
    lib.rm_mla_decode(q.data_ptr(), N, H, Dk, C, buf.data_ptr(), slots.data_ptr(), S, lens.data_ptr(), float(scale),
                      out.data_ptr(), scratch.data_ptr())
    return out


def mla_decode_absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk_t: torch.Tensor, w_uv: torch.Tensor,
                        buf: torch.Tensor, slots_NS: torch.Tensor, lens_N: torch.Tensor,
                        scale: float) -> Optional[torch.Tensor]:
    """The whole absorbed MLA decode attention of ``N`` query rows: ``q̃ = [q_nope·W^UK ; q_pe]`` per head, then
    :func:`mla_decode`, then the per-head ``W^UV`` up-projection → ``[N, H, V]``. ``q_nope [N, H, Dn]``,
    ``q_pe [N, H, R]``, ``w_uk_t [H, C, Dn]`` (W^UK transposed, contiguous), ``w_uv [H, V, C]`` (each head's ``V×C``
    block contiguous; heads any stride). None when the kernels or the tensors do not fit."""
    lib = _kernels()
    if lib is None or not _eligible(q_nope, q_pe, w_uk_t, w_uv) or not w_uk_t.is_contiguous():
        return None
    N, H, Dn = q_nope.shape
    C, R, V = w_uk_t.shape[1], q_pe.shape[-1], w_uv.shape[1]
    if (w_uk_t.shape != (H, C, Dn) or w_uv.shape != (H, V, C) or w_uv.stride()[1:] != (C, 1)
            or q_pe.shape[:2] != (N, H) or buf.dim() != 2 or buf.shape[1] != C + R):
        return None
    qn = q_nope.contiguous()
    q_abs = torch.empty(N, H, C + R, dtype=torch.float32)
    q_abs[..., C:] = q_pe
    lib.rm_per_head(qn.data_ptr(), N, H, Dn, H * Dn, Dn, w_uk_t.data_ptr(), C * Dn, C, q_abs.data_ptr(),
                    H * (C + R), C + R)
    o_lat = mla_decode(q_abs, buf, slots_NS, lens_N, scale, C)
    if o_lat is None:
        return None
    out = torch.empty(N, H, V, dtype=torch.float32)
    lib.rm_per_head(o_lat.data_ptr(), N, H, C, H * C, C, w_uv.data_ptr(), w_uv.stride(0), V, out.data_ptr(), H * V, V)
    return out


def mla_decode_layer(x_ND: torch.Tensor, qkv: PackedWeight, q_a_norm: tuple[torch.Tensor, float],
                     kv_a_norm: tuple[torch.Tensor, float], q_b: PackedWeight, heads: int, rope_dim: int,
                     cos: torch.Tensor, sin: torch.Tensor, buf: torch.Tensor, write_slots_N: torch.Tensor,
                     slots_NS: torch.Tensor, lens_N: torch.Tensor, scale: float, w_uk_t: torch.Tensor,
                     w_uv: torch.Tensor, o: PackedWeight) -> Optional[torch.Tensor]:
    """One MLA layer's decode forward (:class:`raymoe.model.mla.MLA` with a ``q_lora_rank``) in one call: ``x [N, D]``
    (the normed hidden state, one token per row) → ``o_proj``'s output ``[N, D_out]``. ``qkv``: the packing of
    ``[W_q_a; W_kv_a]``; ``q_a_norm`` / ``kv_a_norm``: (weight, eps) of the two latent norms; ``q_b``, ``o``: packed
    ``q_b_proj`` / ``o_proj``; ``cos/sin``: each row's RoPE (``N·R/2`` values); the row's latent ``[c ; k_pe]`` is written
    to ``buf[write_slots[i]]`` before every row attends to its keys ``buf[slots[i, :lens[i]]]`` (as
    :meth:`raymoe.engine.paged.DecodeBatch.attend_absorbed`); ``w_uk_t [H, C, Dn]`` contiguous, ``w_uv [H, V, C]``.
    None when the kernels or the tensors do not fit (nothing written then)."""
    lib = _kernels()
    if lib is None or x_ND.dim() != 2 or not _eligible(x_ND, buf, cos, sin, w_uk_t, w_uv):
        return None
    N, D = x_ND.shape
    H, R2 = heads, rope_dim
    C, Dn = w_uk_t.shape[1], w_uk_t.shape[2]
    V = w_uv.shape[1]
    QR = q_b.K
    wqn, eps_q = q_a_norm
    wkn, eps_kv = kv_a_norm
    if (N == 0 or R2 % 2 or qkv.K != D or qkv.N != QR + C + R2 or q_b.N != H * (Dn + R2) or o.K != H * V
            or w_uk_t.shape[0] != H or not w_uk_t.is_contiguous() or w_uv.shape != (H, V, C)
            or w_uv.stride()[1:] != (C, 1) or buf.dim() != 2 or buf.shape[1] != C + R2 or not buf.is_contiguous()
            or wqn.shape != (QR,) or wkn.shape != (C,) or not (wqn.is_contiguous() and wkn.is_contiguous())
            or not _eligible(wqn, wkn) or cos.numel() != N * R2 // 2 or sin.numel() != N * R2 // 2
            or slots_NS.dim() != 2 or slots_NS.shape[0] != N or write_slots_N.numel() != N):
        return None
    S = slots_NS.shape[1]
    slots, lens = _slots_and_lens(slots_NS, lens_N, "mla_decode_layer")
    ws = write_slots_N.to(dtype=torch.int64).contiguous()
    if int(ws.min()) < 0 or int(ws.max()) >= buf.shape[0]:
        raise ValueError(f"mla_decode_layer: write slots must be in 0..{buf.shape[0] - 1}")
    x, _, ldx = _rows(x_ND, D, N)
    c, s = cos.reshape(N, R2 // 2).contiguous(), sin.reshape(N, R2 // 2).contiguous()
    Dout = o.N
    y = torch.empty(N, Dout, dtype=torch.float32)
    n_scratch = (N * (QR + C + R2) + N * QR + N * H * (Dn + R2) + N * H * (C + R2) + N * H * C + N * H * V
                 + _nthreads() * H * S)
    scratch = torch.empty(n_scratch, dtype=torch.float32)
    lib.rm_mla_decode_layer(x.data_ptr(), N, D, ldx, qkv.panels.data_ptr(), QR, C, R2,
                            wqn.data_ptr(), wkn.data_ptr(), float(eps_q), float(eps_kv), q_b.panels.data_ptr(), H, Dn,
                            c.data_ptr(), s.data_ptr(), buf.data_ptr(), ws.data_ptr(), slots.data_ptr(), S,
                            lens.data_ptr(), float(scale), w_uk_t.data_ptr(), w_uv.data_ptr(), w_uv.stride(0), V,
                            o.panels.data_ptr(), Dout, y.data_ptr(), Dout, scratch.data_ptr())
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """``w · x / sqrt(mean(x², -1) + eps)`` for fp32 ``x [..., D]`` and ``w [D]`` (raymoe.model.layers.RMSNorm's
    forward, serving), in one pass per row; None when the kernels or the tensors do not fit."""
    lib = _kernels()
    D = x.shape[-1]
    if lib is None or not _eligible(x, w) or w.shape != (D,) or not w.is_contiguous() or x.numel() == 0:
        return None
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, D, dtype=torch.float32)
    lib.rm_rms_norm(x2.data_ptr(), M, D, x2.stride(0) if M > 1 else D, w.data_ptr(), float(eps), y.data_ptr())
    return y.view(x.shape)


def rope(x: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`raymoe.model.rope.apply_rope` for a decode batch: ``x [N, 1, H, 2R]`` (any strides with unit stride on
    the last dim) rotated by one ``cos/sin`` row per batch row (``[N, 1, R]`` or ``[N, R]``) → contiguous
    ``[N, 1, H, 2R]``. None when the kernels or the shapes do not fit."""
    lib = _kernels()
    if lib is None or not _eligible(x, cos_TR, sin_TR) or x.dim() != 4 or x.shape[1] != 1 or x.stride(-1) != 1:
        return None
    N, _, H, R2 = x.shape
    R = R2 // 2
    if R2 % 2 or cos_TR.numel() != N * R or sin_TR.numel() != N * R:
        return None
    c, s = cos_TR.reshape(N, R).contiguous(), sin_TR.reshape(N, R).contiguous()
    out = torch.empty(N, 1, H, R2, dtype=torch.float32)
    lib.rm_rope(x.data_ptr(), N, H, x.stride(0), x.stride(2), R, c.data_ptr(), s.data_ptr(), out.data_ptr())
    return out
