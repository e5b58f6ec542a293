"""Whether this machine can take part in a network test (IPv6 is off on some hosts)."""

from __future__ import annotations

import socket


def can_bind_ipv6(address: str) -> bool:
    """Whether a TCP socket can bind ``address`` (``::`` any, ``::1`` the loopback)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True
