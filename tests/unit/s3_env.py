"""A real S3-compatible server (moto, :class:`raymoe.jobs.local_cluster.LocalS3`) that this process talks to, for the
unit tests that read and write ``s3://`` URIs: this process's AWS variables point at it while it runs, and whatever
could send the clients elsewhere (an S3-only endpoint, a session token, a profile, a region) is unset."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import pytest

_ELSEWHERE = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION")


@contextlib.contextmanager
def local_s3(bucket: str) -> Iterator[Any]:
    """``LocalS3(bucket)`` started (the server is what it yields), the environment set, both undone on exit
    (werkzeug's log level too: LocalS3 quiets its one INFO line per request)."""
    from raymoe.jobs.local_cluster import LocalS3

    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    server = LocalS3(bucket).start()
    mp = pytest.MonkeyPatch()
    for k, v in server.env.items():
        mp.setenv(k, v)
    for k in _ELSEWHERE:
        mp.delenv(k, raising=False)
    try:
        yield server
    finally:
        mp.undo()
        server.stop()
        werkzeug.setLevel(level)
