"""Pausing a queue across the whole cluster, including workers that start later.

Place in the pipeline: cluster access, fed by ingest. Celery has no "pause queue" command;
a pause is ``cancel_consumer`` on every worker consuming the queue, remembered in the store
(``paused_queues``) so that it survives restarts of Stamen. A worker that comes online later
would consume the queue again, so :class:`QueuePauser` watches ingest for ``worker-online``
events and cancels the consumer on that worker too. Resuming adds the consumer back on every
worker the pause took it from.

The ingest observer must be quick (it runs on the flush thread), so it only enqueues host
names; one daemon thread does the broadcasts, each bounded by the control timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from stamen.audit import ActionStore

log = logging.getLogger(__name__)

#: Attempts to reach a worker that just came online: its control mailbox may start a
#: moment after its first event.
ONLINE_ATTEMPTS = 5
#: Queue item standing for "every worker" (no hostname contains a NUL byte).
ALL_WORKERS = "\0all"


def queue_names(active_queues: Any) -> set[str]:
    """Names in one worker's ``active_queues`` reply."""
    if not isinstance(active_queues, list):
        return set()
    return {str(q["name"]) for q in active_queues if isinstance(q, Mapping) and q.get("name")}


def consumers_of(replies: Any, name: str) -> list[str]:
    """Workers whose ``active_queues`` (as ``inspect().active_queues()`` returns) include name."""
    if not isinstance(replies, Mapping):
        return []
    return sorted(w for w, queues in replies.items() if name in queue_names(queues))


class QueuePauser:
    """Applies remembered pauses to workers that come online; owns one daemon thread."""

    def __init__(self, app: Any, store: ActionStore, timeout_s: float = 1.0) -> None:
        self.app = app
        self.store = store
        self.timeout_s = timeout_s
        #: Commands name their workers, so Celery returns once all replied: waiting longer
        #: only helps busy workers.
        self.reply_timeout_s = max(timeout_s, 3.0)
        self._hosts: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- blocking cluster calls (run in threads) ----------------------------------------------

    def active_queues(self, destination: Sequence[str] | None = None) -> dict[str, Any]:
        inspect = self.app.control.inspect(
            timeout=self.timeout_s, destination=list(destination) if destination else None
        )
        return inspect.active_queues() or {}

    def cancel(self, name: str, workers: Sequence[str]) -> list[dict[str, Any]]:
        if not workers:
            return []
        return self.app.control.cancel_consumer(
            name, destination=list(workers), reply=True, timeout=self.reply_timeout_s
        )

    def add(self, name: str, workers: Sequence[str]) -> list[dict[str, Any]]:
        if not workers:
            return []
        return self.app.control.add_consumer(
            name, destination=list(workers), reply=True, timeout=self.reply_timeout_s
        )

    # -- workers coming online ----------------------------------------------------------------

    def observe(self, events: list[Mapping[str, Any]], batch: Any) -> None:
        """Ingest observer: note every worker that came online (quick, no I/O)."""
        for event in events:
            if event.get("type") == "worker-online" and event.get("hostname"):
                self._hosts.put(str(event["hostname"]))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="stamen-queue-pauser", daemon=True
            )
            self._thread.start()
            # Workers may have restarted while Stamen was down: sweep once at start.
            self._hosts.put(ALL_WORKERS)

    def stop(self) -> None:
        self._stopping.set()
        self._hosts.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            host = self._hosts.get()
            if host is None:
                continue
            try:
                if host == ALL_WORKERS:
                    self.apply_everywhere()
                else:
                    self.apply_to(host)
            except Exception:
                log.exception("Could not apply paused queues to %s", host)

    def apply_to(self, host: str) -> list[str]:
        """Cancel every paused queue ``host`` consumes; returns the queues cancelled."""
        paused = self.store.paused()
        if not paused:
            return []
        consumed: set[str] | None = None
        for _ in range(ONLINE_ATTEMPTS):
            if self._stopping.is_set():
                return []
            reply = self.active_queues([host])
            if host in reply:
                consumed = queue_names(reply[host])
                break
        if consumed is None:
            log.warning("Worker %s did not answer; paused queues not applied to it", host)
            return []
        cancelled = sorted(consumed & set(paused))
        for name in cancelled:
            self.cancel(name, [host])
            self.store.add_paused_worker(name, host)
            log.info("Paused queue %s on %s, which came online", name, host)
        return cancelled

    def apply_everywhere(self) -> dict[str, list[str]]:
        """Cancel every paused queue on every worker consuming it; ``{queue: workers}``."""
        paused = self.store.paused()
        if not paused:
            return {}
        replies = self.active_queues()
        done = {}
        for name in paused:
            workers = consumers_of(replies, name)
            if workers:
                self.cancel(name, workers)
                for worker in workers:
                    self.store.add_paused_worker(name, worker)
                log.info("Paused queue %s again on %s", name, ", ".join(workers))
            done[name] = workers
        return done
