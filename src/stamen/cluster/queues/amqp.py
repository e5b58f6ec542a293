"""RabbitMQ queue lengths without the management plugin: a passive ``queue.declare`` over
AMQP itself, used when no ``--broker_api`` is given."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


#: kombu renders ``pyamqp://`` URLs as ``amqp://``; both are listed for clarity.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

#: Read/write socket timeout for the passive-declare AMQP connection, unless the transport
#: options set ``read_timeout``/``write_timeout``: a broker that accepts the TCP connection
#: and then stalls must not pin a thread-pool thread for ever.
AMQP_IO_TIMEOUT = 2.0


class DeclareQueues:
    """Passive ``queue.declare`` over one AMQP connection: no management plugin needed.

    A passive declare never creates anything; the broker answers with the number of ready
    messages and of consumers. A queue that does not exist (404, or 405 for another
    connection's exclusive queue) is **omitted** from the result, the same as the management
    API path, where only existing queues are listed; the broker closes the channel on that
    error, so a new channel is opened for the next queue. A connection error on the kept
    connection drops it and the call is retried once on a new one; any other failure
    propagates (kombu ``OperationalError`` and friends, which the web layer maps to 503).
    """

    def __init__(self, make_connection: Callable[[], Any]) -> None:
        self._make_connection = make_connection
        self._lock = threading.Lock()
        self._conn: Any = None
        self._channel: Any = None

    def _reset(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            # collect() frees the socket without a (possibly hanging) close handshake; best
            # effort, the connection is already broken.
            with contextlib.suppress(Exception):
                conn.collect()

    def _connected(self) -> Any:
        if self._conn is None:
            self._conn = self._make_connection()
        if not self._conn.connected:
            self._channel = None
            # Try each failover host once, without kombu's sleeping retry loop.
            self._conn.ensure_connection(max_retries=max(len(self._conn.alt), 1) - 1)
        return self._conn

    def _declare_all(self, names: Sequence[str]) -> list[dict[str, Any]]:
        conn = self._connected()
        results: list[dict[str, Any]] = []
        for name in names:
            if not name:
                continue
            if self._channel is None or not getattr(self._channel, "is_open", True):
                self._channel = conn.channel()
            try:
                ok = self._channel.queue_declare(queue=name, passive=True)
            except conn.channel_errors as exc:
                logger.debug("Passive declare of queue %r failed: %s", name, exc)
                self._channel = None
                continue
            results.append(
                {"name": name, "messages": ok.message_count, "consumers": ok.consumer_count}
            )
        return results

    def lengths(self, names: Sequence[str]) -> list[dict[str, Any]]:
        if not names:
            return []
        with self._lock:
            # Only a connection kept from an earlier call earns a retry (the broker may have
            # closed it while idle); a fresh one that fails would just fail again.
            reused = self._conn is not None and self._conn.connected
            try:
                return self._declare_all(names)
            except Exception as exc:
                if not (reused and self._is_connection_error(exc)):
                    self._reset()
                    raise
                logger.info("AMQP connection for queue lengths lost, reconnecting: %s", exc)
                self._reset()
            try:
                return self._declare_all(names)
            except Exception:
                self._reset()
                raise

    def _is_connection_error(self, exc: Exception) -> bool:
        from kombu.exceptions import OperationalError

        if isinstance(exc, (OperationalError, OSError)):
            return True
        conn = self._conn
        if conn is None:
            return False
        errors = tuple(conn.connection_errors) + tuple(conn.recoverable_connection_errors)
        return isinstance(exc, errors)

    def close(self) -> None:
        with self._lock:
            conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:
                conn.collect()
