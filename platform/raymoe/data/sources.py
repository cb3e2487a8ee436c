"""User datasets: files or directories of Parquet, JSONL (optionally ``.gz``/``.zst``), Arrow or plain text, on a local
disk or any ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://…``, ``hdfs://…``), or our own shard format.

Resolving. ``resolve_source(uri)`` lists the files: a file is taken as is; a directory is walked recursively and
every file with a known suffix is kept (hidden files and names starting with ``_``, such as ``_SUCCESS``, are
skipped), sorted by relative path, so the document order is the same on every machine. A directory holding a
``manifest.json`` is one of our builds (``format == "shards"``) and is opened as it is. All files of a source must
share one format:

==========  ===============================================  ===========================================
format      suffixes                                         one document is
==========  ===============================================  ===========================================
parquet     ``.parquet``                                     a row; text in ``text_column``
jsonl       ``.jsonl``, ``.json`` (+ ``.gz``, ``.zst``)      a line (an object); text in ``text_column``
arrow       ``.arrow``, ``.feather``, ``.ipc`` (file or      a row; text in ``text_column``
            stream format)
text        ``.txt``, ``.md`` (+ ``.gz``, ``.zst``)          a whole file, verbatim (UTF-8)
==========  ===============================================  ===========================================

Pre-tokenized rows: with ``token_column`` set, the rows of a Parquet/JSONL/Arrow source carry lists of token ids
instead of text; they are taken as they are (the tokenizer only supplies the special ids around them). Null or empty
documents are skipped.

Fingerprint (the build cache key): sha256 over every file's relative path and size, plus its bytes for a local file
or its modification time for a remote one (an object store listing is cheap; re-reading a remote corpus to hash it
is not). A changed file therefore rebuilds; on an object store an object overwritten with the same size within the
store's mtime resolution would not, the usual trade-off of listing-based caches.

Validation split (:func:`held_out`). A document is held out when the first 8 bytes of ``sha256("raymoe-val" ‖
payload)``, read as a fraction of 2⁶⁴, fall below ``val_fraction``. The rule needs only the document itself, so it
runs in parallel (a Ray Data ``map_batches``) and streams; identical documents always land on the same side (no
train/val leak through duplicates). The bundled corpus keeps its own whole-play rule (:mod:`raymoe.data.corpus`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import pyarrow as pa

__all__ = ["FORMATS", "SourceFile", "FileSource", "resolve_source", "held_out", "payload_bytes", "read_file_docs",
           "open_filesystem"]

FORMATS = ("parquet", "jsonl", "arrow", "text", "shards")
_FORMAT_OF_SUFFIX = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".arrow": "arrow",
                     ".feather": "arrow", ".ipc": "arrow", ".txt": "text", ".md": "text"}
_COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
_VAL_SALT = b"raymoe-val\x00"


@dataclass(frozen=True)
class SourceFile:
    path: str  # the path the filesystem understands (bucket/key for object stores)
    rel: str  # relative to the source root: the stable part of a document's name
    size: int
    mtime_ns: int
    compression: Optional[str]  # "gzip" | "zstd" | None


@dataclass(frozen=True)
class FileSource:
    """A resolved ``data.source`` entry: its files (sorted), their common format and the column to read."""

    uri: str
    format: str
    files: tuple[SourceFile, ...]
    text_column: str = "text"
    token_column: Optional[str] = None
    local: bool = True

    @property
    def name(self) -> str:
        stem = self.uri.rstrip("/").rsplit("/", 1)[-1]
        for suffix in (*_COMPRESSION, *_FORMAT_OF_SUFFIX):
            stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
        return stem or "source"

    @property
    def column(self) -> str:
        return self.token_column or self.text_column

    @property
    def pretokenized(self) -> bool:
        return self.token_column is not None

    def filesystem(self):
        return open_filesystem(self.uri)[0]

    def fingerprint(self) -> str:
        """sha256 of the listing plus the local files' bytes (see the module docstring); memoized per process for
        an unchanged listing (paths, sizes, mtimes)."""
        return _fingerprint(self)

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.format}|{self.column}|{self.pretokenized}".encode())
        fs = self.filesystem()
        for f in self.files:
            h.update(f"\x00{f.rel}\x00{f.size}\x00".encode())
            if self.local:
                with fs.open_input_stream(f.path) as s:
                    while block := s.read(1 << 22):
                        h.update(block)
            else:
                h.update(str(f.mtime_ns).encode())
        return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _fingerprint(source: FileSource) -> str:
    return source._compute_fingerprint()


def open_filesystem(uri: str):
    """``(pyarrow FileSystem, path)`` for a local path, ``file://`` URI or any URI ``pyarrow.fs`` resolves."""
    import pyarrow.fs as pafs

    from raymoe.storage import check_uri, is_local

    if is_local(uri):
        path = uri[len("file://"):] if uri.lower().startswith("file://") else uri
        path = os.path.abspath(os.path.expanduser(path))
        return pafs.LocalFileSystem(), path
    check_uri(uri, "data.source")
    return pafs.FileSystem.from_uri(uri)


def _split_suffix(name: str) -> tuple[Optional[str], Optional[str]]:
    """``(format, compression)`` from a file name, ``(None, None)`` when the suffix is not a data format."""
    comp = None
    for suffix, c in _COMPRESSION.items():
        if name.endswith(suffix):
            name, comp = name[: -len(suffix)], c
    return _FORMAT_OF_SUFFIX.get(pathlib.PurePosixPath(name).suffix.lower()), comp


def resolve_source(uri: str, text_column: str = "text", token_column: Optional[str] = None) -> FileSource:
    """List and check one ``data.source`` entry (see the module docstring). Raises a ``ValueError`` or
    ``FileNotFoundError`` naming the problem and what is allowed."""
    import pyarrow.fs as pafs

    from raymoe.storage import is_local

    fs, root = open_filesystem(uri)
    info = fs.get_file_info(root)
    local = is_local(uri)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.source {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        infos, base = [info], root.rsplit("/", 1)[0] if "/" in root else ""
    else:
        if fs.get_file_info(f"{root.rstrip('/')}/manifest.json").type == pafs.FileType.File:
            return FileSource(uri, "shards", (), text_column, token_column, local)
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
        base = root.rstrip("/")
    files, formats, ignored = [], set(), []
    for i in sorted(infos, key=lambda i: i.path):
        rel = i.path[len(base):].lstrip("/") if base else i.path
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        fmt, comp = _split_suffix(i.base_name)
        if fmt is None:
            ignored.append(rel)
            continue
        if comp is not None and fmt in ("parquet", "arrow"):
            raise ValueError(f"data.source {uri!r}: {rel} is a compressed {fmt} file; {fmt} compresses internally, "
                             f"give it uncompressed (.gz/.zst apply to JSONL and text)")
        formats.add(fmt)
        mtime = i.mtime_ns if i.mtime_ns is not None else 0
        files.append(SourceFile(i.path, rel, int(i.size or 0), int(mtime), comp))
    if not files:
        raise FileNotFoundError(
            f"data.source {uri!r} holds no data files (allowed: {sorted(set(_FORMAT_OF_SUFFIX))}, JSONL/text "
            f"optionally .gz/.zst, or a raymoe build with manifest.json)"
            + (f"; found only {ignored[:5]}" if ignored else ""))
    if len(formats) > 1:
        raise ValueError(f"data.source {uri!r} mixes formats {sorted(formats)}; give each format as its own source")
    fmt = formats.pop()
    if token_column is not None and fmt == "text":
        raise ValueError(f"data.token_column={token_column!r} needs Parquet, JSONL or Arrow files; {uri!r} is plain "
                         f"text")
    return FileSource(uri, fmt, tuple(files), text_column, token_column, local)


# ---------------------------------------------------------------------------------------------- reading
def _table_column(table: pa.Table, source: FileSource, rel: str) -> list[Any]:
    if source.column not in table.column_names:
        what = "data.token_column" if source.pretokenized else "data.text_column"
        raise ValueError(f"{source.uri}: {rel} has no column {source.column!r} ({what}); its columns are "
                         f"{table.column_names}")
    return table.column(source.column).to_pylist()


def read_file_docs(source: FileSource, f: SourceFile, fs=None) -> Iterator[Any]:
    """The raw documents of one file in order: ``str`` (text) or ``list[int]`` (pre-tokenized); nulls included
    (the caller skips them, as the Ray pipeline does)."""
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs = fs if fs is not None else source.filesystem()
    if source.format == "parquet":
        with fs.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh)
            if source.column not in pf.schema_arrow.names:
                _table_column(pf.schema_arrow.empty_table(), source, f.rel)
            for batch in pf.iter_batches(columns=[source.column], batch_size=4096):
                yield from batch.column(0).to_pylist()
    elif source.format == "jsonl":
        with _open_stream(fs, f) as fh:
            table = pajson.read_json(fh)
        yield from _table_column(table, source, f.rel)
    elif source.format == "arrow":
        with fs.open_input_file(f.path) as fh:
            try:
                table = pa.ipc.open_file(fh).read_all()
            except pa.ArrowInvalid:
                fh.seek(0)
                table = pa.ipc.open_stream(fh).read_all()
        yield from _table_column(table, source, f.rel)
    elif source.format == "text":
        with _open_stream(fs, f) as fh:
            yield decode_text(fh.read(), f.rel)
    else:
        raise ValueError(f"cannot read documents of format {source.format!r}")


def _open_stream(fs, f: SourceFile):
    """An input stream decompressing by the file's suffix (``.gz``/``.zst``)."""
    return fs.open_input_stream(f.path, compression=f.compression)


def decode_text(data: bytes, rel: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{rel} is not UTF-8 text ({e}); plain-text sources must be UTF-8") from e


def is_chat(doc: Any) -> bool:
    """A conversation: a list of ``{"role", "content"}`` messages (a ``messages`` column)."""
    return isinstance(doc, (list, tuple)) and len(doc) > 0 and isinstance(doc[0], dict)


def payload_bytes(doc: Any) -> bytes:
    """The bytes the validation hash reads: UTF-8 text, the canonical JSON of a conversation, or the int64
    little-endian ids of a pre-tokenized row."""
    if isinstance(doc, str):
        return doc.encode("utf-8")
    if is_chat(doc):
        import json

        return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")
    import numpy as np

    return np.asarray(doc, dtype="<i8").tobytes()


def held_out(doc: Any, val_fraction: float) -> bool:
    """True when ``doc`` belongs to the validation split (rule in the module docstring). 0 → never, 1 → always."""
    if val_fraction <= 0.0:
        return False
    if val_fraction >= 1.0:
        return True
    u = int.from_bytes(hashlib.sha256(_VAL_SALT + payload_bytes(doc)).digest()[:8], "little") / 2.0**64
    return u < val_fraction


def is_empty(doc: Any) -> bool:
    return doc is None or len(doc) == 0


def encode_docs(docs: Sequence[Any], tok, val_fraction: float, pretokenized: bool, vocab_limit: int
                ) -> tuple[list[list[int]], list[bool], Optional[list[list[int]]]]:
    """Raw documents → ``(stream ids per document, held-out flags, loss masks or None)``; empty documents are
    dropped. The one encoding function both the single-process build and the Ray Data pipeline call, so their shards
    cannot differ.

    Framing: text → ``[bos] + ids + [eos]`` (bos only when the tokenizer has one distinct from eos); pre-tokenized
    rows the same around their ids; a conversation → its chat-template rendering (which places its own special
    tokens) ``+ [eos]``, with a loss mask that is 1 on assistant tokens only (the closing eos is not trained on).
    """
    kept = [d for d in docs if not is_empty(d)]
    flags = [held_out(d, val_fraction) for d in kept]
    head = [tok.bos_id] if tok.bos_id is not None else []
    chats = [is_chat(d) for d in kept]
    if any(chats):
        if not all(chats):
            raise ValueError("a source mixes conversations (lists of messages) with other documents")
        out, masks = [], []
        for d in kept:
            ids, mask = tok.render_chat(d)
            out.append(ids + [tok.eod_id])
            masks.append(mask + [0])
        return out, flags, masks
    if pretokenized:
        out = []
        for d in kept:
            ids = [int(x) for x in d]
            bad = [x for x in ids if not 0 <= x < vocab_limit]
            if bad:
                raise ValueError(f"pre-tokenized document holds id {bad[0]} outside the tokenizer's vocabulary "
                                 f"[0, {vocab_limit}): wrong data.tokenizer for this data?")
            out.append(head + ids + [tok.eod_id])
        return out, flags, None
    bad = next((d for d in kept if not isinstance(d, str)), None)
    if bad is not None:
        raise ValueError(f"the text column holds {type(bad).__name__} values, not text: name the text column with "
                         f"data.text_column, a column of token-id lists with data.token_column, or give conversations "
                         f"as lists of {{'role', 'content'}} messages")
    return [head + ids + [tok.eod_id] for ids in tok.encode_batch(kept)], flags, None
