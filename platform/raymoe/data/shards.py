"""Token shards on disk (Arrow IPC, int32, memory-mapped) and the packed fixed-length view over them.

Layout. Each split (``train``, ``val``) is one token **stream**: its documents in order, each followed by the
end-of-document token, ``doc₀ EOD doc₁ EOD … docₙ EOD``. The stream is cut into shard files
``<split>-00000.arrow, …`` of at most ``shard_tokens`` tokens; each file is an Arrow IPC file holding **one record
batch with one int32 column** ``tokens``. int32 rather than uint32: torch has no use for ``torch.uint32`` ids
(pyarrow hands uint32 columns to torch as ``torch.uint32``, which ``nn.Embedding`` rejects), and int32
halves the int64 footprint.

Why Arrow IPC and one batch per shard: opened through ``pa.memory_map``, ``reader.get_batch(0).column(0)
.to_numpy(zero_copy_only=True)`` is a numpy view straight onto the page cache (0.13 ms for 16 M tokens), so every
process that opens the dataset — each DP replica, the evaluator — shares the same physical pages and reading a
sample is a slice. Parquet would compress better but must be decoded on read; for a few MB of tokens the plain
layout wins, and Ray Data can still read Arrow files if a later issue streams from it.

Packing. With ``T = seq_len``, sample ``i`` is the window ``stream[i·T : i·T + T + 1]`` (T+1 tokens):
``input_ids = w[:-1]``, ``labels = w[1:]``, both ``[T]``. Windows tile the stream with a one-token overlap, so
every token is a label exactly once; the stream's last ``(N−1) mod T`` tokens are unused. There are
``(N − 1) // T`` samples. A window may span a document boundary (the EOD token sits inside it) and a shard
boundary (the two slices are concatenated); no attention mask is applied across documents, the usual choice for
packed pre-training corpora.

The manifest (``manifest.json``, written last) records per shard its token count, byte size and sha256, per split
the token and document counts, and the tokenizer's sha256; :func:`verify_manifest` checks them.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import torch

__all__ = ["MANIFEST", "ShardWriter", "stack_samples", "write_split", "read_manifest", "verify_manifest", "sha256_file",
           "PackedDataset"]

MANIFEST = "manifest.json"
_SCHEMA = pa.schema([pa.field("tokens", pa.int32(), nullable=False)])
# chat data: a second column, loss_mask[t] = 1 when token t is a target the loss trains on (assistant turns)
_SCHEMA_MASK = pa.schema([pa.field("tokens", pa.int32(), nullable=False),
                          pa.field("loss_mask", pa.int8(), nullable=False)])


def sha256_file(path: pathlib.Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Streams one split's documents (ids already framed, e.g. ``doc + [EOD]``) into ``<split>-NNNNN.arrow``
    shards of exactly ``shard_tokens`` tokens (the last one shorter); :meth:`finish` returns the manifest entry."""

    def __init__(self, out_dir: pathlib.Path, split: str, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir, self.split, self.shard_tokens = pathlib.Path(out_dir), split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._pending: list[np.ndarray] = []
        self._pending_mask: list[np.ndarray] = []
        self._pending_n = 0
        self.documents = self.tokens = 0
        self.has_mask: bool | None = None  # decided by the first document

    def _flush(self, arr: np.ndarray, mask: np.ndarray | None) -> None:
        path = self.out_dir / f"{self.split}-{len(self.shards):05d}.arrow"
        schema = _SCHEMA if mask is None else _SCHEMA_MASK
        cols = [pa.array(arr, type=pa.int32())] + ([] if mask is None else [pa.array(mask, type=pa.int8())])
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.record_batch(cols, schema=schema))
        self.shards.append({"file": path.name, "tokens": int(arr.size), "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})

    def add(self, doc: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None) -> None:
        """Append one framed document (and, for chat data, its loss mask of the same length) to the stream."""
        arr = np.asarray(doc, dtype=np.int32)
        if self.has_mask is None:
            self.has_mask = mask is not None
        if self.has_mask != (mask is not None):
            raise ValueError(f"{self.split}: documents with and without a loss mask in one stream (chat and plain "
                             f"text mixed in one source); give them as separate sources")
        self.documents += 1
        self.tokens += arr.size
        self._pending.append(arr)
        if mask is not None:
            m = np.asarray(mask, dtype=np.int8)
            if m.shape != arr.shape:
                raise ValueError(f"loss mask of {m.size} entries for a document of {arr.size} tokens")
            self._pending_mask.append(m)
        self._pending_n += arr.size
        while self._pending_n >= self.shard_tokens:
            stream = np.concatenate(self._pending)
            mstream = np.concatenate(self._pending_mask) if self.has_mask else None
            self._flush(stream[: self.shard_tokens], None if mstream is None else mstream[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self._pending, self._pending_n = ([rest] if rest.size else []), rest.size
            self._pending_mask = [] if mstream is None or not rest.size else [mstream[self.shard_tokens :]]

    def finish(self) -> dict[str, Any]:
        """Write the last partial shard; ``{"tokens": N, "documents": D, "loss_mask": bool, "shards": [{"file",
        "tokens", "bytes", "sha256"}, ...]}``."""
        if self._pending_n:
            self._flush(np.concatenate(self._pending),
                        np.concatenate(self._pending_mask) if self.has_mask else None)
            self._pending, self._pending_mask, self._pending_n = [], [], 0
        entry = {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}
        if self.has_mask:
            entry["loss_mask"] = True
        return entry


def write_split(
    out_dir: pathlib.Path, split: str, token_docs: Iterable[Sequence[int]], eod_id: int, shard_tokens: int
) -> dict[str, Any]:
    """Write one split's stream (documents joined by EOD) as Arrow IPC shards; return its manifest entry.

    Args:
        out_dir: directory to write ``<split>-NNNNN.arrow`` into.
        split: ``"train"`` or ``"val"``.
        token_docs: token ids of each document, in order (EOD is appended after each).
        eod_id: the end-of-document id.
        shard_tokens: maximum tokens per shard file.
    Returns:
        ``{"tokens": N, "documents": D, "shards": [{"file", "tokens", "bytes", "sha256"}, ...]}``.
    """
    writer = ShardWriter(out_dir, split, shard_tokens)
    for ids in token_docs:
        doc = np.empty(len(ids) + 1, dtype=np.int32)
        doc[:-1] = ids
        doc[-1] = eod_id
        writer.add(doc)
    return writer.finish()


def read_manifest(ds_dir: pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(ds_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {ds_dir} is not a complete dataset build")
    return json.loads(path.read_text())


def verify_manifest(ds_dir: pathlib.Path, manifest: dict[str, Any], checksums: bool = True) -> list[str]:
    """Problems found in a built dataset directory (empty list = intact).

    Sizes are always checked; sha256 of every shard and of the tokenizer file when ``checksums`` is true
    (about 15 ms per 8 MB).
    """
    ds_dir = pathlib.Path(ds_dir)
    problems = []
    tok = ds_dir / manifest["tokenizer_file"]
    if not tok.is_file():
        problems.append(f"missing {tok.name}")
    elif checksums and sha256_file(tok) != manifest["tokenizer_sha256"]:
        problems.append(f"checksum mismatch: {tok.name}")
    for split, entry in manifest["splits"].items():
        for s in entry["shards"]:
            p = ds_dir / s["file"]
            if not p.is_file():
                problems.append(f"missing {s['file']}")
            elif p.stat().st_size != s["bytes"]:
                problems.append(f"size mismatch: {s['file']} ({p.stat().st_size} != {s['bytes']} bytes)")
            elif checksums and sha256_file(p) != s["sha256"]:
                problems.append(f"checksum mismatch: {s['file']}")
    return problems


def _open_shard(path: pathlib.Path, column: int = 0) -> np.ndarray:
    """Zero-copy view of one column of a one-batch Arrow IPC shard (the memory map stays alive through the view):
    0 = int32 tokens, 1 = int8 loss mask (chat data)."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    if reader.num_record_batches != 1:
        raise ValueError(f"{path}: expected one record batch, found {reader.num_record_batches}")
    return reader.get_batch(0).column(column).to_numpy(zero_copy_only=True)


def _slice(arrays: list[np.ndarray], starts: list[int], start: int, stop: int) -> np.ndarray:
    """``concat(arrays)[start:stop]`` (a zero-copy view unless the range crosses an array boundary)."""
    k = bisect.bisect_right(starts, start) - 1
    lo = start - starts[k]
    arr = arrays[k]
    if lo + (stop - start) <= arr.size:
        return arr[lo : lo + stop - start]
    parts, need = [arr[lo:]], stop - start - (arr.size - lo)
    while need > 0:
        k += 1
        parts.append(arrays[k][:need])
        need -= parts[-1].size
    return np.concatenate(parts)


def stack_samples(ds: Any, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], labels [B, T])`` from ``ds.window(i)`` / ``ds.window_mask(i)`` of each id."""
    if len(ids) == 0:
        raise ValueError("batch() needs at least one sample id")
    buf = np.empty((len(ids), ds.seq_len + 1), dtype=np.int64)
    masked = None
    for row, i in enumerate(ids):
        buf[row] = ds.window(int(i))
        m = ds.window_mask(int(i))
        if m is not None:
            if masked is None:
                masked = np.zeros((len(ids), ds.seq_len), dtype=bool)
            masked[row] = m[1:] == 0
    w_BT1 = torch.from_numpy(buf)
    labels = w_BT1[:, 1:].contiguous()
    if masked is not None:
        labels[torch.from_numpy(masked)] = -100
    return w_BT1[:, :-1].contiguous(), labels


class PackedDataset:
    """Fixed-length language-modelling samples over one memory-mapped split (see the module docstring).

    ``len(ds) = (num_tokens − 1) // seq_len``; ``ds[i]`` → ``(input_ids [T], labels [T])``;
    ``ds.batch(ids)`` → ``(input_ids [B, T], labels [B, T])``, all ``torch.long``.

    Example::

        ds = PackedDataset(ds_dir, "train", seq_len=128)
        x_BT, y_BT = ds.batch([0, 5, 7])      # torch.Size([3, 128]) each, y[:, t] == x[:, t + 1]
    """

    def __init__(self, ds_dir: str | pathlib.Path, split: str, seq_len: int,
                 manifest: dict[str, Any] | None = None) -> None:
        self.dir = pathlib.Path(ds_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} not in {sorted(self.manifest['splits'])}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        entry = self.manifest["splits"][split]
        self.split, self.seq_len = split, seq_len
        self.num_tokens: int = entry["tokens"]
        self.eod_id: int = self.manifest["eod_id"]
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"seq_len={seq_len} is too long for the {split!r} split of {self.dir.name}: it holds "
                f"{self.num_tokens} tokens and one sample needs seq_len+1 = {seq_len + 1}; lower data.seq_len "
                f"(at most {self.num_tokens - 1}) or use a larger corpus / validation fraction"
            )
        self._arrays = [_open_shard(self.dir / s["file"]) for s in entry["shards"]]
        sizes = [a.size for a in self._arrays]
        if sum(sizes) != self.num_tokens:
            raise ValueError(f"{self.dir}: {split} shards hold {sum(sizes)} tokens, manifest says {self.num_tokens}")
        self._starts = np.cumsum([0] + sizes[:-1]).tolist()
        self.has_mask = bool(entry.get("loss_mask", False))
        self._masks = [_open_shard(self.dir / s["file"], 1) for s in entry["shards"]] if self.has_mask else []

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """``stream[start:stop]`` as int32 (a zero-copy view unless the range crosses a shard boundary)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        return _slice(self._arrays, self._starts, start, stop)

    def window(self, i: int) -> np.ndarray:
        """Sample ``i``'s ``seq_len + 1`` tokens (int32)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.split} ({n} samples of seq_len={self.seq_len})")
        i %= n
        return self.tokens(i * self.seq_len, i * self.seq_len + self.seq_len + 1)

    def loss_mask(self, start: int, stop: int) -> np.ndarray:
        """``mask[start:stop]`` (int8; 1 = a token the loss trains on); all ones for data without a mask."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        if not self.has_mask:
            return np.ones(stop - start, dtype=np.int8)
        return _slice(self._masks, self._starts, start, stop)

    def window_mask(self, i: int) -> np.ndarray | None:
        """Sample ``i``'s loss mask (int8 ``[seq_len + 1]``), or ``None`` for data without one."""
        if not self.has_mask:
            return None
        i %= len(self)
        return _slice(self._masks, self._starts, i * self.seq_len, i * self.seq_len + self.seq_len + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([int(i)])
        return x[0], y[0]

    def batch(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack samples ``ids`` → ``(input_ids [B, T], labels [B, T])`` int64 (contiguous, freshly allocated);
        with a loss mask, ``labels[b, t] = -100`` where the target token ``t + 1`` is not trained on."""
        return stack_samples(self, ids)

    def __repr__(self) -> str:
        return (f"PackedDataset(split={self.split!r}, samples={len(self)}, seq_len={self.seq_len}, "
                f"tokens={self.num_tokens}, dir={str(self.dir)!r})")
