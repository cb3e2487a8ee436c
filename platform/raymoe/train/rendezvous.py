"""Rendezvous address for a rank group: this node's IP and a TCP port reserved on it (no race, no wildcard bind)."""
from __future__ import annotations

import socket
from typing import Optional

__all__ = ["reserve_port"]


def reserve_port(ip: str, attempts: int = 20) -> tuple[socket.socket, int]:
    """Bind a free TCP port on ``ip`` — this node's address only, never all interfaces — and return the open
    socket with the port. Keeping the socket open means no other process can take the port between choosing it and
    the rendezvous; the owner closes it right before the torch.distributed store binds the same port. Retries when
    a bind fails (a port taken in between).

    Returns:
        ``(socket, port)``.
    """
    last: Optional[OSError] = None
    for _ in range(attempts):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((ip, 0))
            return s, s.getsockname()[1]
        except OSError as e:  # pragma: no cover - exhausted ephemeral ports
            last = e
            s.close()
    raise RuntimeError(f"could not bind a rendezvous port on {ip}: {last}")
