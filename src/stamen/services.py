"""Builds and owns the long-lived parts of a running Stamen, in start order.

The store comes first (ingest and web both need it), then the ingest threads, then the
cluster helpers the web uses. ``stop`` runs in reverse and is idempotent; stopping the
receiver commits every event already received, so a clean stop loses nothing.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from celery import Celery

from stamen.audit import ActionStore, open_action_store
from stamen.cluster.inspector import Inspector
from stamen.cluster.pause import QueuePauser
from stamen.cluster.queues import QueueLengths
from stamen.events.backfill import Backfiller, backfill_unavailable
from stamen.events.enabler import EventsEnabler
from stamen.events.ingest import Ingester
from stamen.events.receiver import EventReceiverThread
from stamen.health import Health
from stamen.store import HistoryReader, HistoryWriter, is_postgres_url
from stamen.store.election import IngestElection
from stamen.store.manage import open_store

log = logging.getLogger(__name__)

_SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def sqlite_path(db: str) -> Path:
    """Where ``--db`` keeps the history: the path itself when it names a SQLite file,
    else ``<db>.sqlite3``, so Flower's default ``flower`` never collides with a Flower
    shelve file of the same name."""
    path = Path(db).expanduser()
    if path.suffix in _SQLITE_SUFFIXES:
        return path
    return path.with_name(path.name + ".sqlite3")


class Services:
    """Everything a running instance owns; the web app reaches it as ``app.state.services``."""

    def __init__(self, settings: Any, app: Celery, *, ingest: bool = True) -> None:
        self.settings = settings
        self.app = app
        self.health = Health()
        self._tmpdir: str | None = None
        #: Where the history lives: a PostgreSQL URL (``--persistent`` implied) or ``db_path``.
        self.db_url: str | None = settings.db if is_postgres_url(settings.db) else None
        if settings.persistent and self.db_url is None:
            self.db_path = sqlite_path(settings.db)
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="stamen-")
            # Not persistent: a throwaway SQLite file. With PostgreSQL nothing is kept in
            # it (the action tables live in the database, shared by every instance).
            self.db_path = Path(self._tmpdir) / "history.sqlite3"
        self.writer: HistoryWriter
        self.reader: HistoryReader
        self.writer, self.reader = open_store(
            self.db_url or self.db_path,
            max_tasks=settings.max_tasks,
            max_task_age=settings.max_task_age,
            max_workers=settings.max_workers,
            pool_size=settings.db_pool_size,
        )
        self.ingester = Ingester(
            self.writer,
            max_workers=settings.max_workers,
            max_pending=settings.max_pending_events,
        )
        self.receiver = self._new_receiver()
        self.enabler = EventsEnabler(app) if settings.enable_events else None
        self.inspector = Inspector(app, settings.inspect_timeout / 1000.0)
        self.queues = QueueLengths(app, settings.broker_api)
        # Control actions write the audit log, retry links and paused queues themselves,
        # beside the history (in PostgreSQL: seen by every instance on the database).
        self.actions: ActionStore = open_action_store(self.db_url, self.db_path)
        self.pauser = QueuePauser(app, self.actions, settings.inspect_timeout / 1000.0)
        self.ingester.observers.append(self.pauser.observe)
        self._ingest = ingest
        self._started = False
        self._stopped = False
        self._helpers_started = False
        #: Looks up missed task ends in the result backend while this instance ingests.
        self.backfill: Backfiller | None = None
        #: With PostgreSQL, instances share the database and race for the ingest lock;
        #: the receiver runs only while this one holds it.
        self.election: IngestElection | None = None
        # A kept SQLite file may be opened by a second instance by mistake (or on purpose,
        # for a read-only replica on the same machine): it, too, races for the lock.
        shared = self.db_url is not None or settings.persistent
        if shared and ingest:
            self.election = IngestElection(self.writer, self._elected, self._deposed)  # type: ignore[arg-type]

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self._ingest:
            if self.election is not None:
                self.election.start()
            else:
                self._start_ingest()

    def _start_ingest(self) -> None:
        self.receiver.start()
        self.health.set_ingesting(True)
        self._start_backfill()
        if not self._helpers_started:
            self._helpers_started = True
            self.pauser.start()
            if self.enabler is not None:
                self.enabler.start()

    def _elected(self) -> None:
        """Now the ingesting instance: resume from what the previous leader stored."""
        ingester = self.ingester
        ingester.pending.clear()
        ingester.cache.clear()
        ingester.workers = self.writer.load_workers()
        ingester.task_types = self.writer.load_task_types()
        ingester.custom_states = self.writer.load_custom_states()
        self._start_ingest()

    def _deposed(self) -> None:
        """Lost the lock: stop receiving; a fresh receiver waits for the next election."""
        self.health.set_ingesting(False)
        self._stop_backfill()
        try:
            self.receiver.stop()
        except Exception:
            log.exception("Stopping the receiver after losing the ingest lock failed")
        self.health.store_failed("")  # a standby serves reads; its failed last flush is moot
        self.receiver = self._new_receiver()

    def _start_backfill(self) -> None:
        """Backfill runs where events are ingested, when there is a backend to ask."""
        interval = self.settings.backfill_interval
        if not interval:
            return
        try:
            reason = backfill_unavailable(self.app)
        except Exception as exc:  # a result_backend URL Celery cannot load
            log.warning("Backfill off, the result backend cannot be loaded: %s", exc)
            return
        if reason is not None:
            log.debug("Backfill off: %s", reason)
            return
        self.backfill = Backfiller(self.app, self.reader, self.ingester, interval)
        self.backfill.start()

    def _stop_backfill(self) -> None:
        backfill, self.backfill = self.backfill, None
        if backfill is not None:
            backfill.stop()

    def _new_receiver(self) -> EventReceiverThread:
        """A receiver thread (built anew after losing the ingest lock: threads run once)."""
        settings = self.settings
        return EventReceiverThread(
            self.app,
            self.ingester,
            self.health,
            commit_interval=settings.commit_interval,
            queue_ttl=settings.event_queue_ttl,
            queue_max_length=settings.event_queue_max_length,
            fast_path=settings.event_fast_path,
        )

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.election is not None:
            self.election.stop()
        if self.enabler is not None:
            self.enabler.stop()
        self.pauser.stop()
        self._stop_backfill()
        if self._started and self._ingest:
            self.receiver.stop()
        else:
            self.ingester.flush()
        self.writer.close()
        self.reader.close()
        self.actions.close()
        self.queues.close()
        self.inspector.close()
        log.info("Stopped; %d events stored", self.ingester.events_ingested)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
