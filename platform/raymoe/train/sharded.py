"""Sharded, re-shardable training checkpoints: one safetensors file per (pipeline rank, ep rank), full-model names.

Inside a checkpoint directory (the atomic, checksummed directory of :mod:`raymoe.checkpoint`)::

    shards/pp{p}_ep{e}.safetensors   written by the dp-rank-0 rank of (p, e)
        param/<name>        the parameter, under its full-model name (``layers.3.mlp.experts.gate_proj``)
        exp_avg/<name>      AdamW first moment          (same shape as the parameter)
        exp_avg_sq/<name>   AdamW second moment
        step/<name>         AdamW step count (a 0-d fp32 tensor)
        metadata["rows"]    JSON {name: [start, stop, E]} for routed-expert tensors: the shard holds experts
                            start..stop-1 of E (dim 0); absent for full tensors
        metadata["layout"]  JSON {"pp", "ep", "dp", "schedule", "pp_rank", "ep_rank"}

Who writes what: every tensor exactly once. Dense tensors (replicated over ep × dp) come from ep rank 0; a
parameter held by several pipeline ranks (DualPipe's two copies, the MTP's embedding) from the lowest of them; an
expert slice from its ep rank. With the optimizer state replicated over dp (``parallel.zero_stage=0``) dp rank 0
has all of it and writes it as above.

Under native ZeRO-1 (``parallel.zero_stage=1``, :mod:`raymoe.train.zero`) each rank holds only flat pieces of the
AdamW moments, and every rank writes its own pieces — dp rank 0 into the file above, dp rank ``d > 0`` into
``shards/pp{p}_ep{e}_dp{d}.safetensors``::

        exp_avg/<name>      1-D: elements lo..hi-1 of the full-model tensor, flattened (row-major)
        exp_avg_sq/<name>   same range
        step/<name>         written with the piece that starts the rank's part of the tensor
        metadata["ranges"]  JSON {name: [lo, hi, numel of the full-model tensor]}

Flat ranges of the *full-model* tensor (a routed-expert shard's range starts at ``first row × row size``) name the
same elements whatever the saving layout, DP degree or bucket size, so the state is saved without gathering it on
one rank (each rank writes 1/n of it, in parallel, and no rank ever holds more than it trains with) and a loader in
any layout and either ``zero_stage`` reads exactly the elements it needs (:meth:`ShardIndex.read_flat`): from the
ranges of the pieces that cover them, or from the full / expert-row tensors of a replicated save.

Re-sharding: a loader in ANY layout indexes every shard file (names, shapes, expert row ranges; no tensor is read
yet), then reads, for each of its own parameters, the full tensor or the expert rows it owns, concatenated from
whichever files hold them. A checkpoint saved at pp=2 × ep=2 therefore resumes at pp=1 × ep=1 (and back) with
bit-identical weights and optimizer state. From an object store (``train.storage_path``, :mod:`raymoe.storage`) a
rank first reads just the headers (:func:`read_header`) and downloads only the files :func:`needed_shards` names, then
loads from that local subset. Reading a local shard file reads only the tensors and expert rows the rank holds
(:mod:`raymoe.safetensors_slices`: ranged reads, no memory map), never the whole file set. Loading never unpickles:
safetensors and JSON only. A missing tensor, a shape that does not match the model, or expert rows that do not tile
``0..E`` raise :class:`IncompatibleCheckpoint` naming the tensor and the file.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from raymoe import safetensors_slices as sts

__all__ = ["IncompatibleCheckpoint", "expert_rows", "save_rank", "load_rank", "ShardIndex", "assemble_full",
           "SHARD_PREFIX", "read_header", "needed_shards"]

SHARD_PREFIX = "shards/"

_KINDS = ("param", "exp_avg", "exp_avg_sq", "step")


class IncompatibleCheckpoint(ValueError):
    """The checkpoint does not fit the model being loaded; the message names the tensor and the file."""


def expert_rows(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """``{full param name: (start, stop, E)}`` for routed-expert parameters (which experts this rank holds)."""
    out: dict[str, tuple[int, int, int]] = {}
    E = getattr(getattr(model, "config", None), "n_routed_experts", None)
    for mname, m in model.named_modules():
        ids = getattr(m, "expert_ids", None)
        if ids is None:
            continue
        ids = list(ids)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"{mname}: expert shard ids must be contiguous, got {ids}")
        for pname, _ in m.named_parameters(recurse=False):
            out[f"{mname}.{pname}"] = (ids[0], ids[0] + len(ids), int(E) if E else len(ids))
    return out


def save_rank(model: nn.Module, optimizer: torch.optim.Optimizer, topo: Any, rank: int,
              ckpt_dir: pathlib.Path, zero: Any = None) -> list[str]:
    """Write this rank's shard (module docstring). ``zero``: the rank's :class:`raymoe.train.zero.ZeroDataParallel`
    (its AdamW state is in flat pieces, written by every rank); None: the state is replicated over dp and only dp
    rank 0 writes. Returns the files written."""
    c = topo.coords(rank)
    if c.dp_rank != 0 and zero is None:
        return []
    rows = expert_rows(model)
    tensors: dict[str, torch.Tensor] = {}
    ranges: dict[str, list[int]] = {}
    for name, p in model.named_parameters() if c.dp_rank == 0 else ():
        if name not in rows and c.ep_rank != 0:
            continue  # dense: ep rank 0 writes it
        if not topo.grad_norm_owner(name, c.pp_rank):
            continue  # a copy another pipeline rank writes
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        if zero is not None:
            continue
        st = optimizer.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"{k}/{name}"] = st[k].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).detach().cpu().reshape(())
    if zero is not None:
        full_numel = _full_numels(model, rows)
        for name, p, piece, lo, hi in zero.state_ranges():
            if not topo.grad_norm_owner(name, c.pp_rank):
                continue  # the other pipeline copy holds (and writes) the same state
            st = optimizer.state.get(piece, {})
            if "exp_avg" not in st:
                continue  # no step taken yet
            for k in ("exp_avg", "exp_avg_sq"):
                tensors[f"{k}/{name}"] = st[k].detach().cpu().contiguous()
            ranges[name] = [lo, hi, full_numel[name]]
            r = rows.get(name)
            if lo == (r[0] * (p.numel() // (r[1] - r[0])) if r else 0):
                tensors[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).detach().cpu().reshape(())
    if not tensors and c.dp_rank != 0:
        return []  # a ZeRO-1 rank whose pieces another pipeline copy writes
    meta = {
        "rows": json.dumps({n: list(r) for n, r in rows.items() if f"param/{n}" in tensors}),
        "layout": json.dumps({"pp": topo.pp, "ep": topo.ep, "dp": topo.dp, "schedule": topo.schedule_name,
                              "pp_rank": c.pp_rank, "ep_rank": c.ep_rank}),
    }
    if ranges:
        meta["ranges"] = json.dumps(ranges)
    d = ckpt_dir / "shards"
    d.mkdir(parents=True, exist_ok=True)
    suffix = f"_dp{c.dp_rank}" if c.dp_rank else ""
    path = d / f"pp{c.pp_rank}_ep{c.ep_rank}{suffix}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return [str(path)]


def _full_numels(model: nn.Module, rows: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """``{name: elements of the full-model tensor}`` (a routed-expert shard of ``k`` of ``E`` rows: ``numel·E/k``)."""
    out = {}
    for name, p in model.named_parameters():
        r = rows.get(name)
        out[name] = p.numel() // (r[1] - r[0]) * r[2] if r else p.numel()
    return out


def read_header(read: Callable[[int, int], bytes], where: str) -> dict[str, Any]:
    """The JSON header of a safetensors file through ``read(offset, length)`` (two ranged reads, no tensor data):
    ``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``. Raises :class:`IncompatibleCheckpoint`
    naming ``where`` when the bytes are not a safetensors header."""
    try:
        return sts.read_header(read, where)
    except sts.SafetensorsError as e:
        raise IncompatibleCheckpoint(str(e)) from None


def needed_shards(model: nn.Module, headers: dict[str, dict[str, Any]]) -> list[str]:
    """Which shard files :func:`load_rank` reads for ``model`` (this rank's share, any saved layout): the files that
    hold one of its parameters, for routed experts only those whose expert rows overlap the rank's. ``headers``:
    ``{file: safetensors header}`` (:func:`read_header`). Lets a rank download just its part of a checkpoint."""
    mine = {n for n, _ in model.named_parameters()}
    rows = expert_rows(model)
    out = []
    for f, header in headers.items():
        try:
            saved_rows = json.loads((header.get("__metadata__") or {}).get("rows", "{}"))
        except (json.JSONDecodeError, TypeError):
            saved_rows = {}
        for key in header:
            kind, _, name = key.partition("/")
            if key == "__metadata__" or kind not in _KINDS or name not in mine:
                continue
            r, sr = rows.get(name), saved_rows.get(name) if isinstance(saved_rows, dict) else None
            if r is None or not isinstance(sr, list) or len(sr) != 3 or (sr[0] < r[1] and r[0] < sr[1]):
                out.append(f)
                break
    return sorted(out)


class ShardIndex:
    """Where every tensor of a sharded checkpoint lives: ``{key: [(file, start, stop, E or None)]}``.

    Indexing reads each file's header only; :meth:`read` then reads, through :class:`raymoe.safetensors_slices.
    SliceReader`, exactly the bytes of the tensor or expert rows asked for (one ranged read per file that holds some
    of them). :attr:`bytes_read` counts every byte read, headers included."""

    def __init__(self, ckpt_dir: pathlib.Path) -> None:
        files = sorted((pathlib.Path(ckpt_dir) / "shards").glob("*.safetensors"))
        if not files:
            raise IncompatibleCheckpoint(f"{ckpt_dir}: no shards/*.safetensors (not a sharded raymoe checkpoint)")
        self.entries: dict[str, list[tuple[pathlib.Path, Optional[int], Optional[int], Optional[int]]]] = {}
        # ZeRO-1 pieces: {key: [(file, lo, hi, numel of the full tensor)]}, flat ranges of the full-model tensor
        self.ranges: dict[str, list[tuple[pathlib.Path, int, int, int]]] = {}
        self.layout: Optional[dict] = None
        self._readers: dict[pathlib.Path, sts.SliceReader] = {}
        try:
            for f in files:
                try:
                    h = self._readers[f] = sts.SliceReader.open(f)
                    meta = h.metadata
                    rows = json.loads(meta.get("rows", "{}"))
                    flat = json.loads(meta.get("ranges", "{}"))
                    self.layout = json.loads(meta["layout"]) if "layout" in meta else self.layout
                    for key in h.keys():
                        kind, name = key.split("/", 1)
                        if kind in ("exp_avg", "exp_avg_sq") and name in flat:  # a ZeRO-1 piece
                            lo, hi, total = (int(v) for v in flat[name])
                            if h.shape(key) != (hi - lo,) or not 0 <= lo <= hi <= total:
                                raise ValueError(f"{key!r} has shape {h.shape(key)} but range {lo}..{hi} of {total}")
                            self.ranges.setdefault(key, []).append((f, lo, hi, total))
                            continue
                        r = rows.get(name) if kind != "step" else None  # step counts are scalars
                        self.entries.setdefault(key, []).append((f, *(r if r else (None, None, None))))
                except (OSError, ValueError, json.JSONDecodeError, KeyError) as e:
                    raise IncompatibleCheckpoint(f"{f}: unreadable shard ({e})") from e
        except BaseException:
            self.close()
            raise

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self._readers.values())

    def has(self, key: str) -> bool:
        return key in self.entries or key in self.ranges

    def read_flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements ``lo..hi-1`` of the full-model tensor ``key``, flattened (1-D), whichever way it was saved: from
        the ZeRO-1 pieces that cover the range, or from a full tensor / the expert rows that cover it."""
        if key in self.ranges:
            parts = self._covering(key, self.ranges[key], lo, hi, "elements")
            return torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else torch.empty(0))
        if key not in self.entries:
            raise IncompatibleCheckpoint(f"checkpoint has no tensor {key!r}")
        f, s, _, _ = self.entries[key][0]
        if s is None:  # a full tensor
            return self.read(key).reshape(-1)[lo:hi]
        shape = self._readers[f].shape(key)
        row = math.prod(shape[1:])
        r0, r1 = lo // row, -(-hi // row)
        return self.read(key, (r0, r1)).reshape(-1)[lo - r0 * row:hi - r0 * row]

    def read(self, key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor ``key``; for expert tensors only experts ``rows[0]..rows[1]-1`` (all when None), reading
        only those rows from each file."""
        if key not in self.entries:
            raise IncompatibleCheckpoint(f"checkpoint has no tensor {key!r}")
        ents = self.entries[key]
        if ents[0][1] is None:  # a full tensor
            try:
                return self._readers[ents[0][0]].get(key)
            except (ValueError, KeyError) as e:
                raise IncompatibleCheckpoint(f"cannot read {key!r}: {e}") from e
        lo, hi = rows if rows is not None else (0, ents[0][3])
        parts = self._covering(key, ents, lo, hi, "experts")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _covering(self, key: str, pieces: list, lo: int, hi: int, what: str) -> list[torch.Tensor]:
        """The parts of ``key`` covering ``lo..hi-1`` in order, from ``pieces`` = ``(file, start, stop, _)`` (expert
        rows, or flat element ranges of ZeRO-1 pieces), each read as the slice it contributes."""
        parts, cover = [], lo
        try:
            for f, a, z, _ in sorted(pieces, key=lambda t: t[1]):
                if z <= cover or a >= hi:
                    continue
                if a > cover:
                    break
                stop = min(z, hi)
                parts.append(self._readers[f].get(key, (cover - a, stop - a)))
                cover = stop
                if cover == hi:
                    break
        except (ValueError, KeyError) as e:
            raise IncompatibleCheckpoint(f"cannot read {key!r}: {e}") from e
        if cover != hi:
            raise IncompatibleCheckpoint(f"checkpoint holds {what} of {key!r} only up to {cover}, need {lo}..{hi - 1}")
        return parts

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def load_rank(model: nn.Module, optimizer: torch.optim.Optimizer, topo: Any, rank: int,
              ckpt_dir: pathlib.Path, zero: Any = None) -> None:
    """Load this rank's parameters and AdamW state from a checkpoint saved in any layout, either ``zero_stage``
    (see module docstring). ``zero``: the rank's :class:`raymoe.train.zero.ZeroDataParallel` (the state goes into
    its pieces), None for replicated state."""
    idx = ShardIndex(ckpt_dir)
    rows = expert_rows(model)
    full_numel = _full_numels(model, rows)
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                r = rows.get(name)
                sl = (r[0], r[1]) if r else None
                t = idx.read(f"param/{name}", sl)
                if tuple(t.shape) != tuple(p.shape):
                    raise IncompatibleCheckpoint(f"{ckpt_dir}: tensor {name!r} has shape {tuple(t.shape)}, the model "
                                                 f"expects {tuple(p.shape)} (a checkpoint of a different model?)")
                p.copy_(t.to(p.dtype))
                if zero is None and idx.has(f"exp_avg/{name}"):
                    lo = r[0] * (p.numel() // (r[1] - r[0])) if r else 0
                    st = optimizer.state[p]
                    for k in ("exp_avg", "exp_avg_sq"):
                        st[k] = _flat(idx, k, name, lo, lo + p.numel(), full_numel[name], ckpt_dir).view_as(p) \
                            .to(p.device, p.dtype).clone()
                    st["step"] = idx.read(f"step/{name}").to(p.device, torch.float32).clone().reshape(())
            for name, p, piece, lo, hi in (zero.state_ranges() if zero is not None else ()):
                if not idx.has(f"exp_avg/{name}"):
                    continue
                st = optimizer.state[piece]
                for k in ("exp_avg", "exp_avg_sq"):
                    st[k] = _flat(idx, k, name, lo, hi, full_numel[name], ckpt_dir).to(p.device, p.dtype).clone()
                st["step"] = idx.read(f"step/{name}").to(p.device, torch.float32).clone().reshape(())
    finally:
        idx.close()


def _flat(idx: ShardIndex, kind: str, name: str, lo: int, hi: int, total: int, where: Any) -> torch.Tensor:
    t = idx.read_flat(f"{kind}/{name}", lo, hi)
    if t.numel() != hi - lo:
        raise IncompatibleCheckpoint(f"{where}: {kind}/{name} gives {t.numel()} elements for range {lo}..{hi} of "
                                     f"{total} (a checkpoint of a different model?)")
    return t


def assemble_full(ckpt_dir: pathlib.Path, model: nn.Module) -> nn.Module:
    """Fill a full (unsharded) model with the checkpoint's parameters — HF export and evaluation from any layout."""
    idx = ShardIndex(ckpt_dir)
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                t = idx.read(f"param/{name}")
                if tuple(t.shape) != tuple(p.shape):
                    raise IncompatibleCheckpoint(f"{ckpt_dir}: tensor {name!r} has shape {tuple(t.shape)}, the "
                                                 f"model expects {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))
    finally:
        idx.close()
    return model
