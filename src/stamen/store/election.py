"""Which of several Stamen instances sharing one history ingests events.

Every instance serves reads; exactly one at a time receives events and writes them. The
instances race for the history's ingest lock every ``interval`` seconds: on PostgreSQL an
advisory lock (``PostgresWriter.try_lead``), on SQLite an exclusive ``flock`` on a file
beside the database (``StoreWriter.try_lead``; instances on one machine). The holder
ingests until its lock is gone (the process died; for PostgreSQL also the server or the
network dropping its connection), then steps down and races again like the others.
Because a PostgreSQL lock lives on the writer's own connection, losing it also makes the
old leader's writes fail, so there is never a moment with two writers.

A takeover starts receiving events from that moment: events published while nobody led
are not in the history (Celery events are not queued for absent receivers); the new
leader's backfill (:mod:`stamen.events.backfill`) fills in how such tasks ended from the
result backend.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Leadable(Protocol):
    """What the election needs from the writer (``PostgresWriter``, ``StoreWriter``)."""

    def try_lead(self) -> bool: ...
    def still_leading(self) -> bool: ...


class IngestElection(threading.Thread):
    """Runs the race in a daemon thread and calls ``on_elected``/``on_deposed`` from it."""

    def __init__(
        self,
        writer: Leadable,
        on_elected: Callable[[], None],
        on_deposed: Callable[[], None],
        *,
        interval: float = 1.0,
    ) -> None:
        super().__init__(name="stamen-election", daemon=True)
        self.writer = writer
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.interval = interval
        self.leading = False
        self._standing_by = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        wait = 0.0
        while not self._stop_event.wait(wait):
            wait = self.interval
            try:
                self.step()
            except Exception:
                log.exception("Ingest election step failed; trying again")

    def step(self) -> None:
        """One round: try to take the lock, or check that it is still held."""
        if not self.leading:
            if self.writer.try_lead():
                log.info("This instance now ingests events (it holds the ingest lock)")
                self.leading = True
                self._standing_by = False
                self.on_elected()
            elif not self._standing_by:
                log.info(
                    "Another instance ingests events into this history (it holds the ingest "
                    "lock); this one serves reads and takes over if that one stops"
                )
                self._standing_by = True
        elif not self.writer.still_leading():
            log.warning("Lost the ingest lock (database connection gone); standing by")
            self.leading = False
            self.on_deposed()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
