"""Storage without a shared disk: one small layer over ``pyarrow.fs`` for checkpoints, exports and summaries.

Why: a rank writes its checkpoint shard on its own node; on a multi-node cluster a rank restarted on another node
cannot see that disk. ``train.storage_path`` names a place every node reaches — ``s3://bucket/prefix``,
``gs://bucket/prefix``, ``hdfs://namenode:8020/path``, anything :func:`pyarrow.fs.FileSystem.from_uri` resolves — or a
plain absolute path / ``file:///abs`` (a shared or single-node disk; ``None`` = the run directory, the old default).
:class:`Storage` offers what the checkpoint layer needs and nothing more: write bytes / upload a local file, read bytes
(or a byte range) / download to a local path, list a prefix, exists, size, delete a prefix. Each transfer streams in
8 MiB chunks and returns ``{"sha256", "bytes"}`` of what went through, so hashing costs no second pass.

Endpoint and credentials come only from the standard environment, never from a config value (``storage_path`` is
logged: ``config.json`` in every checkpoint, wandb, ``summary.json``). :func:`check_uri` therefore refuses
``s3://KEY:SECRET@bucket`` and query parameters named like secrets. What pyarrow 26.0.1 does (checked against a moto 5
server, ``tests/unit/test_storage.py``):

* ``FileSystem.from_uri("s3://bucket/prefix")`` copies ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, verbatim into
  ``S3Options.endpoint_override``. An endpoint with a scheme (``http://127.0.0.1:9000``) is used with that scheme
  although ``S3Options.scheme`` still reads ``https``; one without (``127.0.0.1:9000``) is spoken to over https unless
  the URI adds ``?scheme=http``.
* Constructing ``pyarrow.fs.S3FileSystem()`` directly does NOT read ``AWS_ENDPOINT_URL`` (``endpoint_override`` stays
  empty and requests go to ``<bucket>.s3.<region>.amazonaws.com``): this module always goes through ``from_uri``.
* With an endpoint set, ``from_uri`` does not resolve the bucket's region (no HeadBucket round trip); the AWS SDK takes
  it from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile. Without one it asks AWS for the bucket's region.
* Credentials: the AWS SDK's default chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
  ``~/.aws``, web identity, instance metadata). ``user:password@`` in the URI would set them explicitly: refused here.
* ``allow_bucket_creation`` defaults to false (the bucket must exist; ``?allow_bucket_creation=true`` allows creating
  it). The only query parameters pyarrow accepts for S3 are ``region``, ``scheme``, ``endpoint_override``,
  ``allow_bucket_creation`` and ``allow_bucket_deletion``; any other is an ``ArrowInvalid``.

Semantics the checkpoint layer relies on: an object appears whole when its upload stream closes (S3/GCS multipart or
single PUT), never half-written, and there is no rename; so :mod:`raymoe.checkpoint` commits by writing its manifest
last. Local writes go to a temporary name and ``os.replace`` for the same all-or-nothing property. Object stores need
no directories (writes skip ``create_dir``); local writes create parent directories. Nothing here imports Ray, and
pyarrow is imported only when a :class:`Storage` is built (``raymoe.config`` imports :func:`check_uri`).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterable, Iterator, Optional
from urllib.parse import parse_qsl, urlsplit

__all__ = ["Storage", "FileMeta", "check_uri", "is_local", "clean_relpath", "file_meta", "scratch_dir", "stage_and_put",
           "materialize"]

FileMeta = dict  # {"sha256": <64 hex chars>, "bytes": <int>}: what a transfer or a manifest entry records
CHUNK = 8 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKETED = ("s3", "gs", "gcs")  # the URI's host is a bucket: it must be there
_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def check_uri(uri: Any, what: str = "storage path") -> str:
    """Syntax check of a storage path without I/O (config validation): return it, or raise ``ValueError`` naming it.

    Accepted: an absolute local path, ``file:///abs/path``, ``<scheme>://<host or bucket>/<path>``. Refused: empty or
    relative paths (every node and job working directory would resolve them differently), a bucketed scheme without a
    bucket, credentials in the URI (``user:pw@``, ``?secret_key=``), whitespace or a fragment in a URI.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"{what} {uri!r} is empty or not a string")
    m = _SCHEME.match(uri)
    if m is None:
        if "://" in uri or uri.startswith(("s3:", "gs:", "hdfs:")):
            raise ValueError(f"{what} {uri!r} has a malformed scheme (expected <scheme>://...)")
        if not os.path.isabs(uri):
            raise ValueError(f"{what} {uri!r} is relative; give an absolute path or a URI such as s3://bucket/prefix")
        return uri
    scheme = m.group(1).lower()
    if any(c.isspace() for c in uri):
        raise ValueError(f"{what} {uri!r} contains whitespace")
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise ValueError(f"{what} {uri.split('://', 1)[0]}://<redacted>@...: credentials in the URI are refused "
                         "(the path is logged); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the store's own "
                         "standard variables) in the environment instead")
    if scheme in _BUCKETED and not parts.netloc:
        raise ValueError(f"{what} {uri!r} names no bucket; expected {scheme}://<bucket>/<prefix>")
    if scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")):
        raise ValueError(f"{what} {uri!r}: a file URI needs an absolute path, file:///abs/path")
    if parts.fragment:
        raise ValueError(f"{what} {uri!r} has a fragment ('#...')")
    for k, _ in parse_qsl(parts.query, keep_blank_values=True):
        if any(w in k.lower() for w in _SECRET_WORDS):
            raise ValueError(f"{what} {uri.split('?', 1)[0]!r}: query parameter {k!r} looks like a credential; "
                             "credentials come from the environment only")
    return uri


def is_local(uri: str) -> bool:
    """True for a plain path or a ``file://`` URI (no network filesystem involved)."""
    m = _SCHEME.match(uri)
    return m is None or m.group(1).lower() == "file"


def clean_relpath(rel: str) -> str:
    """A relative key inside a storage prefix. Manifests are read from storage, so a key is untrusted input: it must
    not climb out of the prefix (or out of a local scratch directory it is downloaded into)."""
    if not isinstance(rel, str):
        raise TypeError(f"relative storage path must be a str, got {type(rel).__name__}")
    if rel in ("", "."):
        return ""
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise ValueError(f"{rel!r} is not a clean relative path (no leading '/', no '.', '..', '//' or '\\')")
    return rel


def _sha_chunks(chunks: Iterable[bytes], sink: Callable[[bytes], Any]) -> FileMeta:
    h, n = hashlib.sha256(), 0
    for c in chunks:
        h.update(c)
        n += len(c)
        sink(c)
    return {"sha256": h.hexdigest(), "bytes": n}


def _read_chunks(f: Any) -> Iterator[bytes]:
    while True:
        c = f.read(CHUNK)
        if not c:
            return
        yield bytes(c)


def file_meta(path: str | pathlib.Path) -> FileMeta:
    """``{"sha256", "bytes"}`` of a local file."""
    with open(path, "rb") as f:
        return _sha_chunks(_read_chunks(f), lambda c: None)


def _scratch_root() -> Optional[str]:
    """This node's scratch root: ``$RAYMOE_SCRATCH_DIR``, else ``$RAYMOE_LOCAL_DIR/scratch`` (a node's own directory,
    set in its environment before ``ray start``; the worker group never forwards these two), else None (the system
    temp directory)."""
    local = os.environ.get("RAYMOE_LOCAL_DIR")
    return os.environ.get("RAYMOE_SCRATCH_DIR") or (os.path.join(local, "scratch") if local else None)


def scratch_dir(prefix: str = "raymoe-") -> pathlib.Path:
    """A fresh node-local directory for staging uploads and downloads, under :func:`_scratch_root`. The caller
    removes it."""
    root = _scratch_root()
    if root:
        pathlib.Path(root).mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=root))


class Storage:
    """A directory-like prefix on any filesystem pyarrow resolves; every method takes keys relative to it.

    Args:
        uri: see :func:`check_uri`. A malformed URI, or one pyarrow cannot resolve, raises ``ValueError`` naming it.
    """

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        check_uri(uri)
        self.uri = uri
        self._query = ""
        if _SCHEME.match(uri) is None:  # plain absolute path
            self.fs: Any = pafs.LocalFileSystem()
            path = str(pathlib.Path(uri))
        else:
            _, sep, query = uri.partition("?")
            self._query = sep + query
            try:
                self.fs, path = pafs.FileSystem.from_uri(uri)
            except ValueError as e:  # pyarrow.ArrowInvalid is a ValueError
                raise ValueError(f"storage path {uri!r} is not a filesystem URI pyarrow can open: {e}") from None
            except OSError as e:  # e.g. hdfs:// without a JVM / libhdfs on this node
                raise OSError(f"storage path {uri!r}: cannot open its filesystem: {e}") from e
        self.local_root: Optional[pathlib.Path] = (pathlib.Path(path) if isinstance(self.fs, pafs.LocalFileSystem)
                                                   else None)
        self._base = path.rstrip("/")
        self._uri_base = (str(self.local_root) if self.local_root is not None and _SCHEME.match(uri) is None
                          else uri.partition("?")[0].rstrip("/"))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # ------------------------------------------------------------------ naming
    def _path(self, rel: str) -> str:
        rel = clean_relpath(rel)
        return f"{self._base}/{rel}" if rel else (self._base or "/")

    def uri_of(self, rel: str) -> str:
        """The URI (or absolute path, for a plain-path storage) of ``rel``; query options are kept."""
        rel = clean_relpath(rel)
        return (f"{self._uri_base}/{rel}" if rel else self._uri_base) + self._query

    def child(self, rel: str) -> "Storage":
        """The storage rooted at ``rel`` (same filesystem object: no second resolution)."""
        sub = object.__new__(Storage)
        sub.fs, sub._query = self.fs, self._query
        rel = clean_relpath(rel)
        sub._uri_base = f"{self._uri_base}/{rel}" if rel else self._uri_base
        sub.uri = sub._uri_base + self._query
        sub._base = self._path(rel).rstrip("/")
        sub.local_root = pathlib.Path(sub._base) if self.local_root is not None else None
        return sub

    # ------------------------------------------------------------------ writes
    def _put(self, rel: str, chunks: Iterable[bytes]) -> FileMeta:
        path = self._path(rel)
        if not rel:
            raise ValueError("cannot write to the storage root itself; name a file")
        if self.local_root is not None:
            target = pathlib.Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                with open(tmp, "wb") as f:
                    meta = _sha_chunks(chunks, f.write)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return meta
        # compression=None: pyarrow's default ('detect') would gzip a *.gz file again on the way in (and strip one layer
        # on the way out): the store must hold the bytes as they are, for every other reader
        with self.fs.open_output_stream(path, compression=None) as out:  # the object appears when the stream closes
            return _sha_chunks(chunks, out.write)

    def write_bytes(self, rel: str, data: bytes) -> FileMeta:
        """Write ``data`` as ``rel`` (all or nothing); returns its sha256 and size."""
        return self._put(rel, [bytes(data)])

    def upload(self, local: str | pathlib.Path, rel: str) -> FileMeta:
        """Copy the local file ``local`` to ``rel``, hashing it on the way."""
        with open(local, "rb") as f:
            return self._put(rel, _read_chunks(f))

    def put_dir(self, local_dir: str | pathlib.Path, move: bool = False, skip: Iterable[str] = ()) -> dict[str, FileMeta]:
        """Every file under ``local_dir`` to the same relative key here; ``move`` renames instead of copying when this
        storage is local (the staging directory is on the same filesystem: see :func:`stage_and_put`)."""
        local_dir, skip = pathlib.Path(local_dir), set(skip)
        out: dict[str, FileMeta] = {}
        for p in sorted(local_dir.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(local_dir).as_posix()
            if rel in skip:
                continue
            if move and self.local_root is not None:
                out[rel] = file_meta(p)
                target = pathlib.Path(self._path(rel))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, target)
            else:
                out[rel] = self.upload(p, rel)
        return out

    # ------------------------------------------------------------------ reads
    def _missing(self, rel: str) -> FileNotFoundError:
        return FileNotFoundError(f"{self.uri_of(rel)} does not exist")

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._path(rel), compression=None) as f:
                return bytes(f.read())
        except FileNotFoundError:
            raise self._missing(rel) from None

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``rel`` from ``offset`` (fewer at the end of the file): one ranged GET on S3."""
        try:
            with self.fs.open_input_file(self._path(rel)) as f:
                return bytes(f.read_at(length, offset))
        except FileNotFoundError:
            raise self._missing(rel) from None

    def download(self, rel: str, local: str | pathlib.Path) -> FileMeta:
        """Copy ``rel`` to the local path ``local`` (parents created; replaced all at once), hashing it on the way."""
        target = pathlib.Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with self.fs.open_input_stream(self._path(rel), compression=None) as f, open(tmp, "wb") as out:
                meta = _sha_chunks(_read_chunks(f), out.write)
            os.replace(tmp, target)
        except FileNotFoundError:
            raise self._missing(rel) from None
        finally:
            tmp.unlink(missing_ok=True)
        return meta

    def get_dir(self, prefix: str, local_dir: str | pathlib.Path) -> dict[str, FileMeta]:
        """Every file under ``prefix`` into ``local_dir`` (same relative layout)."""
        return {rel: self.download(f"{prefix}/{rel}" if prefix else rel, pathlib.Path(local_dir) / rel)
                for rel in self.list(prefix)}

    # ------------------------------------------------------------------ metadata
    def _info(self, rel: str) -> Any:
        return self.fs.get_file_info(self._path(rel))

    def list(self, prefix: str = "") -> dict[str, int]:
        """``{key relative to prefix: bytes}`` of every file under ``prefix`` (recursive; empty when absent). On an
        object store this is one paginated listing, however deep the prefix."""
        import pyarrow.fs as pafs

        base = self._path(prefix)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            raise NotADirectoryError(f"{self.uri_of(prefix)} is a file, not a prefix")
        if info.type == pafs.FileType.NotFound:
            return {}
        strip = base.rstrip("/") + "/"
        out = {}
        for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
            if i.type == pafs.FileType.File and i.path.startswith(strip):
                out[i.path[len(strip):]] = int(i.size)
        return dict(sorted(out.items()))

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the directories (object-store: common prefixes) directly under ``prefix``."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self._path(prefix), recursive=False, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(sel)
        except NotADirectoryError:
            return []
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int:
        import pyarrow.fs as pafs

        info = self._info(rel)
        if info.type != pafs.FileType.File:
            raise self._missing(rel)
        return int(info.size)

    def delete(self, rel: str) -> None:
        """Remove the file ``rel`` or everything under the prefix ``rel``; a missing one is not an error. The storage
        root itself cannot be deleted this way (on S3 that could be the bucket)."""
        import pyarrow.fs as pafs

        if not clean_relpath(rel):
            raise ValueError(f"{self.uri}: refusing to delete the storage root; name a prefix inside it")
        info = self._info(rel)
        try:
            if info.type == pafs.FileType.File:
                self.fs.delete_file(self._path(rel))
            elif info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self._path(rel))
        except FileNotFoundError:
            pass  # gone in the meantime: what was asked for


def materialize(uri: str, cache_root: Optional[str | pathlib.Path] = None) -> pathlib.Path:
    """A local directory holding the files under ``uri`` (a model export, a tokenizer): the path itself when local,
    else a node-local copy. Serving takes ``model_path`` from the same URIs training writes (``<storage>/hf``).

    The copy lives in ``<cache_root>/<sha256(uri)[:16]>`` (default: under the node's scratch root, see
    :func:`scratch_dir`) and is reused while the store's listing (names and sizes) is unchanged; a new or changed
    listing is downloaded again into a temporary directory and renamed into place, so a reader never sees a
    half-written copy."""
    if is_local(uri):
        return pathlib.Path(uri[len("file://"):] if uri.lower().startswith("file://") else uri)
    st = Storage(uri)
    listing = st.list()
    if not listing:
        raise FileNotFoundError(f"{uri}: nothing stored there")
    if cache_root is None:
        cache_root = pathlib.Path(_scratch_root() or tempfile.gettempdir()) / "raymoe-models"
    dest = pathlib.Path(cache_root) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    stamp = dest / ".listing.json"
    if stamp.exists() and json.loads(stamp.read_text()) == listing:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        st.get_dir("", tmp)
        (tmp / ".listing.json").write_text(json.dumps(listing, sort_keys=True))
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def stage_and_put(dest: str, write: Callable[[pathlib.Path], Any]) -> dict[str, FileMeta]:
    """Run ``write(d)`` on a fresh staging directory, then put every file it wrote under ``dest``; returns
    ``{relpath: {"sha256", "bytes"}}`` of those files (what a rank reports to the coordinator for the manifest).

    For a local ``dest`` the staging directory is a hidden directory inside ``dest`` (same filesystem), so publishing
    is a rename per file and the files are hashed once; for a remote one it is node-local scratch, uploaded with the
    hash computed during the upload, and removed afterwards. Several writers (the ranks of a checkpoint) may stage into
    the same ``dest`` at once: each has its own staging directory and reports only its own files.
    """
    st = Storage(dest)
    if st.local_root is not None:
        st.local_root.mkdir(parents=True, exist_ok=True)
        stage = pathlib.Path(tempfile.mkdtemp(prefix=".stage-", dir=st.local_root))
    else:
        stage = scratch_dir("raymoe-stage-")
    try:
        write(stage)
        return st.put_dir(stage, move=st.local_root is not None)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
