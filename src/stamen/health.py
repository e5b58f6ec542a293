"""What is wrong right now, for ``/healthcheck`` and the logs, and whether this instance ingests.

Components report their state here; a change of state is logged once (a broker that stays
down for an hour gives one warning and one "back" line, not one line per retry).

Several instances can share one PostgreSQL database; only the one holding the ingest lock
receives events. A standby is healthy (it serves every page and the API from the shared
history), so ``/healthcheck`` stays "OK" on it; ``ingesting`` tells them apart, for the
``stamen_ingest_leader`` gauge on ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("stamen.health")


class Health:
    """Thread-safe record of the broker connection, the store and the ingest role."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.broker_ok: bool | None = None
        self.broker_error = ""
        self.broker_down_since: float | None = None
        self.store_error = ""
        #: True while this instance receives and stores events (always, without PostgreSQL;
        #: while it holds the ingest lock, with it).
        self.ingesting = False

    def broker_up(self) -> None:
        if self.broker_ok:
            return
        with self._lock:
            was_down = self.broker_ok is False
            self.broker_ok = True
            self.broker_error = ""
            self.broker_down_since = None
        if was_down:
            log.warning("Connected to the broker again; receiving events")
        else:
            log.info("Connected to the broker; receiving events")

    def broker_down(self, error: str, retry_in: float) -> None:
        with self._lock:
            first = self.broker_ok is not False
            self.broker_ok = False
            self.broker_error = error
            if first:
                self.broker_down_since = time.time()
        if first:
            log.warning(
                "Cannot receive events from the broker (%s); retrying, first in %.0f s",
                error,
                retry_in,
            )

    def set_ingesting(self, ingesting: bool) -> None:
        with self._lock:
            self.ingesting = ingesting

    def store_failed(self, error: str) -> None:
        with self._lock:
            self.store_error = error

    def problems(self) -> list[str]:
        """One line per problem; empty when all is well."""
        found = []
        with self._lock:
            if self.broker_ok is False:
                since = time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(self.broker_down_since or 0)
                )
                found.append(f"broker unreachable since {since}: {self.broker_error}")
            if self.store_error:
                found.append(f"history store failing: {self.store_error}")
        return found
