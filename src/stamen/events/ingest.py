"""Ingest: fold received events into task and worker records and flush them in batches.

The receiver thread calls :meth:`Ingester.add` for every event; the flush thread
(:class:`FlushThread`) calls :meth:`Ingester.flush`. Two threads, because SQLite releases
the GIL while it writes: receiving the next events overlaps with storing the last ones.

Batching adapts to the rate: the commit interval is the longest an event waits, not a
cadence. When a batch's worth is pending the flush starts at once, and when a flush ends
with a batch's worth pending again the next one follows without waiting, so under load
each flush takes what arrived during the previous one (bigger batches, same lag) and a
flush never takes more than ``max_batch`` events (a bounded time). Pending events are
bounded too: past ``max_pending`` the receiver stops taking messages until the flush
catches up (:meth:`Ingester.wait_for_room`), so memory stays flat however far behind
storing falls.

A flush merges the events it takes in arrival order (Celery's state rules live in
:mod:`stamen.events.merge`), so a task that got four events in one batch is written once.
Recently touched task records stay in a bounded cache, so merging rarely reads the
database; memory stays flat however long the history is.
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


#: Events pending that start a flush at once (rather than at the end of the interval).
BATCH_SIZE = 2_000
#: Most events one flush takes. Bigger batches store more events per CPU-second (a task
#: whose events share a batch is written and indexed once), and a flush of this many takes
#: about half a second on a small, busy machine.
MAX_BATCH = 20_000
#: Default bound on events received but not stored yet (``--max_pending_events``).
MAX_PENDING = 100_000

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
        max_pending: int = MAX_PENDING,
        batch_size: int = BATCH_SIZE,
        max_batch: int = MAX_BATCH,
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
        #: Receiving waits while this many events are pending (0: never).
        self.max_pending = max_pending
        #: Pending events worth a flush now; a flush takes at most ``max_batch``. Never more
        #: than the bound: receiving checks the bound when a batch is full, and waiting for
        #: a flush that a smaller bound never lets start would hold everything up.
        self.batch_size = min(batch_size, max_pending) if max_pending > 0 else batch_size
        self.max_batch = max(max_batch, batch_size)
        #: Times receiving waited for storing to catch up (episodes, not events).
        self.receive_pauses = 0
        self.events_ingested = 0
        #: Called after each commit with the events and the batch they made, in the flush
        #: thread (metrics and live updates hang here); an observer must be quick.
        self.observers: list[Callable[[list[Mapping[str, Any]], Batch], None]] = []
        self._lock = threading.Lock()
        self._room = threading.Condition(threading.Lock())

    def add(self, event: Mapping[str, Any]) -> None:
        self.pending.append(event)

    @property
    def full(self) -> bool:
        """Whether receiving should wait: ``max_pending`` events are waiting to be stored."""
        return 0 < self.max_pending <= len(self.pending)

    def wait_for_room(self, timeout: float) -> bool:
        """Wait until pending events fall below the resume level or ``timeout`` passes;
        True when there is room.

        Receiving resumes at half of ``max_pending``, not just under it, so a pause lets
        several flushes run at full batch size instead of waking the receiver per flush.
        """
        resume = self.max_pending // 2
        with self._room:
            return self._room.wait_for(lambda: len(self.pending) <= resume, timeout)

    def flush(self, limit: int | None = None) -> int:
        """Merge and commit the oldest pending events, at most ``limit`` of them (all when
        None); returns how many events it wrote."""
        with self._lock:
            pending = self.pending
            count = len(pending) if limit is None else min(limit, len(pending))
            events = [pending.popleft() for _ in range(count)]
            if self.max_pending:
                with self._room:
                    self._room.notify_all()
            if not events:
                return 0
            states_before = set(self.custom_states)
            types_before = set(self.task_types)
            try:
                # Merging reads tasks that fell out of the cache: a failed read, like a
                # failed commit, must not lose the events taken off the queue.
                batch = self._merge(events)
                trimmed = self.writer.write(batch)
            except BaseException:
                self._undo(events, states_before, types_before)
                raise
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

    def _undo(
        self, events: list[Mapping[str, Any]], states_before: set[str], types_before: set[str]
    ) -> None:
        """Forget what merging a batch that failed (to read or to commit) changed, and put
        its events back first in line, so the next flush stores them as if this one never
        ran.

        The merge changed cached task records in place, possibly only some of them before
        it failed, so every task the events name is dropped from the cache (the next merge
        reads them back from the store as committed); names it saw first are forgotten so
        the retry writes them. While the store stays down, pending events grow to
        ``max_pending`` and then wait in the broker.
        """
        for event in events:
            self.cache.pop(event.get("uuid"), None)  # type: ignore[arg-type]
        self.task_types = types_before
        self.custom_states = states_before
        self.pending.extendleft(reversed(events))

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
    """Commits pending events at most ``interval`` seconds after they arrive, sooner when a
    batch's worth is pending (:meth:`wake`, or left over by the previous flush).

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
        """Stop after flushing everything pending."""
        self._stopping.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        ingester = self.ingester
        while True:
            # A batch's worth left over means storing is busy: go on at once. Otherwise the
            # interval bounds how long the oldest pending event waits (and, after a failed
            # commit, how soon the store is tried again).
            busy = len(ingester.pending) >= ingester.batch_size and not self._failing
            if not busy and not self._stopping.is_set():
                self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stopping.is_set()
            if not self._flush(ingester.max_batch) and stopping:
                log.error("Stopping with %d received events not stored", len(ingester.pending))
                return
            if stopping and not ingester.pending:
                return

    def _flush(self, limit: int) -> bool:
        """One flush of at most ``limit`` events; False when it failed."""
        try:
            self.ingester.flush(limit)
        except Exception as exc:
            log.exception("Failed to store received events")
            self.on_error(f"{type(exc).__name__}: {exc}")
            self._failing = True
            return False
        if self._failing:
            self.on_error("")
            self._failing = False
        return True
