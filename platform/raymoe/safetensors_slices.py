"""Read single tensors, or row ranges of them, from a safetensors file without touching the rest of it.

A rank of a large layout holds a fraction of the model: its pipeline stages' tensors and, of every routed-expert
tensor ``[E, ...]``, the rows of its experts. Loading must read that fraction, not the file set. The safetensors
format makes it cheap: an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the row-major (C-order) tensor bytes, so rows
``a..b-1`` of a tensor are one contiguous byte range ``begin + a·row_bytes .. begin + b·row_bytes``.

:class:`SliceReader` parses and checks the header (it is untrusted input: known dtypes, integer shapes, offsets
that match the shape and lie inside the file), then serves :meth:`SliceReader.get` with exactly one ranged read per
call through a ``read(offset, length) -> bytes`` callable: ``os.pread`` on a local file (:meth:`SliceReader.open`),
or anything else with ranged reads (an object store's ``read_range``). :attr:`SliceReader.bytes_read` counts the
bytes it asked for, header included, so a test can check that a rank read its share and nothing else. Nothing is
memory-mapped (a mapping's page faults cannot be counted per caller) and nothing is unpickled.

Example::

    r = SliceReader.open("shards/pp0_ep0.safetensors")
    w = r.get("param/layers.1.mlp.experts.gate_proj", rows=(4, 8))  # experts 4..7: [4, D, I], 4/E of the bytes
    r.close()
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable, Optional

import torch

__all__ = ["SafetensorsError", "SliceReader", "read_header", "DTYPES"]

MAX_HEADER = 100 << 20  # safetensors' own bound on the JSON header

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsError(ValueError):
    """The bytes are not a well-formed safetensors file (the message names the file and the problem)."""


def read_header(read: Callable[[int, int], bytes], where: str) -> dict[str, Any]:
    """The JSON header through ``read(offset, length)`` (two ranged reads, no tensor data):
    ``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``. Raises :class:`SafetensorsError` naming
    ``where`` when the bytes are not a safetensors header."""
    return _header(read, where)[0]


def _header(read: Callable[[int, int], bytes], where: str) -> tuple[dict[str, Any], int]:
    head = read(0, 8)
    if len(head) != 8:
        raise SafetensorsError(f"{where}: too short for a safetensors file")
    n = struct.unpack("<Q", head)[0]
    if not 2 <= n <= MAX_HEADER:
        raise SafetensorsError(f"{where}: safetensors header length {n} out of range")
    try:
        header = json.loads(read(8, n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{where}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: safetensors header is not an object")
    return header, n


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SliceReader:
    """One safetensors file behind ``read(offset, length)`` (module docstring).

    Args:
        read: returns ``length`` bytes at ``offset`` (fewer only past the end of the file).
        where: the file's name for error messages.
        size: the file's size in bytes, when known (then every tensor must lie inside it).
        close: called by :meth:`close` (e.g. to close a file descriptor).
    """

    def __init__(self, read: Callable[[int, int], bytes], where: str, size: Optional[int] = None,
                 close: Optional[Callable[[], None]] = None) -> None:
        self.where, self.bytes_read = where, 0
        self._read, self._close = read, close
        header, n = _header(self._counted, where)
        self._data_start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SafetensorsError(f"{where}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for key, ent in header.items():
            if not isinstance(ent, dict):
                raise SafetensorsError(f"{where}: header entry {key!r} is not an object")
            dt, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
            if dt not in DTYPES:
                raise SafetensorsError(f"{where}: {key!r} has dtype {dt!r}; known: {sorted(DTYPES)}")
            if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
                raise SafetensorsError(f"{where}: {key!r} has shape {shape!r}, not a list of sizes")
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs) and offs[0] <= offs[1]):
                raise SafetensorsError(f"{where}: {key!r} has data_offsets {offs!r}")
            nbytes = math.prod(shape) * DTYPES[dt].itemsize
            if offs[1] - offs[0] != nbytes:
                raise SafetensorsError(f"{where}: {key!r} spans {offs[1] - offs[0]} bytes, its shape {shape} and "
                                       f"dtype {dt} need {nbytes}")
            if size is not None and self._data_start + offs[1] > size:
                raise SafetensorsError(f"{where}: {key!r} ends past the end of the file ({size} bytes)")
            self._entries[key] = (DTYPES[dt], tuple(shape), self._data_start + offs[0])

    def _counted(self, off: int, n: int) -> bytes:
        b = self._read(off, n)
        self.bytes_read += len(b)
        return b

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SliceReader":
        """A local file, read with ``os.pread`` (no mapping, no whole-file read)."""
        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size

            def read(off: int, n: int) -> bytes:
                parts, got = [], 0
                while got < n:
                    b = os.pread(fd, n - got, off + got)
                    if not b:
                        break
                    parts.append(b)
                    got += len(b)
                return b"".join(parts) if len(parts) != 1 else parts[0]

            return cls(read, os.fspath(path), size, lambda: os.close(fd))
        except BaseException:
            os.close(fd)
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[0]

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int]:
        if key not in self._entries:
            raise KeyError(f"{self.where}: no tensor {key!r}")
        return self._entries[key]

    def get(self, key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Tensor ``key``, or only its rows ``rows[0]..rows[1]-1`` along dim 0 (one ranged read either way)."""
        dtype, shape, start = self._entry(key)
        if rows is not None:
            if not shape:
                raise ValueError(f"{self.where}: {key!r} is a scalar; it has no rows")
            lo, hi = rows
            if not 0 <= lo <= hi <= shape[0]:
                raise ValueError(f"{self.where}: rows {lo}..{hi} out of range for {key!r} of shape {shape}")
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            start, shape = start + lo * row_bytes, (hi - lo, *shape[1:])
        n = math.prod(shape) * dtype.itemsize
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        buf = self._counted(start, n)
        if len(buf) != n:
            raise SafetensorsError(f"{self.where}: {key!r} is cut short ({len(buf)} of {n} bytes)")
        return torch.frombuffer(bytearray(buf), dtype=dtype).view(shape)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
