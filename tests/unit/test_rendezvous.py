"""The rendezvous port is bound on the node's address only and stays reserved until released."""
from __future__ import annotations

import socket

import pytest

from raymoe.train.rendezvous import reserve_port


def test_port_is_bound_on_the_given_address_only_and_reserved() -> None:
    sock, port = reserve_port("127.0.0.1")
    try:
        assert sock.getsockname() == ("127.0.0.1", port)  # not 0.0.0.0: other interfaces never see it
        other = socket.socket()
        with pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # nobody else can take it before the store binds
        other.close()
    finally:
        sock.close()
    again = socket.socket()
    again.bind(("127.0.0.1", port))  # released: the store can bind it now
    again.close()
