"""Ingest: fold received events into task and worker records and flush them in batches.

The receiver thread calls :meth:`Ingester.add` for every event; the flush thread
(:class:`FlushThread`) calls :meth:`Ingester.flush` every commit interval or when a batch
is full. Two threads, because SQLite releases the GIL while it writes: receiving the next
events overlaps with storing the last ones. A flush merges all pending events in arrival
order (Celery's state rules live in :mod:`stamen.events.merge`), so a task that got four
events in one batch is written once. Recently touched task records stay in a bounded
cache, so merging rarely reads the database; memory stays flat however long the history
is.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any

from stamen.events.merge import (
    apply_task_event,
    apply_worker_event,
    new_task,
    new_worker,
    note_task_event_on_worker,
)
from stamen.model import CELERY_STATES
from stamen.store import HistoryWriter
from stamen.store.rollup import Contribution, contribution
from stamen.store.schema import FTS_COLUMNS
from stamen.store.writer import Batch

log = logging.getLogger(__name__)

_SEARCHABLE = tuple(f for f in FTS_COLUMNS if f != "uuid")


def _searchable(task: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(task[f] for f in _SEARCHABLE)


#: Task records kept for merging (about 1.5 KB each). A task's events arrive within seconds,
#: and a record that fell out is read back from the store by uuid, so a small cache costs
#: little ingest speed; 20,000 records cost 30 MB of RSS.
CACHE_SIZE = 5_000


class Ingester:
    """Owns the merge state of ingest.

    ``add`` is called by the receiver thread; ``flush`` by one other thread at a time (the
    lock serialises a final flush at shutdown with the flush thread's last one).
    """

    def __init__(
        self,
        writer: HistoryWriter,
        *,
        max_workers: int = 5000,
        cache_size: int = CACHE_SIZE,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.writer = writer
        self.max_workers = max_workers
        self.cache_size = cache_size
        self.on_commit = on_commit
        self.workers: dict[str, dict[str, Any]] = writer.load_workers()
        self.task_types: set[str] = writer.load_task_types()
        self.custom_states: set[str] = writer.load_custom_states()
        self.cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.pending: deque[Mapping[str, Any]] = deque()
        self.events_ingested = 0
        #: Called after each commit with the events and the batch they made, in the flush
        #: thread (metrics and live updates hang here); an observer must be quick.
        self.observers: list[Callable[[list[Mapping[str, Any]], Batch], None]] = []
        self._lock = threading.Lock()

    def add(self, event: Mapping[str, Any]) -> None:
        self.pending.append(event)

    def flush(self) -> int:
        """Merge and commit everything pending; returns how many events it wrote."""
        with self._lock:
            pending = self.pending
            events = [pending.popleft() for _ in range(len(pending))]
            if not events:
                return 0
            batch = self._merge(events)
            trimmed = self.writer.write(batch)
            self._remember(batch.tasks, trimmed.uuids)
            self.events_ingested += len(events)
            if self.on_commit is not None:
                self.on_commit(self.writer.seq)
            for observer in self.observers:
                try:
                    observer(events, batch)
                except Exception:
                    log.exception("Ingest observer %r failed", observer)
            return len(events)

    def _merge(self, events: list[Mapping[str, Any]]) -> Batch:
        batch = Batch()
        cache = self.cache
        missing = {
            e["uuid"]
            for e in events
            if e.get("type", "").startswith("task-") and e.get("uuid") not in cache
        }
        missing.discard(None)
        known = self.writer.load_tasks(missing) if missing else {}
        tasks = batch.tasks
        workers = self.workers
        counters = batch.counters
        types = self.task_types
        reindex = batch.reindex
        searchable: dict[str, tuple[Any, ...]] = {}
        # What each stored task counted in the rollups before this batch changed it.
        counted: dict[str, Contribution | None] = {}
        for event in events:
            kind = event.get("type") or ""
            host = event.get("hostname")
            # Counters count events heard from a worker; a backfilled one never was (and
            # may not even know its worker).
            if event.get("stamen_backfilled") is not True:
                counters[(host, kind)] = counters.get((host, kind), 0) + 1
            group, _, subject = kind.partition("-")
            if group == "task":
                uuid = event.get("uuid")
                if not uuid:
                    continue
                task = tasks.get(uuid)
                if task is None:
                    task = cache.get(uuid) or known.get(uuid)
                    if task is None:
                        task = new_task(uuid)
                        batch.new_tasks += 1
                        known[uuid] = task
                        reindex.add(uuid)
                    else:
                        searchable[uuid] = _searchable(task)
                        counted[uuid] = contribution(task)
                    tasks[uuid] = task
                if event.get("stamen_backfilled") is True:
                    batch.backfilled.add(uuid)
                if subject != "sent" and host is not None:
                    worker = workers.get(host)
                    if worker is None:
                        worker = workers[host] = new_worker(host)
                    note_task_event_on_worker(
                        worker, event.get("timestamp"), event.get("local_received")
                    )
                    batch.workers[host] = worker
                apply_task_event(task, event)
                if task["state"] not in CELERY_STATES and task["state"] not in self.custom_states:
                    self.custom_states.add(task["state"])
                    batch.custom_states = sorted(self.custom_states)
                name = task["name"]
                if name is not None and name not in types:
                    types.add(name)
                    batch.task_types.add(name)
            elif group == "worker" and host is not None:
                worker = workers.get(host)
                if worker is None:
                    if subject == "offline":
                        # Celery's state does not create a worker it only hears leave.
                        continue
                    worker = workers[host] = new_worker(host)
                apply_worker_event(worker, event)
                batch.workers[host] = worker
        for uuid, before in searchable.items():
            if _searchable(tasks[uuid]) != before:
                reindex.add(uuid)
        rollups = batch.rollups
        for uuid, task in tasks.items():
            rollups.change(counted.get(uuid), contribution(task))
        if len(workers) > self.max_workers:
            self._forget_workers(batch)
        return batch

    def _forget_workers(self, batch: Batch) -> None:
        """Keep only the ``max_workers`` most recently heard workers (Flower's LRU bound)."""
        by_age = sorted(self.workers.values(), key=lambda w: w.get("timestamp") or 0)
        for worker in by_age[: len(self.workers) - self.max_workers]:
            del self.workers[worker["hostname"]]
            batch.workers.pop(worker["hostname"], None)
        self.writer.trim_workers(self.workers)

    def _remember(self, written: dict[str, dict[str, Any]], trimmed: list[str]) -> None:
        cache = self.cache
        for uuid, task in written.items():
            cache[uuid] = task
            cache.move_to_end(uuid)
        for uuid in trimmed:
            cache.pop(uuid, None)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)


class FlushThread(threading.Thread):
    """Commits pending events every ``interval`` seconds, or sooner when asked.

    A failed commit is reported through ``on_error`` (an empty message once it works
    again) and the thread carries on: the next batch may well succeed.
    """

    def __init__(self, ingester: Ingester, interval: float, on_error: Callable[[str], None]):
        super().__init__(name="stamen-ingest", daemon=True)
        self.ingester = ingester
        self.interval = interval
        self.on_error = on_error
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._failing = False

    def wake(self) -> None:
        """Flush now rather than at the end of the interval (a batch is full)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after one last flush of everything pending."""
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stopping.is_set()
            try:
                self.ingester.flush()
            except Exception as exc:
                log.exception("Failed to store received events")
                self.on_error(f"{type(exc).__name__}: {exc}")
                self._failing = True
            else:
                if self._failing:
                    self.on_error("")
                    self._failing = False
            if stopping:
                return
