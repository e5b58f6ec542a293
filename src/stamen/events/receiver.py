"""The broker end of ingest: one thread consuming Celery events.

Two ways in, one behaviour. On every broker kombu supports, Celery's own ``EventReceiver``
consumes the events. On Redis (unless ``fast_path=False``) a direct pub/sub reader
(:mod:`stamen.events.redis_fast`) takes its place: same subscription, same decoded events,
same clock and timestamp handling, several times faster. Either way each event is handed to
the :class:`~stamen.events.ingest.Ingester`; the flush thread stores them. When the broker is
unreachable it retries with capped exponential backoff and logs a change of state once, not
every retry.

If storing falls far behind (``--max_pending_events`` received and not stored), receiving
waits until the flush catches up rather than queueing without limit, so memory stays
bounded. Meanwhile the events wait outside Stamen: on RabbitMQ in Stamen's event queue
(where ``--event_queue_ttl`` and ``--event_queue_max_length`` apply); on Redis pub/sub in
the server's output buffer for this subscriber, and past its ``client-output-buffer-limit
pubsub`` Redis drops the subscription (the events in it are lost; the receiver reconnects).
Each such pause is logged once and counted (``Ingester.receive_pauses``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery

from stamen.events.ingest import FlushThread, Ingester
from stamen.events.redis_fast import RedisEventStream, unsupported_reason
from stamen.health import Health

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
#: Seconds between checks for a stop request while receiving waits for storing.
PAUSE_POLL = 0.2


class EventReceiverThread(threading.Thread):
    """Consumes events until :meth:`stop`; a stop flushes what was received (nothing lost)."""

    def __init__(
        self,
        app: Celery,
        ingester: Ingester,
        health: Health,
        *,
        commit_interval: float = 0.5,
        queue_ttl: float | None = None,
        queue_max_length: int | None = None,
        fast_path: bool = True,
    ) -> None:
        super().__init__(name="stamen-events", daemon=True)
        self.app = app
        self.ingester = ingester
        self.health = health
        self.commit_interval = commit_interval
        self.queue_ttl = queue_ttl
        self.queue_max_length = queue_max_length
        self.fast_path = fast_path
        #: "redis-fast" or "kombu" while connected, None otherwise (for health and metrics).
        self.active_path: str | None = None
        self._path_reason: str | None = "not connected yet"
        self._stop_event = threading.Event()
        self._receiver: Any = None
        self.flusher = FlushThread(ingester, commit_interval, health.store_failed)

    def start(self) -> None:
        self.flusher.start()
        super().start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming, then commit everything already received."""
        self._stop_event.set()
        receiver = self._receiver
        if receiver is not None:
            receiver.should_stop = True
        if self.is_alive():
            self.join(timeout)
        self.flusher.stop()

    def run(self) -> None:
        backoff = 1.0
        while not self._stop_event.is_set():
            try:
                self._consume()
                backoff = 1.0
            except Exception as exc:
                if self._stop_event.is_set():
                    break
                self.health.broker_down(f"{type(exc).__name__}: {exc}", retry_in=backoff)
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _consume(self) -> None:
        with self.app.connection_for_read() as conn:
            conn.connect()
            if self._use_fast_path(conn):
                self._consume_redis_fast(conn)
            else:
                self._consume_kombu(conn)

    def _use_fast_path(self, conn: Any) -> bool:
        """Whether this connection gets the Redis fast path; the choice is logged once."""
        reason = unsupported_reason(self.app, conn) if self.fast_path else "fast path disabled"
        if reason != self._path_reason:
            self._path_reason = reason
            if reason is None:
                log.info("Receiving events from Redis pub/sub directly (fast path)")
            else:
                log.info("Receiving events through kombu: %s", reason)
        return reason is None

    def _consume_redis_fast(self, conn: Any) -> None:
        stream = RedisEventStream(self.app, conn, self._on_event)
        self.active_path = "redis-fast"
        try:
            stream.run(should_stop=self._stop_event.is_set, on_iteration=self._on_iteration)
        finally:
            self.active_path = None

    def _consume_kombu(self, conn: Any) -> None:
        receiver = self.app.events.Receiver(
            conn, handlers={"*": self._on_event}, queue_ttl=self.queue_ttl
        )
        if self.queue_max_length is not None:
            receiver.queue.max_length = self.queue_max_length
        receiver.connect_max_retries = 0
        receiver.on_iteration = self._on_iteration
        receiver.should_stop = self._stop_event.is_set()
        self._receiver = receiver
        self.active_path = "kombu"
        try:
            # wakeup=True asks every worker for a heartbeat so they show up at once.
            for _ in receiver.consume(safety_interval=0.2, wakeup=True):
                pass
        finally:
            self._receiver = None
            self.active_path = None

    def _on_iteration(self) -> None:
        self.health.broker_up()

    def _on_event(self, event: Mapping[str, Any]) -> None:
        ingester = self.ingester
        pending = ingester.pending
        pending.append(event)
        if len(pending) >= ingester.batch_size:
            self.flusher.wake()
            if ingester.full:
                self._wait_for_storing()

    def _wait_for_storing(self) -> None:
        """Stop taking messages until the flush has caught up (or Stamen stops)."""
        ingester = self.ingester
        ingester.receive_pauses += 1
        log.warning(
            "Storing is %d events behind (--max_pending_events); receiving waits for it",
            len(ingester.pending),
        )
        started = time.monotonic()
        while not ingester.wait_for_room(PAUSE_POLL):
            if self._stop_event.is_set():
                return
        log.info("Storing caught up after %.1f s; receiving again", time.monotonic() - started)
