"""Your own data: ``data.source`` files → tokenizer → framed documents → our Arrow shards, cached; weighted mixtures.

Flow for each source (:func:`build_source`):

1. resolve the files (:mod:`raymoe.data.sources`); a directory with ``manifest.json`` is one of our builds and is
   used as it is;
2. the tokenizer: ``data.tokenizer=train`` trains today's byte-level BPE on the source's training documents (one
   text source only); a path or URI is an HF tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``;
   ``bos``/``eos``/``pad`` come from it, see :meth:`Tokenizer.from_pretrained`);
3. an **encoder** yields ``(framed ids per document, held-out flags)`` in document order: :func:`local_encoder` in
   this process, or the Ray Data pipeline of :mod:`raymoe.actors.data` spread over the cluster. Both call
   :func:`raymoe.data.sources.encode_docs`, so the shards are identical whichever ran;
4. one :class:`ShardWriter` per split writes the stream; the manifest goes last; the directory is renamed into the
   cache (:func:`raymoe.data.build.cached_build`: atomic, locked, verified on open).

Cache key: ``sha256(FORMAT_VERSION | files-1 | source fingerprint | tokenizer fingerprint | val_fraction)``; the
tokenizer fingerprint is the sha256 of its ``tokenizer.json`` and ``tokenizer_config.json`` (or ``train`` and the
vocabulary size). ``seq_len`` and the mixture weights are applied when reading, so they never rebuild anything.

Validation: ``data.val_source`` unset → each source holds out documents by the content hash of
:func:`raymoe.data.sources.held_out` (``data.val_fraction``); set → the train sources hold nothing out and the
validation set is that source, whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import tokenizers
from tqdm.auto import tqdm

from raymoe.data.mixture import MixedDataset
from raymoe.data.shards import MANIFEST, PackedDataset, ShardWriter, read_manifest, sha256_file
from raymoe.data.sources import FileSource, encode_docs, is_empty, read_file_docs, resolve_source
from raymoe.data.tokenizer import Tokenizer, _check_vocab_size, train_tokenizer

__all__ = ["DataSpec", "Encoder", "local_encoder", "load_tokenizer", "build_source", "build_all", "open_all",
           "prepare_user_data", "open_tokenizer", "check_spec", "TOKENIZER_FILES"]

log = logging.getLogger(__name__)

FILES_VERSION = "files-1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
ENCODE_BATCH_DOCS = 256  # documents per encode call (the Ray pipeline uses the same batch size)

# (source, tokenizer spec, val_fraction, vocab_limit, progress) -> (framed ids per doc, held-out flags, loss masks
# per doc or None) in document order
Encoder = Callable[[FileSource, dict, float, int, bool], Iterator[tuple[list[Any], list[bool], Optional[list[Any]]]]]


@dataclass(frozen=True)
class DataSpec:
    """The data settings of a run as plain values (what the builders need; safe to send to Ray)."""

    sources: tuple[str, ...]
    weights: tuple[float, ...] = ()
    text_column: str = "text"
    token_column: Optional[str] = None
    tokenizer: str = "train"
    vocab_size: int = 4096  # the BPE size for tokenizer=train
    model_vocab_size: int = 4096
    val_fraction: float = 0.05
    val_source: Optional[str] = None
    seq_len: int = 128
    cache_dir: Optional[str] = None

    @classmethod
    def from_run(cls, run: Any) -> "DataSpec":
        d = run.data
        return cls(tuple(d.source), tuple(float(w) for w in d.weights), d.text_column, d.token_column, d.tokenizer,
                   d.vocab_size or run.model.vocab_size, run.model.vocab_size, d.val_fraction, d.val_source,
                   d.seq_len, d.cache_dir)

    def resolve(self, uri: str) -> FileSource:
        return resolve_source(uri, self.text_column, self.token_column)


def _cache_root(cache_dir: Optional[str]) -> pathlib.Path:
    from raymoe.data.build import default_cache_dir

    return (pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "datasets"


def load_tokenizer(spec: str) -> Optional[Tokenizer]:
    """``None`` for ``train``; else the HF tokenizer at a local path or storage URI (copied node-locally)."""
    if spec == "train":
        return None
    from raymoe.storage import materialize

    try:
        d = materialize(spec)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.tokenizer={spec!r}: {e}; give 'train' or an HF tokenizer directory") from e
    if d.is_file():
        d = d.parent
    return Tokenizer.from_pretrained(d)


def _tokenizer_key(tok: Optional[Tokenizer], vocab_size: int) -> str:
    if tok is None:
        return f"train-{vocab_size}"
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = tok.path.parent / name
        if p.is_file():
            h.update(name.encode() + b"\x00" + p.read_bytes())
    return h.hexdigest()


def check_vocab(tok: Tokenizer, model_vocab_size: int, what: str) -> None:
    if tok.vocab_size > model_vocab_size:
        raise ValueError(
            f"{what} has {tok.vocab_size} token ids but model.vocab_size={model_vocab_size}: its ids would index past "
            f"the embedding; set model.vocab_size >= {tok.vocab_size} (or use a tokenizer of at most "
            f"{model_vocab_size} tokens)")


def local_encoder(source: FileSource, tok_spec: dict, val_fraction: float, vocab_limit: int,
                  progress: bool) -> Iterator[tuple[list[Any], list[bool], Optional[list[Any]]]]:
    """The single-process encoder: read each file in order, encode :data:`ENCODE_BATCH_DOCS` documents at a time."""
    tok = Tokenizer.from_spec(tok_spec)
    fs = source.filesystem()
    bar = tqdm(source.files, desc=f"tokenize {source.name}", unit="file", disable=not progress, leave=False)
    for f in bar:
        batch: list[Any] = []
        for doc in read_file_docs(source, f, fs):
            batch.append(doc)
            if len(batch) == ENCODE_BATCH_DOCS:
                yield encode_docs(batch, tok, val_fraction, source.pretokenized, vocab_limit)
                batch = []
        if batch:
            yield encode_docs(batch, tok, val_fraction, source.pretokenized, vocab_limit)


def _train_docs(source: FileSource, val_fraction: float) -> Iterator[str]:
    from raymoe.data.sources import held_out

    fs = source.filesystem()
    for f in source.files:
        for doc in read_file_docs(source, f, fs):
            if not is_empty(doc) and not held_out(doc, val_fraction):
                if not isinstance(doc, str):
                    raise ValueError(f"data.tokenizer=train learns a BPE from text; {source.uri} holds "
                                     f"{type(doc).__name__} documents: give an HF tokenizer directory")
                yield doc


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "source"


def build_source(source: FileSource, tok: Optional[Tokenizer], *, vocab_size: int, val_fraction: float,
                 cache_dir: Optional[str] = None, encoder: Optional[Encoder] = None, progress: bool = True,
                 shard_tokens: Optional[int] = None, verify: bool = True) -> pathlib.Path:
    """Build (once) the shards of one file source; return the build directory (see the module docstring).

    Args:
        source: a resolved file source (not ``shards``).
        tok: the HF tokenizer, or ``None`` to train a BPE of ``vocab_size`` on this source's training documents.
        val_fraction: share of documents held out by content hash (0: none, 1: all — a validation source).
        encoder: :func:`local_encoder` (default) or the Ray Data one; the shards are the same.
    """
    from raymoe.data.build import DEFAULT_SHARD_TOKENS, FORMAT_VERSION, cached_build

    if source.format == "shards":
        raise ValueError("build_source is for file sources; a shard directory is opened as it is")
    if tok is None:
        if source.pretokenized:
            raise ValueError("data.token_column (pre-tokenized rows) needs data.tokenizer=<HF tokenizer directory>: "
                             "the ids must come from a known tokenizer, which also gives the end-of-document id")
        _check_vocab_size(vocab_size)
    encoder = encoder or local_encoder
    key = hashlib.sha256(f"{FORMAT_VERSION}|{FILES_VERSION}|{source.fingerprint()}|{_tokenizer_key(tok, vocab_size)}"
                         f"|{val_fraction!r}".encode()).hexdigest()[:16]
    name = f"{_safe(source.name)}-{key}"

    def build(tmp: pathlib.Path) -> None:
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        if tok is None:
            if progress:
                tqdm.write(f"raymoe.data: training a {vocab_size}-token byte-level BPE on {source.uri} (once)")
            trained = train_tokenizer(_train_docs(source, val_fraction), vocab_size)
            trained.backend.save(str(tmp / "tokenizer.json"))
            use = Tokenizer.from_file(tmp / "tokenizer.json")
        else:
            for fname in TOKENIZER_FILES:
                if (tok.path.parent / fname).is_file():
                    shutil.copyfile(tok.path.parent / fname, tmp / fname)
            use = tok
        times["tokenizer_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        writers = {"train": ShardWriter(tmp, "train", shard_tokens or DEFAULT_SHARD_TOKENS),
                   "val": ShardWriter(tmp, "val", shard_tokens or DEFAULT_SHARD_TOKENS)}
        for docs, flags, masks in encoder(source, use.spec(), val_fraction, use.vocab_size, progress):
            for k, (ids, val) in enumerate(zip(docs, flags)):
                writers["val" if val else "train"].add(ids, None if masks is None else masks[k])
        splits = {k: w.finish() for k, w in writers.items()}
        times["encode_write_s"] = time.perf_counter() - t0
        manifest = {
            "format_version": FORMAT_VERSION,
            "files_version": FILES_VERSION,
            "corpus": source.name,
            "corpus_fingerprint": source.fingerprint(),
            "source": {"uri": source.uri, "format": source.format, "column": source.column,
                       "pretokenized": source.pretokenized, "files": len(source.files)},
            "vocab_size": use.vocab_size,
            "tokenizer_vocab_size": use.vocab_size,
            "tokenizer": "train" if tok is None else "hf",
            "tokenizer_file": "tokenizer.json",
            "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
            "special_tokens": [t for t in (use.bos_token, use.eod_token, use.pad_token) if t],
            "eod_id": use.eod_id,
            "pad_id": use.pad_id,
            "bos_id": use.bos_id,
            "dtype": "int32",
            "val_fraction": val_fraction,
            "split_rule": "documents held out by content: sha256('raymoe-val\\0' + text) < val_fraction * 2^64",
            "splits": splits,
            "build_times": {k: round(v, 3) for k, v in times.items()},
            "builder": getattr(encoder, "__name__", type(encoder).__name__),
            "versions": {"tokenizers": tokenizers.__version__, "pyarrow": pa.__version__, "numpy": np.__version__},
            "created_unix": int(time.time()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    return cached_build(_cache_root(cache_dir), name, verify, build)


@dataclass
class Built:
    """Build directories of a run's data: per train source and for validation, plus the tokenizer directory."""

    train_dirs: list[pathlib.Path]
    train_names: list[str]
    val_dirs: list[pathlib.Path]
    tokenizer_dir: pathlib.Path


def _shard_dir(source: FileSource) -> pathlib.Path:
    from raymoe.storage import materialize

    return materialize(source.uri)


def check_spec(spec: DataSpec) -> tuple[Optional[Tokenizer], list[FileSource], Optional[FileSource]]:
    """Resolve the tokenizer and every source and check they fit together (cheap: listings and small files only),
    so a mistake fails before any cluster work starts. Returns ``(tokenizer or None, sources, val source)``."""
    if not spec.sources:
        raise ValueError("data.source is empty")
    if spec.weights and len(spec.weights) != len(spec.sources):
        raise ValueError(f"data.weights has {len(spec.weights)} entries for {len(spec.sources)} data.source entries")
    tok = load_tokenizer(spec.tokenizer)
    if tok is not None:
        check_vocab(tok, spec.model_vocab_size, f"data.tokenizer={spec.tokenizer!r}")
    resolved = [spec.resolve(u) for u in spec.sources]
    val_resolved = spec.resolve(spec.val_source) if spec.val_source else None
    for s in [*resolved, val_resolved]:
        if s is not None and s.format == "parquet":  # the schema is in the footer: a cheap, early column check
            _check_parquet_column(s)
    file_sources = [s for s in [*resolved, val_resolved] if s is not None and s.format != "shards"]
    if tok is None and len(file_sources) > 1:
        raise ValueError("data.tokenizer=train learns a BPE from one text source; with several sources (or a "
                         "data.val_source) give data.tokenizer=<HF tokenizer directory> so all share one vocabulary")
    return tok, resolved, val_resolved


def _check_parquet_column(source: FileSource) -> None:
    import pyarrow.parquet as pq

    f = source.files[0]
    with source.filesystem().open_input_file(f.path) as fh:
        names = pq.read_schema(fh).names
    if source.column not in names:
        what = "data.token_column" if source.pretokenized else "data.text_column"
        raise ValueError(f"{source.uri}: {f.rel} has no column {source.column!r} ({what}); its columns are {names}")


def build_all(spec: DataSpec, encoder: Optional[Encoder] = None, progress: bool = True) -> Built:
    """Build (or find) every source of ``spec``; checks tokenizer agreement and the vocabulary against the model."""
    tok, resolved, val_resolved = check_spec(spec)
    train_frac = 0.0 if val_resolved is not None else spec.val_fraction

    def one(s: FileSource, frac: float) -> pathlib.Path:
        if s.format == "shards":
            d = _shard_dir(s)
            m = read_manifest(d)
            if tok is not None and m["tokenizer_sha256"] != sha256_file(tok.path):
                raise ValueError(f"data.source {s.uri!r} was tokenized with another tokenizer (its tokenizer.json "
                                 f"differs from data.tokenizer={spec.tokenizer!r}); rebuild it or change the tokenizer")
            return d
        return build_source(s, tok, vocab_size=spec.vocab_size, val_fraction=frac, cache_dir=spec.cache_dir,
                            encoder=encoder, progress=progress)

    train_dirs = [one(s, train_frac) for s in resolved]
    val_dirs = [one(val_resolved, 1.0)] if val_resolved is not None else list(train_dirs)
    tok_dir = train_dirs[0]  # every build holds a copy of its tokenizer files
    shas = {read_manifest(d)["tokenizer_sha256"] for d in [*train_dirs, *val_dirs]}
    if len(shas) > 1:
        raise ValueError(f"the sources of data.source were tokenized with {len(shas)} different tokenizers; mixing "
                         f"them would mix vocabularies: give data.tokenizer=<HF tokenizer directory>")
    if tok is None:
        check_vocab(open_tokenizer(tok_dir), spec.model_vocab_size, "the data's tokenizer")
    return Built(train_dirs, [s.uri for s in resolved], val_dirs, tok_dir)


def open_tokenizer(build_dir: pathlib.Path) -> Tokenizer:
    """The tokenizer a build directory holds: an HF one (with ``tokenizer_config.json``) or our trained BPE."""
    if (build_dir / "tokenizer_config.json").is_file():
        return Tokenizer.from_pretrained(build_dir)
    return Tokenizer.from_file(build_dir / "tokenizer.json")


def _parts(dirs: Sequence[pathlib.Path], split: str, seq_len: int, names: Sequence[str],
           required: bool) -> tuple[list[PackedDataset], list[int]]:
    parts, kept = [], []
    for i, (d, name) in enumerate(zip(dirs, names)):
        m = read_manifest(d)
        n = m["splits"][split]["tokens"]
        if n < seq_len + 1:
            if required:
                raise ValueError(f"data.source {name!r} has {n} {split} tokens, fewer than one sample of "
                                 f"data.seq_len+1 = {seq_len + 1}; lower data.seq_len or data.val_fraction")
            continue
        parts.append(PackedDataset(d, split, seq_len, m))
        kept.append(i)
    return parts, kept


def open_all(spec: DataSpec, built: Built) -> tuple[MixedDataset, MixedDataset, Tokenizer]:
    """``(train mixture, validation mixture, tokenizer)`` over built directories."""
    train_parts, _ = _parts(built.train_dirs, "train", spec.seq_len, built.train_names, required=True)
    val_names = [spec.val_source] if spec.val_source else built.train_names
    val_parts, _ = _parts(built.val_dirs, "val", spec.seq_len, val_names, required=False)
    if not val_parts:
        raise ValueError(f"no validation sample of {spec.seq_len + 1} tokens: raise data.val_fraction "
                         f"(now {spec.val_fraction}) or give data.val_source")
    tok = open_tokenizer(built.tokenizer_dir)
    return (MixedDataset(train_parts, spec.weights or None, built.train_names),
            MixedDataset(val_parts, None, [str(p.dir) for p in val_parts]), tok)


def prepare_user_data(spec: DataSpec, encoder: Optional[Encoder] = None, progress: bool = True) -> dict[str, Any]:
    """Build every source once and describe the result (the dict :func:`raymoe.data.prepare_data` returns)."""
    built = build_all(spec, encoder, progress)
    train, val, tok = open_all(spec, built)
    from raymoe.data.build import dataset_info

    return dataset_info(train, val, tok, sha256_file(tok.path), dataset_dir=str(built.train_dirs[0]),
                        dataset_dirs=[str(d) for d in built.train_dirs], val_dirs=[str(d) for d in built.val_dirs],
                        mixture_counts=train.counts)
