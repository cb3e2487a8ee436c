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
expert slice from its ep rank. Native data parallelism keeps the optimizer state replicated over dp (no ZeRO
partitioning), so dp rank 0 has all of it.

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
              ckpt_dir: pathlib.Path) -> list[str]:
    """Write this rank's shard (dp rank 0 only; other dp ranks hold identical tensors). Returns files written."""
    c = topo.coords(rank)
    if c.dp_rank != 0:
        return []
    rows = expert_rows(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if name not in rows and c.ep_rank != 0:
            continue  # dense: ep rank 0 writes it
        if not topo.grad_norm_owner(name, c.pp_rank):
            continue  # a copy another pipeline rank writes
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        st = optimizer.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"{k}/{name}"] = st[k].detach().cpu().contiguous()
        if "step" in st:
            tensors[f"step/{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).detach().cpu().reshape(())
    meta = {
        "rows": json.dumps({n: list(r) for n, r in rows.items() if f"param/{n}" in tensors}),
        "layout": json.dumps({"pp": topo.pp, "ep": topo.ep, "dp": topo.dp, "schedule": topo.schedule_name,
                              "pp_rank": c.pp_rank, "ep_rank": c.ep_rank}),
    }
    d = ckpt_dir / "shards"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"pp{c.pp_rank}_ep{c.ep_rank}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return [str(path)]


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
        self.layout: Optional[dict] = None
        self._readers: dict[pathlib.Path, sts.SliceReader] = {}
        try:
            for f in files:
                try:
                    h = self._readers[f] = sts.SliceReader.open(f)
                    meta = h.metadata
                    rows = json.loads(meta.get("rows", "{}"))
                    self.layout = json.loads(meta["layout"]) if "layout" in meta else self.layout
                    for key in h.keys():
                        kind, name = key.split("/", 1)
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
        return key in self.entries

    def read(self, key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor ``key``; for expert tensors only experts ``rows[0]..rows[1]-1`` (all when None), reading
        only those rows from each file."""
        if key not in self.entries:
            raise IncompatibleCheckpoint(f"checkpoint has no tensor {key!r}")
        ents = self.entries[key]
        try:
            if ents[0][1] is None:  # a full tensor
                return self._readers[ents[0][0]].get(key)
            E = ents[0][3]
            lo, hi = rows if rows is not None else (0, E)
            parts, cover = [], lo
            for f, s, e, _ in sorted(ents, key=lambda t: t[1]):
                if e <= cover or s >= hi:
                    continue
                if s > cover:
                    break
                stop = min(e, hi)
                parts.append(self._readers[f].get(key, (cover - s, stop - s)))
                cover = stop
                if cover == hi:
                    break
        except (ValueError, KeyError) as e:
            raise IncompatibleCheckpoint(f"cannot read {key!r}: {e}") from e
        if cover != hi:
            raise IncompatibleCheckpoint(f"checkpoint holds experts of {key!r} only up to {cover}, need {lo}..{hi - 1}")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def load_rank(model: nn.Module, optimizer: torch.optim.Optimizer, topo: Any, rank: int,
              ckpt_dir: pathlib.Path) -> None:
    """Load this rank's parameters and AdamW state from a checkpoint saved in any layout (see module docstring)."""
    idx = ShardIndex(ckpt_dir)
    rows = expert_rows(model)
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
                if idx.has(f"exp_avg/{name}"):
                    st = optimizer.state[p]
                    st["exp_avg"] = idx.read(f"exp_avg/{name}", sl).to(p.device, p.dtype).clone()
                    st["exp_avg_sq"] = idx.read(f"exp_avg_sq/{name}", sl).to(p.device, p.dtype).clone()
                    st["step"] = idx.read(f"step/{name}").to(p.device, torch.float32).clone().reshape(())
    finally:
        idx.close()


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
