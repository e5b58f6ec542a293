"""What every queue-length backend shares: the error for brokers without queue lengths, the
backend interface, and the TLS and URL pieces both Redis and RabbitMQ settings use."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import unquote

#: ``ssl_cert_reqs`` / ``cert_reqs`` words in ``broker_use_ssl``, as ``ssl`` constants.
CERT_REQS = {
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
}


class UnsupportedBroker(Exception):
    """The broker's transport has no way to report queue lengths (e.g. ``memory``, ``sqs``).

    ``str()`` is Flower's message, which the web layer returns verbatim with a 404.
    """

    def __init__(self, transport: str) -> None:
        super().__init__(f"'{transport}' broker is not supported")
        self.transport = transport


def url_credentials(parts: Any) -> tuple[str | None, str | None]:
    """User and password of a ``urlsplit`` result, percent-escapes undone."""
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return user, password


class Backend(Protocol):
    """One way of asking a broker; ``QueueLengths`` keeps one and closes it on shutdown."""

    def lengths(self, names: Sequence[str]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...
