"""Worker inspection through Celery's remote control, cached per worker (spec 4.1, 5.4).

Place in the pipeline: cluster access (DESIGN.md, "Cluster access"). ``/api/workers``, the
worker page, the broker page's queue list and the control API's "known worker" check all read
:attr:`Inspector.workers`, which :meth:`Inspector.inspect` fills by broadcasting
``control.inspect()`` calls.

Every ``inspect`` call is blocking (publish, then wait ``timeout_s`` for replies), so each one
runs in a small thread pool owned by the inspector: at most ``max_in_flight`` (8, like Flower)
at once, and never on the event loop, so a slow or dead worker delays only the request that
asked about it. The pool is private rather than the loop's default executor so that a burst of
inspections cannot starve other blocking work (spec 12.5). The cache itself is only touched on
the event loop, so it needs no lock.

Differences from Flower, on purpose: entries that have not been refreshed for
``forget_after_s`` (24 h by default) are dropped, so vanished workers stop being "known"
(spec 12.7); everything else (methods asked, coalescing, log messages) follows Flower 2.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

__all__ = ["Inspector"]

#: Flower's default cache lifetime is "for ever"; a day keeps a worker that was restarted
#: overnight known, yet forgets hosts that were decommissioned.
DEFAULT_FORGET_AFTER_S = 24 * 3600.0


def _strip_alternates(stats: Any) -> Any:
    """Remove ``broker.alternates`` (failover URLs, which may carry credentials) from ``stats``."""
    if isinstance(stats, dict):
        for holder in (stats, stats.get("consumer")):
            if isinstance(holder, dict) and isinstance(holder.get("broker"), dict):
                holder["broker"].pop("alternates", None)
    return stats


class Inspector:
    """Cache of the workers' inspect replies, refreshed on demand.

    ``workers[<hostname>]`` is ``{<method>: <that worker's reply>, ..., "timestamp": <epoch
    float of the last update>}`` with keys only for methods that replied, exactly Flower's
    entry shape. A global inspection asks :attr:`GLOBAL_METHODS`; a single-worker inspection
    asks all of :attr:`WORKER_METHODS` (Flower 2.2.0).

    ``clock`` returns epoch seconds; tests inject one to exercise eviction without sleeping.
    ``forget_after_s=None`` disables eviction (Flower's behaviour).
    """

    GLOBAL_METHODS: ClassVar[tuple[str, ...]] = ("stats", "active_queues", "registered", "conf")
    WORKER_METHODS: ClassVar[tuple[str, ...]] = (
        "stats",
        "active_queues",
        "registered",
        "scheduled",
        "active",
        "reserved",
        "revoked",
        "conf",
    )

    def __init__(
        self,
        celery_app: Any,
        timeout_s: float,
        *,
        forget_after_s: float | None = DEFAULT_FORGET_AFTER_S,
        max_in_flight: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._app = celery_app
        self.timeout_s = float(timeout_s)
        self.forget_after_s = forget_after_s
        self._clock = clock
        self._workers: dict[str, dict[str, Any]] = {}
        self._in_flight: dict[str | None, asyncio.Task[None]] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix="stamen-inspect"
        )
        self._connection_errors = self._find_connection_errors(celery_app)

    @staticmethod
    def _find_connection_errors(celery_app: Any) -> tuple[type[BaseException], ...]:
        """kombu ``OperationalError`` plus the transport's connection and channel errors (no
        I/O): the broker's trouble, logged in one line (a refused login fails every
        inspection; a traceback each time would bury the log)."""
        from kombu.exceptions import OperationalError

        errors: tuple[type[BaseException], ...] = (OperationalError,)
        # If the transport fails to load, inspect() will fail too, and log why.
        with contextlib.suppress(Exception):
            connection = celery_app.connection()
            errors += tuple(connection.connection_errors) + tuple(connection.channel_errors)
        return errors

    # -- cache --------------------------------------------------------------------------------

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        """The cache, after dropping expired entries. Read it; do not mutate it."""
        self.prune()
        return self._workers

    def known(self, workername: str) -> bool:
        """Whether ``workername`` has replied to an inspection recently (control API gate)."""
        self.prune()
        return workername in self._workers

    def prune(self) -> list[str]:
        """Drop entries not refreshed within ``forget_after_s``; return the dropped names."""
        if self.forget_after_s is None:
            return []
        cutoff = self._clock() - self.forget_after_s
        gone = [name for name, entry in self._workers.items() if entry["timestamp"] < cutoff]
        for name in gone:
            del self._workers[name]
        return gone

    def _merge(self, method: str, reply: dict[str, Any]) -> None:
        now = self._clock()
        for name, value in reply.items():
            if method == "stats":
                value = _strip_alternates(value)
            entry = self._workers.setdefault(name, {})
            entry[method] = value
            entry["timestamp"] = now

    # -- inspection ---------------------------------------------------------------------------

    async def inspect(self, workername: str | None = None) -> None:
        """Refresh the cache for every worker (``None``) or for one worker.

        Concurrent calls for the same target share one inspection. Replies are merged as they
        arrive. Never raises because of the broker or the workers: each failed method is
        logged (spec 5.4) and leaves the cache as it was. Cancelling a caller does not cancel
        the shared inspection, which other callers may be awaiting.
        """
        loop = asyncio.get_running_loop()
        task = self._in_flight.get(workername)
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._run(workername))
            self._in_flight[workername] = task
            task.add_done_callback(lambda done: self._forget_task(workername, done))
        await asyncio.shield(task)

    def _forget_task(self, key: str | None, task: asyncio.Task[None]) -> None:
        if self._in_flight.get(key) is task:
            del self._in_flight[key]

    async def _run(self, workername: str | None) -> None:
        methods = self.WORKER_METHODS if workername else self.GLOBAL_METHODS
        destination = [workername] if workername else None
        await asyncio.gather(*(self._inspect_method(m, destination) for m in methods))
        self.prune()

    async def _inspect_method(self, method: str, destination: list[str] | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            reply = await loop.run_in_executor(self._executor, self._call, method, destination)
        except self._connection_errors as exc:
            logger.warning("Inspect method %s failed: %s", method, exc)
            return
        except Exception as exc:
            logger.error("Inspect method %s failed: %s", method, exc, exc_info=exc)
            return
        if reply is None or "error" in reply:
            logger.warning("Inspect method %s failed", method)
            return
        self._merge(method, reply)

    def _call(self, method: str, destination: list[str] | None) -> Any:
        """Blocking; runs in the inspector's thread pool."""
        inspect = self._app.control.inspect(timeout=self.timeout_s, destination=destination)
        if method == "active":
            return inspect.active(safe=True)
        return getattr(inspect, method)()

    def close(self) -> None:
        """Stop accepting work; calls already waiting on a reply finish in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)
