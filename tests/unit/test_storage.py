"""Storage without a shared disk (:mod:`raymoe.storage`, :mod:`raymoe.checkpoint`), against a real S3 server.

A moto 5 server runs on 127.0.0.1 for the module; pyarrow finds it only through the standard environment
(``AWS_ENDPOINT_URL``, fake keys, region), as a cluster node would find its object store. Every storage test runs on
that S3 bucket and on a local directory:

* the storage operations (bytes and files both ways, ranged reads, list / exists / size / delete) and what pyarrow 26
  reads from the environment; malformed or credential-bearing URIs fail with a ``ValueError`` naming them;
* checkpoint validity by manifest-last: a writer killed before its manifest leaves the previous checkpoint the newest
  valid one; a missing or resized file invalidates one; altered bytes of the same size are caught by the hash when the
  file is read (object store) or when the checkpoint is chosen (local); pruning; unsafe manifest paths;
* a rank fetches only the shard files it reads (re-sharding ep=2 → ep=4) and loads from just those;
* training end to end in one process (native runtime, world of one): a run writes its checkpoints to S3, stops; a
  second run with a different run directory and ``train.resume=auto`` resumes from S3 and reproduces the
  uninterrupted run's per-step losses; after a shard's bytes are altered in S3, a third run falls back to the previous
  checkpoint and still reproduces them. Nothing of it touches the run directories' ``checkpoints/``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import uuid
from typing import Any, Iterator

import pytest
import torch

from raymoe import checkpoint as ckpt
from raymoe.config import ConfigError, ModelConfig, TrainConfig
from raymoe.storage import Storage, file_meta, stage_and_put
from s3_env import local_s3

BUCKET = "raymoe-test"
TINY = ModelConfig.preset("tiny")


# ---------------------------------------------------------------------- fixtures: a real S3 server, two backends
@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    with local_s3(BUCKET) as server:  # the one bucket creation
        yield {"endpoint": server.env["AWS_ENDPOINT_URL"], "bucket": BUCKET}


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """A fresh, empty storage root: a local directory or a prefix in the S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:8]}"


def _meta(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# ---------------------------------------------------------------------- storage operations
def test_storage_operations(root: str, tmp_path: pathlib.Path) -> None:
    st = Storage(root)
    small = bytes(range(256)) * 3
    assert st.write_bytes("a/b.bin", small) == _meta(small)
    assert st.read_bytes("a/b.bin") == small
    assert st.read_range("a/b.bin", 10, 5) == small[10:15]
    assert st.read_range("a/b.bin", len(small) - 3, 100) == small[-3:]  # short at the end of the file
    big = os.urandom((9 << 20) + 123)  # more than one 8 MiB chunk (a multipart upload on S3)
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    assert st.upload(src, "c/d/big.bin") == _meta(big) == file_meta(src)
    got = tmp_path / "down" / "big.bin"
    assert st.download("c/d/big.bin", got) == _meta(big) and got.read_bytes() == big
    st.write_bytes("c/e.txt", b"hello")
    assert st.list() == {"a/b.bin": len(small), "c/d/big.bin": len(big), "c/e.txt": 5}
    assert st.list("c") == {"d/big.bin": len(big), "e.txt": 5}
    assert st.list("nothing") == {}
    assert st.list_dirs() == ["a", "c"] and st.list_dirs("c") == ["d"]
    assert st.exists("a/b.bin") and st.exists("c") and not st.exists("zz") and not st.exists("a/b.bi")
    assert st.size("c/e.txt") == 5
    with pytest.raises(FileNotFoundError, match=r"zz does not exist"):
        st.size("zz")
    with pytest.raises(FileNotFoundError, match=r"/zz/y does not exist"):
        st.read_bytes("zz/y")
    sub = st.child("c")
    assert sub.uri == st.uri_of("c") and sub.read_bytes("e.txt") == b"hello" and sub.list() == st.list("c")
    st.write_bytes("c/e.txt", b"bye")  # overwrite
    assert st.read_bytes("c/e.txt") == b"bye" and st.size("c/e.txt") == 3
    st.delete("c")
    assert st.list() == {"a/b.bin": len(small)} and not st.exists("c/e.txt")
    st.delete("c")  # gone already: not an error
    st.delete("a/b.bin")
    assert st.list() == {}
    with pytest.raises(ValueError, match="refusing to delete the storage root"):
        st.delete("")
    for bad in ("../x", "/abs", "a//b", "a/./b", "a\\b"):
        with pytest.raises(ValueError, match="not a clean relative path"):
            st.write_bytes(bad, b"x")


def test_stage_and_put_reports_only_its_own_files(root: str) -> None:
    """Two writers staging into one destination at once (the ranks of a checkpoint) each report their own files."""
    dest = Storage(root).uri_of("ckpt")

    def writer(files: dict[str, bytes]):
        def write(d: pathlib.Path) -> None:
            for rel, data in files.items():
                (d / rel).parent.mkdir(parents=True, exist_ok=True)
                (d / rel).write_bytes(data)
        return write

    a = stage_and_put(dest, writer({"shards/pp0_ep0.safetensors": b"A" * 100}))
    b = stage_and_put(dest, writer({"stage0/rng_dp1.pt": b"B" * 7, "x.json": b"{}"}))
    assert a == {"shards/pp0_ep0.safetensors": _meta(b"A" * 100)}
    assert b == {"stage0/rng_dp1.pt": _meta(b"B" * 7), "x.json": _meta(b"{}")}
    assert Storage(dest).list() == {"shards/pp0_ep0.safetensors": 100, "stage0/rng_dp1.pt": 7, "x.json": 2}


def test_pyarrow_takes_the_endpoint_from_the_environment(s3: dict[str, Any]) -> None:
    """What the module docstring of raymoe.storage states about pyarrow 26 (S3Options as the pickled state shows)."""
    import pyarrow.fs as pafs

    def options(fs: Any) -> dict[str, Any]:
        return fs.__reduce__()[1][0]

    via_uri = options(pafs.FileSystem.from_uri(f"s3://{BUCKET}/x")[0])
    assert via_uri["endpoint_override"] == s3["endpoint"] and via_uri["scheme"] == "https"
    assert via_uri["region"] == "" and via_uri["allow_bucket_creation"] is False and via_uri["access_key"] is None
    assert options(pafs.S3FileSystem())["endpoint_override"] == ""  # the constructor ignores AWS_ENDPOINT_URL
    assert Storage(f"s3://{BUCKET}/probe").fs is not None  # and our Storage goes through from_uri:
    Storage(f"s3://{BUCKET}/probe").write_bytes("ok", b"1")  # it reaches the moto server over plain http
    assert Storage(f"s3://{BUCKET}").read_bytes("probe/ok") == b"1"


@pytest.mark.parametrize("uri, needle, syntax", [
    ("", "is empty", True),
    ("runs/relative", "is relative", True),
    ("s3://", "names no bucket", True),
    ("s3:///prefix", "names no bucket", True),
    ("gs://", "names no bucket", True),
    ("s3:/bucket/x", "malformed scheme", True),
    ("file://host/x", "needs an absolute path", True),
    ("s3://bucket/a b", "contains whitespace", True),
    ("s3://AKIAEXAMPLE:hunter2@bucket/x", "credentials in the URI are refused", True),
    ("s3://bucket/x?secret_key=hunter2", "looks like a credential", True),
    # only pyarrow can tell (config validation does no I/O and imports no pyarrow): its refusal, wrapped
    ("s3://bucket/x?bogus=1", "Unexpected query parameter in S3 URI: 'bogus'", False),
    ("nosuchfs://host/x", "Unrecognized filesystem type", False),
])
def test_malformed_storage_paths_fail_with_a_clear_error(s3: dict[str, Any], uri: str, needle: str,
                                                         syntax: bool) -> None:
    with pytest.raises(ValueError, match=needle) as e:
        Storage(uri)
    msg = str(e.value)
    assert "hunter2" not in msg and "\n" not in msg, msg  # never echo a secret
    assert msg.startswith("storage path "), msg
    if "hunter2" not in uri and uri:
        assert repr(uri.split("?")[0])[:-1] in msg, msg  # names the path
    if syntax:
        with pytest.raises(ConfigError, match=f"^train.storage_path .*{needle}"):
            TrainConfig(storage_path=uri)
    else:
        assert TrainConfig(storage_path=uri).storage_path == uri


def test_valid_storage_paths_pass_config_validation() -> None:
    for uri in ("/abs/dir", "file:///abs/dir", "s3://bucket/run", "gs://b/p", "hdfs://namenode:8020/run",
                "s3://bucket/run?allow_bucket_creation=true&scheme=http"):
        assert TrainConfig(storage_path=uri).storage_path == uri
    assert TrainConfig().storage_path is None


# ---------------------------------------------------------------------- checkpoints: manifest last
def _files(step: int) -> dict[str, bytes]:
    return {"shards/pp0_ep0.safetensors": bytes([step]) * (1000 + step), "stage0/rng_dp0.pt": b"r" * step,
            "coordinator.json": json.dumps({"step": step}).encode()}


def _write(store: ckpt.CheckpointStore, step: int, commit: bool = True) -> Any:
    """A checkpoint the way the controller writes one: the 'rank' and the 'coordinator' each stage and put their
    files and report hashes; the manifest is written last (unless ``commit`` is False: a writer killed before it)."""
    files = _files(step)
    dest = store.begin(step)
    tables = []
    for part in (("shards/pp0_ep0.safetensors", "stage0/rng_dp0.pt"), ("coordinator.json",)):
        def write(d: pathlib.Path, part: tuple = part) -> None:
            for rel in part:
                (d / rel).parent.mkdir(parents=True, exist_ok=True)
                (d / rel).write_bytes(files[rel])
        tables.append(stage_and_put(dest, write))
    if not commit:
        return dest
    return store.commit(dest, step, ckpt.merge_files(tables), {"tokens": 10 * step})


def _damage(ref: ckpt.CheckpointRef, rel: str, data: bytes) -> None:
    Storage(ref.location).write_bytes(rel, data)


def test_a_checkpoint_is_valid_only_once_its_manifest_is_written(root: str) -> None:
    store = ckpt.CheckpointStore(root)
    assert store.latest_valid() is None and store.steps() == []
    one, two = _write(store, 1), _write(store, 2)
    assert one.files == {rel: _meta(data) for rel, data in sorted(_files(1).items())}
    assert json.loads(Storage(two.location).read_bytes("manifest.json")) == {
        "step": 2, "files": two.files, "complete": True, "tokens": 20}
    assert store.latest_valid() == two
    dest = _write(store, 3, commit=False)  # every file of step 3 is there, its manifest is not
    assert Storage(dest).list() == {rel: len(d) for rel, d in _files(3).items()}
    assert store.latest_valid() == two  # the writer "died": the previous checkpoint stays the newest valid
    assert [r.step for r in store.candidates()] == [2, 1]
    assert store.steps() == ([1, 2] if root.startswith("/") else [1, 2, 3])  # local: still a .tmp dir
    with pytest.raises(ckpt.CheckpointCorrupt, match="manifest.json missing"):
        store.open(dest)
    three = store.commit(dest, 3, {rel: _meta(d) for rel, d in _files(3).items()}, {"tokens": 30})
    assert store.latest_valid() == three and store.open(three.location) == three


def test_commit_refuses_files_that_never_arrived(root: str) -> None:
    store = ckpt.CheckpointStore(root)
    dest = _write(store, 5, commit=False)
    claimed = {**{rel: _meta(d) for rel, d in _files(5).items()}, "shards/pp1_ep0.safetensors": _meta(b"x")}
    with pytest.raises(ckpt.CheckpointCorrupt, match="shards/pp1_ep0.safetensors"):
        store.commit(dest, 5, claimed)
    assert store.latest_valid() is None


def test_missing_or_resized_files_invalidate_a_checkpoint(root: str, caplog: pytest.LogCaptureFixture) -> None:
    store = ckpt.CheckpointStore(root)
    one, two, three = _write(store, 1), _write(store, 2), _write(store, 3)
    Storage(three.location).delete("stage0/rng_dp0.pt")
    _damage(two, "shards/pp0_ep0.safetensors", b"\x02" * 999)  # one byte short
    with caplog.at_level(logging.WARNING, logger="raymoe.checkpoint"):
        assert store.latest_valid() == one
    msgs = [r.getMessage() for r in caplog.records if r.name == "raymoe.checkpoint"]
    assert any("step_00000003: stage0/rng_dp0.pt is missing" in m for m in msgs), msgs
    assert any("step_00000002: shards/pp0_ep0.safetensors has 999 bytes, manifest says 1002" in m for m in msgs), msgs


def test_altered_bytes_are_caught_by_the_hash(root: str, caplog: pytest.LogCaptureFixture) -> None:
    """Same size, different bytes. An object store's checkpoint is checked by size when chosen and by sha256 when a
    file is read (here: fetched into scratch); a local one has every hash checked when chosen."""
    store = ckpt.CheckpointStore(root)
    one, two = _write(store, 1), _write(store, 2)
    bad = bytearray(_files(2)["shards/pp0_ep0.safetensors"])
    bad[500] ^= 0xFF
    _damage(two, "shards/pp0_ep0.safetensors", bytes(bad))
    if root.startswith("/"):
        with caplog.at_level(logging.WARNING, logger="raymoe.checkpoint"):
            assert store.latest_valid() == one
        assert "shards/pp0_ep0.safetensors checksum mismatch" in caplog.text
        return
    assert store.latest_valid() == two
    with ckpt.local_copy(two, ["coordinator.json"]) as d:  # an intact file of the same checkpoint loads
        assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == ["coordinator.json"]
        assert (d / "coordinator.json").read_bytes() == _files(2)["coordinator.json"]
    assert not d.exists()  # scratch removed
    with pytest.raises(ckpt.ChecksumMismatch, match=r"step_00000002: shards/pp0_ep0.safetensors checksum mismatch"):
        with ckpt.local_copy(two, ["shards/pp0_ep0.safetensors"]):
            pass
    with ckpt.local_copy(one, ["shards/pp0_ep0.safetensors"]) as d:
        assert (d / "shards/pp0_ep0.safetensors").read_bytes() == _files(1)["shards/pp0_ep0.safetensors"]


def test_manifests_with_unsafe_or_malformed_entries_are_rejected(s3: dict[str, Any],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    root = f"s3://{BUCKET}/unsafe-{uuid.uuid4().hex[:8]}"
    store = ckpt.CheckpointStore(root)
    good = _write(store, 1)
    for step, files in ((2, {"../../escape": _meta(b"x")}), (3, {"a.bin": {"sha256": "zz", "bytes": 1}})):
        st = store.root.child(ckpt.step_dir_name(step))
        st.write_bytes("a.bin", b"x")
        st.write_bytes("manifest.json", json.dumps({"step": step, "files": files, "complete": True}).encode())
    with caplog.at_level(logging.WARNING, logger="raymoe.checkpoint"):
        assert store.latest_valid() == good
    assert "manifest lists an unsafe path" in caplog.text and "manifest entry for a.bin is malformed" in caplog.text
    with pytest.raises(ckpt.CheckpointCorrupt, match="unsafe path"):
        store.open(store.root.uri_of("step_00000002"))
    store.root.child("step_00000004").write_bytes("manifest.json", b"{not json")
    with pytest.raises(ckpt.CheckpointCorrupt, match="manifest.json is not valid JSON"):
        store.open(store.root.uri_of("step_00000004"))


def test_prune_keeps_the_newest_committed_checkpoints(root: str) -> None:
    store = ckpt.CheckpointStore(root)
    _write(store, 1), _write(store, 2)
    _write(store, 3, commit=False)  # a dead writer's leftovers, older than the newest committed checkpoint
    four = _write(store, 4)
    store.prune(2)
    assert [r.step for r in store.candidates()] == [4, 2]
    assert store.steps() == [2, 4]
    assert Storage(four.location).list() == {**{rel: len(d) for rel, d in _files(4).items()},
                                             "manifest.json": Storage(four.location).size("manifest.json")}


def test_resaving_a_step_replaces_the_old_checkpoint(root: str) -> None:
    store = ckpt.CheckpointStore(root)
    _write(store, 1)
    old = _write(store, 2)
    Storage(old.location).write_bytes("stale.bin", b"from an older save")
    new = _write(store, 2)
    assert new.files == old.files and store.latest_valid() == new
    assert not Storage(new.location).exists("stale.bin")


# ---------------------------------------------------------------------- a rank fetches only the shards it reads
def test_a_rank_fetches_only_the_shards_it_reads(tmp_path: pathlib.Path) -> None:
    from raymoe.optim import GuardedAdamW
    from raymoe.train import parallelize as par
    from raymoe.train import sharded
    from raymoe.train.topology import Topology

    ref = par.build_model(TINY, 0)
    saved = tmp_path / "saved"
    t2 = Topology(1, 2, 1, "1f1b", 1, TINY)
    for r in range(2):  # saved at ep=2: pp0_ep0 (dense + experts 0..3), pp0_ep1 (experts 4..7)
        m = par.build_model(TINY, 0)
        par.apply_ep(m, t2, r, None)
        sharded.save_rank(m, GuardedAdamW(m.parameters()), t2, r, saved)
    files = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*.safetensors"))
    assert files == ["shards/pp0_ep0.safetensors", "shards/pp0_ep1.safetensors"]

    def header(rel: str) -> dict:
        data = (saved / rel).read_bytes()
        return sharded.read_header(lambda off, n: data[off:off + n], rel)

    headers = {rel: header(rel) for rel in files}
    t4 = Topology(1, 4, 1, "1f1b", 1, TINY)
    full = dict(ref.named_parameters())
    for rank, want in ((0, files[:1]), (1, files[:1]), (2, files), (3, files)):  # experts 0-1, 2-3 | 4-5, 6-7
        m = par.build_model(TINY, 1)
        par.apply_ep(m, t4, rank, None)
        needed = sharded.needed_shards(m, headers)
        assert needed == want, (rank, needed)
        only = tmp_path / f"rank{rank}"
        for rel in needed:
            (only / rel).parent.mkdir(parents=True, exist_ok=True)
            (only / rel).write_bytes((saved / rel).read_bytes())
        sharded.load_rank(m, GuardedAdamW(m.parameters()), t4, rank, only)  # what it fetched is enough
        rows = sharded.expert_rows(m)
        for n, p in m.named_parameters():
            exp = full[n][rows[n][0]:rows[n][1]] if n in rows else full[n]
            assert torch.equal(p.detach(), exp.detach()), (rank, n)
    with pytest.raises(sharded.IncompatibleCheckpoint, match="header length"):
        sharded.read_header(lambda off, n: b"\xff" * n, "garbage")


# ---------------------------------------------------------------------- training: resume from S3 elsewhere
def _run_config(run_dir: pathlib.Path, storage: str | None, resume: str, stop: int | None = None,
                checkpoint_every: int = 2, keep: int = 3, export_hf: bool = False, impl: str = "native",
                steps: int = 4) -> Any:
    from raymoe.config import BalanceConfig, DataConfig, LoggerConfig, ParallelConfig, RunConfig

    return RunConfig(
        model=TINY,
        parallel=ParallelConfig(dp=1, dp_impl=impl),
        train=TrainConfig(steps=steps, micro_batch_size=2, num_microbatches=2, checkpoint_every=checkpoint_every,
                          eval_every=100, eval_batches=1, warmup_tokens=200, seed=0, resume=resume,
                          export_hf=export_hf, stop_after_steps=stop, keep_checkpoints=keep, storage_path=storage),
        data=DataConfig(seq_len=32),
        logger=LoggerConfig(kind="none"),
        balance=BalanceConfig(histogram_every=100),
        run_dir=str(run_dir),
    )


def _train(run: Any) -> dict[str, Any]:
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    info = prepare_data(run, progress=False)
    group = LocalWorkerGroup(run, 0)  # a fresh rank: freshly initialised weights, as on a new node
    ctrl = TrainController(run, group, info["train_samples"], info["val_samples"], data_info=info)
    try:
        ctrl.resume_if_requested()
        return ctrl.run_loop()
    finally:
        ctrl.close()
        group.shutdown()


def test_training_resumes_from_object_storage_in_another_run_dir(s3: dict[str, Any], tmp_path: pathlib.Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core box; also what makes the runs below comparable bit for bit
    try:
        _training_scenario(tmp_path, caplog)
    finally:
        torch.set_num_threads(threads)


def _training_scenario(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = f"s3://{BUCKET}/train-{uuid.uuid4().hex[:8]}"
    store = ckpt.CheckpointStore(storage)
    ref = _train(_run_config(tmp_path / "ref", None, "never", checkpoint_every=100))
    assert ref["finished"] and len(ref["losses"]) == 4

    # A: 3 of 4 steps, checkpoints at steps 2 and 3 go to S3 only
    a = _train(_run_config(tmp_path / "a", storage, "auto", stop=3))
    assert not a["finished"] and a["losses"] == pytest.approx(ref["losses"][:3], abs=1e-6, rel=0)
    assert a["checkpoint"] == store.root.uri_of("step_00000003") and a["storage"] == storage
    assert store.steps() == [2, 3] and not (tmp_path / "a" / "checkpoints").exists()
    assert json.loads(Storage(storage).read_bytes("summary.json")) == json.loads((tmp_path / "a" / "summary.json").read_text())
    files3 = store.latest_valid().files
    assert {"shards/pp0_ep0.safetensors", "coordinator.json", "coordinator.safetensors", "config.json",
            "layout.json", "expert_load.safetensors", "data.json", "hf_extra/tokenizer.json",
            "hf_extra/tokenizer_config.json", "hf_extra/generation_config.json"} == set(files3)

    # B1: another run dir, resume=auto from S3; finishes, exports hf/ to S3 too, prunes to 2 checkpoints
    b1 = _train(_run_config(tmp_path / "b1", storage, "auto", keep=2, export_hf=True))
    assert b1["resumed_from"] == store.root.uri_of("step_00000003")
    assert b1["finished"] and b1["losses"] == pytest.approx(ref["losses"], abs=1e-6, rel=0)
    assert store.steps() == [3, 4] and not (tmp_path / "b1" / "checkpoints").exists()
    local_hf = {p.relative_to(tmp_path / "b1" / "hf").as_posix(): file_meta(p)
                for p in (tmp_path / "b1" / "hf").rglob("*") if p.is_file()}
    hf = Storage(b1["hf_export_uri"])
    assert b1["hf_export_uri"] == f"{storage}/hf" and {"config.json", "expert_load.safetensors"} <= set(local_hf)
    assert hf.list() == {rel: m["bytes"] for rel, m in local_hf.items()}
    assert all(hashlib.sha256(hf.read_bytes(rel)).hexdigest() == m["sha256"] for rel, m in local_hf.items())
    step4 = store.latest_valid()
    assert step4.step == 4

    # damage step 4's shard in S3 (same size, one byte flipped inside the tensor data)
    shard = "shards/pp0_ep0.safetensors"
    Storage(step4.location).download(shard, tmp_path / "b1_step4.safetensors")
    data = bytearray(Storage(step4.location).read_bytes(shard))
    data[-100] ^= 0x01
    Storage(step4.location).write_bytes(shard, bytes(data))
    assert store.latest_valid() == step4  # sizes match: only the hash on read can tell

    # B2: yet another run dir; the rank's fetch fails the hash, the controller falls back to step 3
    with caplog.at_level(logging.WARNING, logger="raymoe.train.controller"):
        b2 = _train(_run_config(tmp_path / "b2", storage, "auto", keep=2))
    warned = [r.getMessage() for r in caplog.records if r.name == "raymoe.train.controller"]
    assert any(f"{step4.location}: {shard} checksum mismatch" in m and "falling back" in m for m in warned), warned
    assert b2["resumed_from"] == store.root.uri_of("step_00000003")
    assert b2["finished"] and b2["losses"] == pytest.approx(ref["losses"], abs=1e-6, rel=0)
    again = store.latest_valid()  # step 4 was written again, whole, by B2: the same tensors as B1's
    assert again.step == 4 and again.files[shard]["bytes"] == step4.files[shard]["bytes"]
    with ckpt.local_copy(again, [shard]) as d:  # (not the same bytes: safetensors orders its metadata at random)
        _assert_same_tensors(d / shard, tmp_path / "b1_step4.safetensors")


def _assert_same_tensors(a: pathlib.Path, b: pathlib.Path) -> None:
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k


# ---------------------------------------------------------------------- the DeepSpeed runtime on S3 (subprocess)
def deepspeed_scenario(work: pathlib.Path, storage: str) -> dict[str, Any]:
    """Runs in a subprocess (a DeepSpeed engine cannot be built twice in one process; torch.distributed state stays out
    of pytest): one world-of-one DeepSpeed group; run A trains 3 steps with checkpoints at steps 2 and 3 in S3; run B
    (another run directory, same group, so its weights are A's final ones until the load) resumes from the S3 URI of
    step 2, trains step 2 again, re-saves step 3 and exports hf/ (rank 0 uploads it, the controller copies it)."""
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    run_a = _run_config(work / "a", storage, "never", impl="deepspeed", steps=3)
    info = prepare_data(run_a, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = LocalWorkerGroup(run_a, port)
    store = ckpt.CheckpointStore(storage)
    out: dict[str, Any] = {}
    try:
        for name, run in (("a", run_a), ("b", _run_config(work / "b", storage, store.root.uri_of("step_00000002"),
                                                           impl="deepspeed", steps=3, export_hf=True))):
            ctrl = TrainController(run, group, info["train_samples"], info["val_samples"], data_info=info)
            try:
                ctrl.resume_if_requested()
                out[name] = ctrl.run_loop()
            finally:
                ctrl.close()
            out[f"{name}_steps"] = store.steps()
            out[f"{name}_files"] = store.latest_valid().files
        local = work / "b" / "hf"
        out["hf_local"] = {p.relative_to(local).as_posix(): file_meta(p) for p in local.rglob("*") if p.is_file()}
        hf = Storage(f"{storage}/hf")
        out["hf_remote"] = {rel: _meta(hf.read_bytes(rel)) for rel in hf.list()}
        out["local_checkpoints"] = [str(p) for p in work.rglob("checkpoints")]
    finally:
        group.worker.close()
    return out


def test_deepspeed_checkpoints_and_export_go_to_s3(s3: dict[str, Any], tmp_path: pathlib.Path) -> None:
    pytest.importorskip("deepspeed")
    storage = f"s3://{BUCKET}/ds-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}  # carries the fixture's AWS_* variables
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), storage], cwd=pathlib.Path(__file__).parents[2],
                          env=env, capture_output=True, text=True, timeout=400)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-6000:]
    r = json.loads(lines[-1][len("RESULT "):])
    a, b = r["a"], r["b"]
    assert a["finished"] and r["a_steps"] == [2, 3]
    assert {"stage0/engine/mp_rank_00_model_states.pt", "stage0/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "stage0/rng_dp0.pt", "coordinator.safetensors"} <= set(r["a_files"])
    assert b["resumed_from"] == f"{storage}/checkpoints/step_00000002" and b["finished"]
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-6, rel=0)  # step 2 again, from S3, gives A's loss
    assert r["b_steps"] == [2, 3] and set(r["b_files"]) == set(r["a_files"])
    assert b["hf_export_uri"] == f"{storage}/hf" and b["hf_export"] == str(tmp_path / "b" / "hf")
    assert {"config.json", "model.safetensors", "generation_config.json", "expert_load.safetensors"} <= set(r["hf_local"])
    assert r["hf_remote"] == r["hf_local"]  # same files, same bytes, in S3 and in the run directory
    assert r["local_checkpoints"] == []


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result = deepspeed_scenario(pathlib.Path(sys.argv[1]), sys.argv[2])
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # skip interpreter teardown (gloo / DeepSpeed comm threads; see fp8_ds_worker.py)


# ---------------------------------------------------------------------- serving reads a model from storage
def test_a_model_export_in_s3_is_materialized_once_per_node_and_serves_the_same(s3: dict[str, Any], tiny_ckpt,
                                                                                 tmp_path: pathlib.Path) -> None:
    from raymoe.engine import LLMEngine, SamplingParams
    from raymoe.storage import materialize

    uri = f"s3://{s3['bucket']}/models/{uuid.uuid4().hex[:8]}/hf"
    Storage(uri).put_dir(tiny_ckpt)
    cache = tmp_path / "cache"
    local = materialize(uri, cache)
    names = sorted(p.name for p in pathlib.Path(tiny_ckpt).iterdir() if p.is_file())
    assert sorted(p.name for p in local.iterdir() if p.name != ".listing.json") == names
    for n in names:
        assert (local / n).read_bytes() == (pathlib.Path(tiny_ckpt) / n).read_bytes(), n
    stamp = (local / ".listing.json").stat().st_mtime_ns
    assert materialize(uri, cache) == local and (local / ".listing.json").stat().st_mtime_ns == stamp  # reused
    Storage(uri).write_bytes("extra.txt", b"changed")  # the export changed: copied again
    again = materialize(uri, cache)
    assert again == local and (again / "extra.txt").read_bytes() == b"changed"
    assert materialize(str(tiny_ckpt)) == pathlib.Path(tiny_ckpt)  # a local path is used in place
    with pytest.raises(FileNotFoundError, match="nothing stored"):
        materialize(f"s3://{s3['bucket']}/models/absent", cache)
    params = SamplingParams(max_tokens=8, temperature=0)
    ref = LLMEngine.from_pretrained(tiny_ckpt).generate(["The river runs"], params)[0].outputs[0].token_ids
    got = LLMEngine.from_pretrained(local).generate(["The river runs"], params)[0].outputs[0].token_ids
    assert got == ref


def test_serve_takes_a_storage_uri_as_model_path(s3: dict[str, Any], tiny_ckpt) -> None:
    from raymoe.jobs.configs import InvalidConfig
    from raymoe.jobs.serve import app_args

    uri = f"s3://{s3['bucket']}/models/{uuid.uuid4().hex[:8]}/hf"
    with pytest.raises(InvalidConfig, match="no config.json there"):
        app_args({"model_path": uri})
    Storage(uri).put_dir(tiny_ckpt)
    assert app_args({"model_path": uri})["model_path"] == uri  # handed to the replicas as is
    with pytest.raises(InvalidConfig, match="model_path"):
        app_args({"model_path": "s3://KEY:SECRET@bucket/hf"})  # credentials never in a logged config
