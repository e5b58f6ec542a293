"""Ingest: fold received events into task and worker records and flush them in batches.

The receiver thread calls :meth:`Ingester.add` for every event and :meth:`Ingester.flush`
when a batch is due. A flush merges all pending events in arrival order (Celery's state
rules live in :mod:`stamen.events.merge`), so a task that got four events in one batch is
written once. Recently touched task records stay in a bounded cache, so merging rarely
reads the database; memory stays flat however long the history is.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
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
from stamen.store.writer import Batch, StoreWriter

log = logging.getLogger(__name__)


class Ingester:
    """Owns the merge state of the ingest thread; not shared with any other thread.

    ``add`` may be called from the receiver thread only; ``flush`` from the same thread,
    or from another one once the receiver has stopped (the lock makes that safe).
    """

    def __init__(
        self,
        writer: StoreWriter,
        *,
        max_workers: int = 5000,
        cache_size: int = 20_000,
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
        self.pending: list[Mapping[str, Any]] = []
        self.events_ingested = 0
        self._lock = threading.Lock()

    def add(self, event: Mapping[str, Any]) -> None:
        self.pending.append(event)

    def flush(self) -> int:
        """Merge and commit everything pending; returns how many events it wrote."""
        with self._lock:
            events, self.pending = self.pending, []
            if not events:
                return 0
            batch = self._merge(events)
            trimmed = self.writer.write(batch)
            self._remember(batch.tasks, trimmed.uuids)
            self.events_ingested += len(events)
            if self.on_commit is not None:
                self.on_commit(self.writer.seq)
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
        for event in events:
            kind = event.get("type") or ""
            host = event.get("hostname")
            counters[(host, kind)] = counters.get((host, kind), 0) + 1
            group, _, subject = kind.partition("-")
            if group == "task":
                uuid = event.get("uuid")
                if not uuid:
                    continue
                task = tasks.get(uuid) or cache.get(uuid) or known.get(uuid)
                if task is None:
                    task = new_task(uuid)
                    batch.new_tasks += 1
                    known[uuid] = task
                tasks[uuid] = task
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
