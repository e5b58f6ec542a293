"""Live page updates over Server-Sent Events, driven by the store's change sequence.

One :class:`LiveHub` per app polls ``reader.seq()`` (a single-row read) every
``interval`` seconds. When it moved, the hub reads what changed since the last value it saw
(``reader.changed_tasks``, served by the ``tasks_by_seq`` index), builds one compact message
and hands it to every subscriber. Updates are therefore coalesced to at most one message per
interval whatever the event rate, and a page never re-reads a whole table. Worker rows are
small; they are recomputed at most once a second and sent only when they differ, which also
catches a worker going offline without any new event. The names the tasks page filters by
(task types, states) are re-read at the same pace, only after the history moved, and sent as a
``names`` message when they differ, so its dropdowns grow without a reload.

Each subscriber has a small bounded queue. A client too slow to keep up loses messages and
gets a ``resync`` message instead, after which the page reloads its current view once.
The hub runs only while someone listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from stamen.store import HistoryReader
from stamen.web import present

log = logging.getLogger(__name__)

#: Tasks one ``tasks`` message carries (the newest); ``changed`` says how many changed in all,
#: so a page that may have missed some reloads its view instead of patching rows.
MAX_TASKS_PER_MESSAGE = 200
QUEUE_SIZE = 16
KEEPALIVE_S = 15.0
#: A stream ends after this long; EventSource reconnects by itself. Bounds how long a
#: forgotten tab holds a connection.
STREAM_LIFETIME_S = 600.0

#: Set when the server is shutting down so open streams end at once (uvicorn waits for
#: responses in progress before it stops).
SHUTTING_DOWN = threading.Event()


def shutting_down() -> None:
    """Called by the server on SIGTERM/SIGINT: end every open stream."""
    SHUTTING_DOWN.set()


class LiveHub:
    """Fan-out of store changes to the open pages."""

    def __init__(
        self,
        reader: HistoryReader,
        workers: Callable[[], list[dict[str, Any]]],
        *,
        interval: float = 0.5,
        workers_interval: float = 1.0,
    ) -> None:
        self.reader = reader
        self._workers = workers
        self.interval = interval
        self.workers_interval = workers_interval
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_workers: bytes = b""
        self._last_names: bytes = b""
        self.messages_sent = 0

    def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        for last in (self._last_workers, self._last_names):
            if last:
                queue.put_nowait(last)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self._subscribers.discard(queue)
        if not self._subscribers and self._task is not None:
            self._task.cancel()
            self._task = None
            self._last_workers = b""
            self._last_names = b""

    def publish(self, kind: str, payload: Any) -> None:
        self._deliver(self._message(kind, payload))

    def _deliver(self, message: bytes) -> None:
        self.messages_sent += 1
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                # Too slow: drop what it has and tell it to reload its view once.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(b"event: resync\ndata: {}\n\n")

    def _message(self, kind: str, payload: Any) -> bytes:
        return f"event: {kind}\ndata: ".encode() + orjson.dumps(payload, default=str) + b"\n\n"

    def _names(self) -> dict[str, list[str]]:
        return {"types": self.reader.task_types(), "states": self.reader.states()}

    async def _run(self) -> None:
        seq = await run_in_threadpool(self.reader.seq)
        next_workers = 0.0
        names_due = True
        while True:
            try:
                current = await run_in_threadpool(self.reader.seq)
                if current != seq:
                    tasks, total = await run_in_threadpool(
                        self.reader.changed_tasks, seq, MAX_TASKS_PER_MESSAGE
                    )
                    seq = current
                    names_due = True
                    self.publish("tasks", {"seq": seq, "tasks": tasks, "changed": total})
                now = time.monotonic()
                if now >= next_workers:
                    next_workers = now + self.workers_interval
                    records = await run_in_threadpool(self._workers)
                    message = self._message("workers", {"data": records})
                    if message != self._last_workers:
                        self._last_workers = message
                        self._deliver(message)
                    if names_due:
                        names_due = False
                        message = self._message("names", await run_in_threadpool(self._names))
                        if message != self._last_names:
                            self._last_names = message
                            self._deliver(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a locked or vanished database: try again later
                log.warning("Live updates: %s", exc)
            await asyncio.sleep(self.interval)


router = APIRouter(include_in_schema=False)


def hub_of(request: Request) -> LiveHub:
    """The app's hub, made on first use (most apps in tests never open a stream)."""
    state = request.app.state
    hub = getattr(state, "live_hub", None)
    if hub is None:
        svc = state.services

        def workers() -> list[dict[str, Any]]:
            return present.worker_records(
                svc.reader.counters(),
                svc.reader.workers(),
                purge_offline_after=svc.settings.purge_offline_workers,
            )

        hub = state.live_hub = LiveHub(svc.reader, workers)
    return hub


@router.get("/live")
async def live(request: Request) -> StreamingResponse:
    """The SSE stream: ``tasks``, ``workers``, ``names`` and ``resync`` events, plus keep-alives."""
    from stamen.web.pages import viewer

    await viewer(request)
    hub = hub_of(request)

    async def stream() -> AsyncIterator[bytes]:
        queue = hub.subscribe()
        ends = time.monotonic() + STREAM_LIFETIME_S
        try:
            yield b"retry: 2000\nevent: hello\ndata: {}\n\n"
            while not SHUTTING_DOWN.is_set() and time.monotonic() < ends:
                with contextlib.suppress(asyncio.TimeoutError):
                    yield await asyncio.wait_for(queue.get(), timeout=1.0)
                    continue
                # Starlette cancels this generator when the client goes away.
                if time.monotonic() % KEEPALIVE_S < 1.0:
                    yield b": keep-alive\n\n"
        finally:
            hub.unsubscribe(queue)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
