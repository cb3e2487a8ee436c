"""Tokenizing on Ray Data: the encoder :func:`raymoe.data.userdata.build_source` runs when a cluster is at hand.

Pipeline (one per source)::

    read_parquet / read_json / read_binary_files (text: one file = one document) / file list (Arrow IPC)
      → map_batches(_encode, one-CPU tasks fused with the read, 256 documents per batch)
      → iter_batches on the caller, in order → ShardWriter (train / val) → manifest → atomic rename into the cache

Why this shape. Reading and tokenizing (the expensive part: ~1 µs per byte with a large BPE) run in parallel over
the cluster and stream, so the corpus never has to fit in one process. The shards must be one ordered stream per
split, so the writing stays on the caller: Ray Data runs with ``preserve_order`` and the caller appends the
documents as they come back (cheap: a memcpy per document and a sha256 per shard). Each batch goes through
:func:`raymoe.data.sources.encode_docs`, the function the single-process build calls, and the held-out rule reads
only the document, so the shards are byte-identical to :func:`raymoe.data.userdata.local_encoder`'s whatever the
batching (tests/integration/test_data_ray.py checks it).

The tokenizer travels as its JSON string (:meth:`Tokenizer.spec`), so workers on other nodes need no shared disk;
the source files are read where the task runs, through the same ``pyarrow.fs`` URI (local paths only work when the
disk is shared or the cluster is one machine: use an object store URI on a real cluster).
"""
from __future__ import annotations

import functools
import json
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from raymoe.data.sources import FileSource, decode_text, encode_docs, read_file_docs
from raymoe.data.tokenizer import Tokenizer
from raymoe.data.userdata import ENCODE_BATCH_DOCS

__all__ = ["ray_encoder"]

_OUT_SCHEMA = pa.schema([pa.field("ids", pa.list_(pa.int32())), pa.field("val", pa.bool_()),
                         pa.field("mask", pa.list_(pa.int8()))])  # mask: null unless chat data


@functools.lru_cache(maxsize=4)
def _tokenizer(spec_json: str) -> Tokenizer:
    """One tokenizer per worker process and spec (Ray reuses worker processes across tasks)."""
    return Tokenizer.from_spec(json.loads(spec_json))


def _docs(batch: pa.Table, s: FileSource) -> list[Any]:
    if s.format == "text":
        return [decode_text(b, f"a file of {s.uri}") for b in batch.column("bytes").to_pylist()]
    if s.format == "arrow":
        fs = s.filesystem()
        return [doc for i in batch.column("file").to_pylist() for doc in read_file_docs(s, s.files[i], fs)]
    if s.column not in batch.column_names:
        raise ValueError(f"{s.uri}: no column {s.column!r}; columns are {batch.column_names}")
    return batch.column(s.column).to_pylist()


def _encode(batch: pa.Table, source: FileSource, spec_json: str, val_fraction: float, vocab_limit: int) -> pa.Table:
    """The ``map_batches`` function: raw documents → framed ids, held-out flags, loss masks (null unless chat)."""
    docs, flags, masks = encode_docs(_docs(batch, source), _tokenizer(spec_json), val_fraction, source.pretokenized,
                                     vocab_limit)
    return pa.table([pa.array(docs, type=pa.list_(pa.int32())), pa.array(flags, type=pa.bool_()),
                     pa.array(masks if masks is not None else [None] * len(docs), type=pa.list_(pa.int8()))],
                    schema=_OUT_SCHEMA)


def _lists(col: pa.ChunkedArray) -> list[np.ndarray]:
    """A list column → one numpy view per row (offsets index the unsliced values buffer)."""
    arr = col.combine_chunks()
    values = arr.values.to_numpy(zero_copy_only=False)
    offsets = arr.offsets.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(arr))]


def _read(source: FileSource):
    import ray

    fs = source.filesystem()
    paths = [f.path for f in source.files]
    if source.format == "parquet":
        return ray.data.read_parquet(paths, filesystem=fs, columns=[source.column], file_extensions=None)
    if source.format == "jsonl":  # pyarrow's JSON reader (lines=False) reads JSON Lines; .gz/.zst by suffix
        return ray.data.read_json(paths, filesystem=fs, file_extensions=None)
    if source.format == "text":
        return ray.data.read_binary_files(paths, filesystem=fs, file_extensions=None)
    if source.format == "arrow":  # Ray Data has no Arrow IPC reader: one row per file, read inside the actor
        return ray.data.from_items([{"file": i} for i in range(len(paths))], override_num_blocks=len(paths))
    raise ValueError(f"no Ray Data reader for format {source.format!r}")


def ray_encoder(source: FileSource, tok_spec: dict, val_fraction: float, vocab_limit: int, progress: bool
                ) -> Iterator[tuple[list[np.ndarray], list[bool], Optional[list[np.ndarray]]]]:
    """:data:`raymoe.data.userdata.Encoder` on Ray Data (needs ``ray.init`` done).

    Tokenizing runs as plain tasks of one CPU each, fused with the read (one task reads a block and tokenizes it), so
    every free CPU of the cluster works and none is held idle: an actor pool would pin CPUs the read tasks then lack
    (with one CPU, a deadlock)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    try:
        ds = _read(source).map_batches(
            _encode, fn_kwargs={"source": source, "spec_json": json.dumps(tok_spec), "val_fraction": val_fraction,
                                "vocab_limit": vocab_limit},
            batch_size=ENCODE_BATCH_DOCS, batch_format="pyarrow", num_cpus=1)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            docs = _lists(batch.column("ids"))
            mask_col = batch.column("mask")
            masks = _lists(mask_col) if mask_col.null_count < len(mask_col) else None
            yield docs, batch.column("val").to_pylist(), masks
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
