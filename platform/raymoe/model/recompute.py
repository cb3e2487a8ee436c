"""Activation recomputation in the DeepSeek-V3 manner (report §3.2.3): keep less for backward, recompute it there.

``train.recompute`` picks one of three modes for every decoder block (main layers and MTP blocks):

* ``none``: autograd keeps what each op saves.
* ``selective`` (V3's choice): the outputs of RMSNorm and of MLA's up-projections are not stored. What gets stored
  instead is what those ops needed as input, which backward keeps anyway:

  - every RMSNorm whose output feeds a GEMM (``input_layernorm`` → q_a/kv_a projections,
    ``post_attention_layernorm`` → router, experts, shared experts / dense FFN): the GEMMs' saved input (the norm's
    output ``[B, T, D]``) is replaced by a recipe, and backward recomputes ``norm(x)`` from ``x`` and the weight,
    which the norm itself saved;
  - MLA's up-projections (``q_b_proj(q_a_layernorm(c_q))``, ``kv_b_proj(kv_a_layernorm(c_kv))``, RoPE, the
    per-head layout): attention's saved per-head ``q [BH, T, N+R]``, ``k [BH, T, N+R]``, ``v [BH, T, V]`` are
    replaced by the latents ``c_q [B, T, q_lora]``, ``c_kv [B, T, C]``, ``k_pe [B, T, R]`` (which the
    up-projection GEMMs saved anyway), and backward recomputes them: one extra up-projection GEMM pair per layer
    for ``H·(2·(N+R)+V)`` values per token not kept (V3: 128·(2·192+128) = 65,536 against 1,536 + 512 + 64).

  The recomputed tensors are the forward's bit for bit (same kernels, same inputs), so gradients are unchanged.
  Under bf16 autocast an RMSNorm's output is fp32 (fp32 weight × bf16) and each GEMM after it saves autocast's own
  bf16 copy: the recipe follows that cast (a dispatch mode notes ``_to_copy`` of its targets inside the region) and
  rebuilds the copy by the same cast of the recomputed output.
* ``full``: a block keeps only its input; backward re-runs its whole forward (``torch.utils.checkpoint``,
  non-reentrant). MoE blocks under expert parallelism repeat their all-to-alls in the recompute, in the same order
  on every rank of the ep group (backward visits blocks in the same order everywhere). The recompute must not count
  routing twice: :func:`recomputing` is true while it runs, and routing statistics are not collected then.

Mechanism for ``selective``: :class:`SavedAsRecipe`, a ``torch.autograd.graph.saved_tensors_hooks`` pair that stores,
for the listed tensors, a token instead of the tensor and rebuilds them (all at once, no grad, the forward's
autocast state) on first unpack; other saved tensors pass to the enclosing hooks (e.g. an activation meter).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["RECOMPUTE_MODES", "SavedAsRecipe", "norm_then", "recomputing", "recompute_context", "set_recompute"]

RECOMPUTE_MODES = ("none", "selective", "full")

_state = threading.local()


def recomputing() -> bool:
    """True while a ``full``-mode block re-runs its forward inside backward."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def recompute_context() -> Iterator[None]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.dtype, t.device)


def _outer_hooks() -> Optional[tuple[Callable, Callable]]:
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top if top is not None and top[0] is not None else None


class _CastWatch(TorchDispatchMode):
    """Under autocast: notes the dtype casts (``aten._to_copy``) made of a recipe's targets inside its region, so
    that a GEMM's saved bf16 copy of a norm output is rebuilt (recompute, then the same cast) instead of kept. The
    copies are held until the region ends, so no other tensor can take their address meanwhile."""

    def __init__(self, owner: "SavedAsRecipe") -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            self.owner._note_cast(args[0], out)
        return out


class SavedAsRecipe(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, a saved tensor that is one of ``targets`` or a view of one (same storage and dtype) is
    stored as a token (its shape, strides and offset); the first unpack calls ``rebuild()`` (no grad, under the
    autocast state of the forward), which must return tensors laid out like ``targets``, in order, and the saved
    view is taken of those. Under autocast, a dtype cast of a target made inside the context (autocast's copy for a
    GEMM) is treated the same way: rebuilt by the same cast of the rebuilt target. Everything else goes to the
    enclosing hooks, if any.

    Args:
        targets: the tensors not to keep (typically the outputs of a cheap op that a GEMM saves as input).
        rebuild: recomputes them from tensors that backward keeps anyway.
    """

    def __init__(self, targets: Sequence[torch.Tensor], rebuild: Callable[[], Sequence[torch.Tensor]]) -> None:
        self._keys = {_key(t): i for i, t in enumerate(targets)}
        self._layouts = [(tuple(t.shape), t.stride(), t.storage_offset()) for t in targets]
        self._rebuild = rebuild
        self._cache: Optional[Sequence[torch.Tensor]] = None
        dev = targets[0].device.type if targets else "cpu"
        self._autocast = (dev, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None
        outer = _outer_hooks()
        self._outer_pack, self._outer_unpack = outer if outer is not None else (None, None)
        self._casts: dict[tuple, tuple[int, tuple, torch.dtype]] = {}  # cast copy -> (target, source view, dtype)
        self._held: list[torch.Tensor] = []
        self._cast_cache: dict[tuple, torch.Tensor] = {}
        self._watch = _CastWatch(self) if self._autocast is not None else None
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> "SavedAsRecipe":
        super().__enter__()
        if self._watch is not None:
            self._watch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watch is not None:
            self._watch.__exit__(*exc)
        self._held = []
        super().__exit__(*exc)

    def _note_cast(self, src: torch.Tensor, out: torch.Tensor) -> None:
        i = self._keys.get(_key(src))
        if i is not None and out.dtype != src.dtype:
            view = (tuple(src.shape), src.stride(), src.storage_offset() - self._layouts[i][2])
            self._casts[_key(out)] = (i, view, out.dtype)
            self._held.append(out)

    def _pack(self, t: torch.Tensor) -> Any:
        i = self._keys.get(_key(t))
        if i is not None:
            return _Token(self, i, tuple(t.shape), t.stride(), t.storage_offset() - self._layouts[i][2])
        cast = self._casts.get(_key(t))
        if cast is not None:
            return _Token(self, cast, tuple(t.shape), t.stride(), t.storage_offset())
        return t if self._outer_pack is None else (_Outer, self._outer_pack(t))

    def _cast(self, cast: tuple[int, tuple, torch.dtype]) -> torch.Tensor:
        if cast not in self._cast_cache:
            i, (shape, stride, offset), dtype = cast
            base = self._tensor(i)
            self._cast_cache[cast] = base.as_strided(shape, stride, base.storage_offset() + offset).to(dtype)
        return self._cast_cache[cast]

    def _unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, _Token):
            return obj.get()
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] is _Outer:
            return self._outer_unpack(obj[1])
        return obj

    def _tensor(self, i: int) -> torch.Tensor:
        if self._cache is None:
            ctx = torch.autocast(self._autocast[0], dtype=self._autocast[1]) if self._autocast else \
                contextlib.nullcontext()
            with torch.no_grad(), ctx:
                cache = tuple(self._rebuild())
            got = [(tuple(t.shape), t.stride()) for t in cache]
            if got != [lay[:2] for lay in self._layouts]:
                raise RuntimeError(f"recomputed tensors are laid out as {got}, the forward's as "
                                   f"{[lay[:2] for lay in self._layouts]}")
            self._cache = cache
        return self._cache[i]


class _Outer:
    """Marks a value packed by the enclosing hooks."""


class _Token:
    __slots__ = ("owner", "index", "shape", "stride", "offset")

    def __init__(self, owner: SavedAsRecipe, index: Any, shape: tuple, stride: tuple, offset: int) -> None:
        self.owner, self.index, self.shape, self.stride, self.offset = owner, index, shape, stride, offset

    def get(self) -> torch.Tensor:
        idx = self.index
        base = self.owner._tensor(idx) if isinstance(idx, int) else self.owner._cast(idx)
        return base.as_strided(self.shape, self.stride, base.storage_offset() + self.offset)


def norm_then(norm: torch.nn.Module, x: torch.Tensor, consumer: Callable[[torch.Tensor], Any]) -> Any:
    """``consumer(norm(x))`` where the GEMM(s) inside ``consumer`` do not keep ``norm(x)``: backward recomputes it
    from ``x`` (which the norm saved). Without grad, just the composition."""
    y = norm(x)
    if not torch.is_grad_enabled():
        return consumer(y)
    with SavedAsRecipe([y], lambda: [norm(x)]):
        return consumer(y)


def set_recompute(model: torch.nn.Module, mode: str) -> int:
    """Set ``mode`` (one of ``RECOMPUTE_MODES``) on every decoder block of ``model``; returns how many."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={mode!r}; allowed: {', '.join(RECOMPUTE_MODES)}")
    from raymoe.model.transformer import DecoderLayer

    n = 0
    for m in model.modules():
        if isinstance(m, DecoderLayer):
            m.recompute = mode
            m.self_attn.recompute_up_proj = mode == "selective"
            n += 1
    return n
