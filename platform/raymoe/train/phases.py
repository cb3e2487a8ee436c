"""The named phases of the training controller's loop (:class:`raymoe.train.controller.TrainController`)."""
from __future__ import annotations

import enum

__all__ = ["Phase"]


class Phase(str, enum.Enum):
    """Named phases of the controller's loop (``status()["phase"]``; each one's time is a ``control/`` metric)."""

    SETUP = "setup"
    RESUME = "resume"
    PLAN = "plan"
    EXECUTE = "execute"
    BALANCE = "balance"
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    EXPORT = "export"
    DONE = "done"
