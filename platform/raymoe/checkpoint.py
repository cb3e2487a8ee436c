"""Atomic, checksummed checkpoint directories.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/            a complete checkpoint (only ever appears by rename)
        manifest.json         {"step": 100, "files": {"relpath": {"sha256": ..., "bytes": ...}}, "complete": true}
        coordinator.pt        step, tokens, data position, biases, balancer/metrics state, RNG (torch.save)
        config.json           the RunConfig as plain JSON
        stage0/...            whatever the stage actors wrote (DeepSpeed engine files, RNG per rank)
    .tmp-step_00000200-<pid>/ a checkpoint being written (ignored by readers, removed on the next save)

Writers fill a temporary directory, then :func:`commit` hashes every file into ``manifest.json`` (written last) and
renames the directory into place (``os.replace`` is atomic on one filesystem). Readers call :func:`latest_valid`,
which verifies every checksum of the newest checkpoint and falls back to older ones with a warning when a file is
missing, truncated or altered. Nothing here unpickles untrusted data: ``coordinator.pt`` is loaded with
``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
from typing import Any, Optional

__all__ = ["CheckpointCorrupt", "new_tmp_dir", "commit", "verify", "list_checkpoints", "latest_valid", "prune"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointCorrupt(RuntimeError):
    pass


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def new_tmp_dir(root: str | pathlib.Path, step: int) -> pathlib.Path:
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-{step_dir_name(step)}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def commit(tmp: pathlib.Path, step: int, extra: Optional[dict[str, Any]] = None) -> pathlib.Path:
    """Hash every file of ``tmp``, write the manifest, fsync, and rename to ``step_XXXXXXXX``."""
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            rel = p.relative_to(tmp).as_posix()
            files[rel] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
    manifest = {"step": step, "files": files, "complete": True, **(extra or {})}
    mpath = tmp / "manifest.json"
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
    mpath = ckpt / "manifest.json"
    if not mpath.exists():
        raise CheckpointCorrupt(f"{ckpt}: manifest.json missing (partial checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointCorrupt(f"{ckpt}: manifest.json unreadable: {e}") from e
    if not manifest.get("complete"):
        raise CheckpointCorrupt(f"{ckpt}: manifest not marked complete")
    for rel, meta in manifest["files"].items():
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
