"""Shared by the serving e2e tests: a free loopback port and the tiny trained checkpoint they serve."""
from __future__ import annotations

import pathlib
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(root: pathlib.Path, name: str) -> pathlib.Path:
    """The tiny model trained for 10 steps, exported with its tokenizer (one torch thread while building)."""
    import torch

    from raymoe.engine.tiny import build_tiny_checkpoint

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_tiny_checkpoint(root / name, seed=0, train_steps=10)
    finally:
        torch.set_num_threads(n)
