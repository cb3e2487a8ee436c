"""Checksummed checkpoints that are valid only once their manifest is written, on a local disk or an object store.

Layout under ``<storage>/checkpoints/`` (``<storage>`` = ``train.storage_path``, default the run directory)::

    step_00000100/            one checkpoint
        manifest.json         {"step": 100, "files": {"relpath": {"sha256": ..., "bytes": ...}}, "complete": true,
                              "tokens": ...}; written LAST
        coordinator.json      step, tokens, data position, balancer/metrics state (plain JSON) ...
        coordinator.safetensors  ... and its tensors (biases, load window): never a pickle
        config.json           the RunConfig as plain JSON
        layout.json           pp / ep / dp / schedule / dp_impl of the writer
        expert_load.safetensors  token counts per routed expert (serving's EPLB seed)
        shards/..., stage0/...   whatever the ranks wrote (sharded safetensors; DeepSpeed engine files, RNG per rank)
    .tmp-step_00000200-<pid>/ local storage only: a checkpoint being written (ignored by readers)

Who writes what: every rank writes its files into a staging directory, hashes them and puts them under the
checkpoint's prefix (:func:`raymoe.storage.stage_and_put`), then returns ``{relpath: {sha256, bytes}}`` to the
coordinator; the coordinator does the same with its own files, merges the tables (:func:`merge_files`) and writes the
manifest last (:meth:`CheckpointStore.commit`). Two commit protocols behind one API (:class:`CheckpointStore`):

* **local** (a plain path or ``file://``, the default): the ranks stage inside ``.tmp-step_X-<pid>/`` (publishing is a
  rename per file), :func:`commit` writes the manifest from the ranks' hashes (hashing only files nobody reported),
  fsyncs it, and renames the directory into place (``os.replace`` is atomic on one filesystem). This is the old
  scheme, and as fast: nothing is copied, every file is hashed once (by its writer, in parallel).
* **object store** (``s3://``, ``gs://``, ...; there is no rename): files go straight to ``step_X/``; before the
  manifest is written the coordinator checks that every listed object exists with its size; the manifest's
  appearance commits. A writer killed halfway leaves a prefix without a manifest, which readers skip; the previous
  checkpoint stays the newest valid one. Re-saving a step deletes the old prefix first, manifest first.

Validity (:meth:`CheckpointStore.candidates`, newest first; a bad one is skipped with a warning naming the file): the
manifest exists, parses, is complete, names this step and only clean relative paths, and every listed file exists
with the listed size. Local checkpoints have every sha256 checked up front (as before: the files are right there);
on an object store the hash is checked when a file is read: a rank downloads only the files it needs into node-local
scratch (:func:`local_copy`, :func:`fetch`) and a mismatch raises :class:`ChecksumMismatch`, on which the controller
falls back to the previous checkpoint. Pruning deletes a checkpoint's manifest before its files, so a half-pruned
checkpoint is never taken for a valid one. Nothing here unpickles checkpoint data; manifests are JSON and their paths
are checked before anything is read or written with them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
from typing import Any, Iterable, Iterator, Optional

from raymoe.jsonfile import load_object
from raymoe.storage import Storage, clean_relpath, is_local, scratch_dir

__all__ = ["CheckpointCorrupt", "ChecksumMismatch", "CheckpointRef", "CheckpointStore", "new_tmp_dir", "commit",
           "verify", "list_checkpoints", "latest_valid", "prune", "merge_files", "fetch", "local_copy",
           "check_manifest", "step_dir_name", "MANIFEST"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{8})$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
MANIFEST = "manifest.json"


class CheckpointCorrupt(RuntimeError):
    pass


class ChecksumMismatch(CheckpointCorrupt):
    """A file's bytes (size or sha256) differ from the manifest, or it vanished: damage in storage or in transit.
    The controller falls back to the previous checkpoint on this one (not on other :class:`CheckpointCorrupt`, e.g. a
    hostile file with a consistent manifest, which stops the resume)."""


class _Partial(CheckpointCorrupt):
    """No manifest: a checkpoint still being written, or whose writer died."""


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def check_manifest(manifest: Any, where: str, step: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """The manifest's file table after structural checks (it comes from storage: untrusted); raises
    :class:`CheckpointCorrupt` naming ``where`` and the first problem."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointCorrupt(f"{where}: manifest.json is not a raymoe manifest (no 'files' table)")
    if not manifest.get("complete"):
        raise CheckpointCorrupt(f"{where}: manifest not marked complete")
    if not isinstance(manifest.get("step"), int) or (step is not None and manifest["step"] != step):
        raise CheckpointCorrupt(f"{where}: manifest says step {manifest.get('step')!r}, expected {step}")
    for rel, meta in manifest["files"].items():
        try:
            clean_relpath(rel)
        except (ValueError, TypeError) as e:
            raise CheckpointCorrupt(f"{where}: manifest lists an unsafe path: {e}") from None
        if rel == MANIFEST or not rel:
            raise CheckpointCorrupt(f"{where}: manifest lists {rel!r}")
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not _SHA.match(meta["sha256"])
                or not isinstance(meta.get("bytes"), int) or isinstance(meta["bytes"], bool) or meta["bytes"] < 0):
            raise CheckpointCorrupt(f"{where}: manifest entry for {rel} is malformed: {meta!r:.200}")
    return manifest["files"]


# ---------------------------------------------------------------------- local directories (rename-based commit)
def new_tmp_dir(root: str | pathlib.Path, step: int) -> pathlib.Path:
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-{step_dir_name(step)}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def commit(tmp: pathlib.Path, step: int, extra: Optional[dict[str, Any]] = None,
           known: Optional[dict[str, dict[str, Any]]] = None) -> pathlib.Path:
    """Write the manifest of every file in ``tmp``, fsync, and rename to ``step_XXXXXXXX``.

    ``known``: hashes the writers already computed (``{relpath: {sha256, bytes}}``); a file listed there with the
    same size is not hashed again, any other file is. A file in ``known`` that is not in ``tmp`` is an error (a rank
    reported a file that never arrived)."""
    known = known or {}
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            rel = p.relative_to(tmp).as_posix()
            size = p.stat().st_size
            k = known.get(rel)
            files[rel] = {"sha256": k["sha256"], "bytes": size} if k and k["bytes"] == size else \
                {"sha256": _sha256(p), "bytes": size}
    lost = sorted(set(known) - set(files))
    if lost:
        raise CheckpointCorrupt(f"{tmp}: files reported by the writers are not there: {', '.join(lost[:5])}")
    manifest = {"step": step, "files": files, "complete": True, **(extra or {})}
    mpath = tmp / MANIFEST
    with open(mpath, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = tmp.parent / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def verify(ckpt: str | pathlib.Path) -> dict[str, Any]:
    """Raise :class:`CheckpointCorrupt` naming the first bad file; return the manifest when all files match."""
    ckpt = pathlib.Path(ckpt)
    mpath = ckpt / MANIFEST
    if not mpath.exists():
        raise _Partial(f"{ckpt}: manifest.json missing (partial checkpoint)")
    manifest = load_object(mpath.read_bytes(), f"{ckpt}: manifest.json", CheckpointCorrupt)
    for rel, meta in check_manifest(manifest, str(ckpt)).items():
        p = ckpt / rel
        if not p.exists():
            raise CheckpointCorrupt(f"{ckpt}: {rel} is missing")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointCorrupt(f"{ckpt}: {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']}")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointCorrupt(f"{ckpt}: {rel} checksum mismatch")
    return manifest


def list_checkpoints(root: str | pathlib.Path) -> list[pathlib.Path]:
    """Committed checkpoint dirs, oldest first."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_valid(root: str | pathlib.Path) -> Optional[pathlib.Path]:
    """Newest checkpoint whose checksums verify; corrupt ones are skipped with a warning."""
    for ckpt in reversed(list_checkpoints(root)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointCorrupt as e:
            log.warning("skipping corrupt checkpoint: %s; falling back to the previous one", e)
    return None


def prune(root: str | pathlib.Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- any storage
@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """One valid checkpoint: what the coordinator hands the ranks to load (plain values: it crosses Ray).

    ``location`` is a local directory (local storage) or the storage URI of the ``step_XXXXXXXX`` prefix; ``files``
    is the manifest's table ``{relpath: {"sha256", "bytes"}}``."""

    step: int
    location: str
    files: dict[str, dict[str, Any]]

    @property
    def local(self) -> bool:
        return is_local(self.location)

    @property
    def name(self) -> str:
        return step_dir_name(self.step)


def merge_files(tables: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One manifest table from the writers' tables; the same path reported twice must have the same content."""
    out: dict[str, dict[str, Any]] = {}
    for t in tables:
        for rel, meta in t.items():
            if rel in out and out[rel] != meta:
                raise CheckpointCorrupt(f"two writers put {rel} with different contents ({out[rel]} vs {meta})")
            out[rel] = dict(meta)
    return dict(sorted(out.items()))


def fetch(ref: CheckpointRef, rels: Iterable[str], into: pathlib.Path) -> pathlib.Path:
    """Download the files ``rels`` of ``ref`` into ``into`` (node-local), each checked against the manifest's size
    and sha256 as it streams; a mismatch or a vanished file raises :class:`ChecksumMismatch` naming it."""
    st = Storage(ref.location)
    for rel in rels:
        meta = ref.files.get(rel)
        if meta is None:
            raise CheckpointCorrupt(f"{ref.location}: {rel} is not in the manifest")
        target = into / clean_relpath(rel)
        try:
            got = st.download(rel, target)
        except FileNotFoundError:
            raise ChecksumMismatch(f"{ref.location}: {rel} is missing") from None
        if got["bytes"] != meta["bytes"]:
            raise ChecksumMismatch(f"{ref.location}: {rel} has {got['bytes']} bytes, manifest says {meta['bytes']}")
        if got["sha256"] != meta["sha256"]:
            target.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{ref.location}: {rel} checksum mismatch")
    return into


@contextlib.contextmanager
def local_copy(ref: CheckpointRef, rels: Optional[Iterable[str]] = None) -> Iterator[pathlib.Path]:
    """The checkpoint as a local directory holding at least ``rels`` (all files when None): the directory itself for
    local storage (its hashes were checked when it was chosen), else node-local scratch with just those files,
    hash-checked on download and removed on exit."""
    if ref.local:
        yield pathlib.Path(ref.location)
        return
    d = scratch_dir(f"raymoe-{ref.name}-")
    try:
        fetch(ref, ref.files if rels is None else rels, d)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class CheckpointStore:
    """The checkpoints of a run under ``<storage>/checkpoints/`` (see the module docstring for both protocols).

    Args:
        storage_uri: ``train.storage_path`` or the run directory (:class:`raymoe.storage.Storage` syntax).
    """

    def __init__(self, storage_uri: str) -> None:
        self.storage = Storage(storage_uri)
        self.root = self.storage.child("checkpoints")
        self.local_root = self.root.local_root  # set for local storage: the rename-based protocol

    @property
    def uri(self) -> str:
        return self.root.uri

    def steps(self) -> list[int]:
        """Steps that have a checkpoint directory / prefix (committed or not), oldest first."""
        if self.local_root is not None:
            return [int(p.name[5:]) for p in list_checkpoints(self.local_root)]
        return sorted(int(m.group(1)) for n in self.root.list_dirs() if (m := _NAME.match(n)))

    def begin(self, step: int) -> str:
        """Where the writers of ``step`` put their files: a fresh local temporary directory, or the step's prefix in
        the object store (emptied first, manifest first, when a stale write or an older save of this step is there)."""
        if self.local_root is not None:
            return str(new_tmp_dir(self.local_root, step))
        name = step_dir_name(step)
        if self.root.exists(name):
            self._delete(name)
        return self.root.uri_of(name)

    def commit(self, dest: str, step: int, files: dict[str, dict[str, Any]],
               extra: Optional[dict[str, Any]] = None) -> CheckpointRef:
        """Write the manifest of ``files`` (the merged tables of every writer) last; returns the new checkpoint."""
        if self.local_root is not None:
            final = commit(pathlib.Path(dest), step, extra, known=files)
            return CheckpointRef(step, str(final), json.loads((final / MANIFEST).read_text())["files"])
        st = self.root.child(step_dir_name(step))
        present = st.list()
        for rel, meta in files.items():
            if present.get(rel) != meta["bytes"]:
                raise CheckpointCorrupt(f"{st.uri}: {rel} was reported with {meta['bytes']} bytes but storage has "
                                        f"{present.get(rel, 'no such object')}; not committing")
        manifest = {"step": step, "files": dict(sorted(files.items())), "complete": True, **(extra or {})}
        check_manifest(manifest, st.uri, step)
        st.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
        return CheckpointRef(step, st.uri, manifest["files"])

    def _check_remote(self, st: Storage, step: Optional[int]) -> CheckpointRef:
        try:
            raw = st.read_bytes(MANIFEST)
        except FileNotFoundError:
            raise _Partial(f"{st.uri}: manifest.json missing (partial checkpoint)") from None
        manifest = load_object(raw, f"{st.uri}: manifest.json", CheckpointCorrupt)
        files = check_manifest(manifest, st.uri, step)
        present = st.list()
        for rel, meta in files.items():
            if rel not in present:
                raise CheckpointCorrupt(f"{st.uri}: {rel} is missing")
            if present[rel] != meta["bytes"]:
                raise ChecksumMismatch(f"{st.uri}: {rel} has {present[rel]} bytes, manifest says {meta['bytes']}")
        return CheckpointRef(manifest["step"], st.uri, files)

    def candidates(self) -> Iterator[CheckpointRef]:
        """Valid checkpoints, newest first (lazily: the next one is checked only when asked for). An invalid one is
        skipped with a warning, a partial one (no manifest yet) with an info line."""
        for step in reversed(self.steps()):
            try:
                if self.local_root is not None:
                    d = self.local_root / step_dir_name(step)
                    yield CheckpointRef(step, str(d), verify(d)["files"])
                else:
                    yield self._check_remote(self.root.child(step_dir_name(step)), step)
            except _Partial as e:
                log.info("skipping incomplete checkpoint: %s", e)
            except CheckpointCorrupt as e:
                log.warning("skipping corrupt checkpoint: %s; falling back to the previous one", e)

    def latest_valid(self) -> Optional[CheckpointRef]:
        return next(self.candidates(), None)

    def open(self, location: str) -> CheckpointRef:
        """An explicitly named checkpoint (``train.resume=<dir or URI>``), checked like a candidate; raises
        :class:`CheckpointCorrupt` naming the problem instead of skipping it."""
        st = Storage(location)
        if st.local_root is not None:
            manifest = verify(st.local_root)
            return CheckpointRef(manifest["step"], str(st.local_root), manifest["files"])
        m = _NAME.match(location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1])
        return self._check_remote(st, int(m.group(1)) if m else None)

    def _delete(self, name: str) -> None:
        self.root.delete(f"{name}/{MANIFEST}")  # invalid from here on, whatever happens to the rest
        self.root.delete(name)

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` committed checkpoints; older ones go, manifest first. On an object store, prefixes
        without a manifest older than the newest committed checkpoint (dead writers) go too."""
        if self.local_root is not None:
            prune(self.local_root, keep)
            return
        steps = self.steps()
        committed = [s for s in steps if self.root.exists(f"{step_dir_name(s)}/{MANIFEST}")]
        doomed = committed[:-keep] + [s for s in steps if s not in committed and committed and s < committed[-1]]
        for s in sorted(doomed):
            self._delete(step_dir_name(s))
