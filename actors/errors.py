"""Typed errors at the actor boundary: Ray failures become raymoe errors naming the rank and the call."""
from __future__ import annotations

from raymoe.train.worker_group import RankFailure

__all__ = ["StageError", "StageDied"]


class StageError(RankFailure):
    """A stage replica raised while executing a call; the message names rank, method and the original error."""


class StageDied(StageError):
    """A stage replica's process died (OOM, SIGKILL, node loss)."""
