"""Backfill: fill in how tasks ended from the result backend when their events were missed.

Celery events on Redis are fan-out: what happens while no Stamen listens is never delivered,
so a task last heard of as STARTED may stay STARTED in the history for ever. When the app
has a result backend, the ingesting instance asks it, on start and every
``--backfill_interval`` seconds, about tasks the history knows as not finished. For each
task the backend knows as finished it makes up the event the worker would have sent
(``task-succeeded``, ``task-failed`` or ``task-revoked``, stamped with the backend's
``date_done``) and hands it to the :class:`~stamen.events.ingest.Ingester` with
``stamen_backfilled: True``, so the store marks the task as backfilled.

Pure parts (which tasks a pass looks at, what event a backend record makes) are apart from
the I/O (:class:`BackendLookup`, :class:`Backfiller`) so they are unit-tested directly.

Which tasks, and in what order: per not-finished state, the **oldest first**, resuming
where the previous pass stopped and wrapping around at the end. Oldest first because the
backend forgets results after ``result_expires`` (a day by default), so the oldest are the
ones to recover before they are gone; resuming rather than restarting because tasks the
backend never knows (``ignore_result``, expired results) would otherwise fill every pass
and hide the newer ones behind them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery, states
from celery.backends.base import BaseKeyValueStoreBackend, DisabledBackend
from celery.backends.rpc import RPCBackend
from celery.exceptions import SecurityError
from celery.utils.saferepr import saferepr
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils.encoding import bytes_to_str, safe_repr

from stamen.events.ingest import Ingester
from stamen.store import HistoryReader
from stamen.store.reader import TaskQuery

log = logging.getLogger(__name__)

#: Tasks looked up per pass at most.
PER_PASS = 1000
#: A result stored this recently is left for the next pass: the worker's own event, sent
#: right after storing it, is most likely on its way and is the better record.
GRACE = 10.0
#: Seconds one backend round trip may take before the pass gives up on it.
LOOKUP_TIMEOUT = 10.0
#: Pause before the next pass when the last one found work and stopped at its bound.
CATCH_UP_PAUSE = 1.0
#: The first pass waits at most this long after ingest starts, so that events a durable
#: event queue (RabbitMQ) kept while Stamen was away are stored first.
FIRST_PASS_DELAY = 3.0
#: Celery's ``Task.resultrepr_maxsize``: how much of a result a task-succeeded event carries.
RESULT_REPR_MAX = 1024

#: Why a backend record cannot be read: not Celery's format, a content type this app does
#: not accept, or an exception type Celery refuses to rebuild (a forged record).
_UNREADABLE = (DecodeError, ContentDisallowed, SecurityError, ValueError, TypeError)

_EVENT_FOR_STATE = {
    states.SUCCESS: "task-succeeded",
    states.FAILURE: "task-failed",
    states.REVOKED: "task-revoked",
}


def unfinished_states(known: Iterable[str]) -> list[str]:
    """The states of ``known`` (the store's, custom ones included) a task can leave."""
    return [s for s in known if s not in states.READY_STATES]


@dataclass
class Cursor:
    """Where each state's walk (oldest first) resumes, and which state goes first."""

    offsets: dict[str, int] = field(default_factory=dict)
    turn: int = 0

    def rotation(self, unfinished: list[str]) -> list[str]:
        """The states in the order the next pass visits them, each taking what is left of
        the pass's budget. Each pass starts one state later, so a state with very many
        tasks cannot take every pass's budget from the others."""
        if not unfinished:
            return []
        start = self.turn % len(unfinished)
        self.turn += 1
        return unfinished[start:] + unfinished[:start]

    def advance(self, state: str, offset: int, limit: int, fetched: int, resolved: int) -> None:
        """Move past the tasks of a page that stay in ``state``; a short page means the end
        was reached, so the next pass starts again from the oldest."""
        if fetched < limit:
            self.offsets[state] = 0
        else:
            self.offsets[state] = offset + fetched - resolved


def done_timestamp(value: Any) -> float | None:
    """The backend's ``date_done`` (ISO text or ``datetime``; naive means UTC) as epoch
    seconds, like an event's ``timestamp``."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def backfill_event(
    task: Mapping[str, Any], meta: Mapping[str, Any], now: float, grace: float = GRACE
) -> dict[str, Any] | None:
    """The event the worker would have sent for ``task`` given its backend record ``meta``
    (``status``, ``result``, ``traceback``, ``date_done``; ``worker`` with
    ``result_extended``), or ``None`` when the backend knows nothing final yet, or the
    result is too fresh (``grace``) to be sure the worker's own event was lost.

    Fields are the ones Celery's worker sends: ``result`` as the repr of the value,
    ``exception`` as the repr of the exception. ``runtime`` is not stored by the backend;
    it is taken as ``date_done - started`` when the task's start is known.
    """
    kind = _EVENT_FOR_STATE.get(meta.get("status"))  # type: ignore[arg-type]
    if kind is None:
        return None
    done = done_timestamp(meta.get("date_done"))
    if done is not None and now - done < grace:
        return None
    event: dict[str, Any] = {
        "type": kind,
        "uuid": task["uuid"],
        "hostname": task.get("worker") or meta.get("worker"),
        "timestamp": done if done is not None else now,
        "stamen_backfilled": True,
    }
    result = meta.get("result")
    if kind == "task-succeeded":
        event["result"] = saferepr(result, RESULT_REPR_MAX)
        started = task.get("started")
        if done is not None and started is not None and done >= started:
            event["runtime"] = done - started
    elif kind == "task-failed":
        event["exception"] = safe_repr(result)
        event["traceback"] = meta.get("traceback")
    return event


def backfill_unavailable(app: Celery) -> str | None:
    """Why ``app``'s result backend cannot be asked about other clients' tasks, or
    ``None`` when it can."""
    backend = app.backend
    if isinstance(backend, DisabledBackend):
        return "no result backend configured"
    if isinstance(backend, RPCBackend):
        return "rpc:// results go to the caller only"
    return None


def fetch_metas(
    backend: Any, ids: list[str], unreadable: list[tuple[str, Exception]] | None = None
) -> dict[str, dict[str, Any]]:
    """Backend records of ``ids`` that exist, in one round trip on key-value backends
    (Redis, memcached: ``mget``), one per id on the others. A record that cannot be
    decoded is left out and noted in ``unreadable`` as ``(id, error)``; backend errors
    propagate, so an unreachable backend fails the whole lookup at once."""
    found: dict[str, dict[str, Any]] = {}
    skipped = unreadable if unreadable is not None else []
    if isinstance(backend, BaseKeyValueStoreBackend):
        keys = [backend.get_key_for_task(i) for i in ids]
        try:
            values = backend.mget(keys)
        except NotImplementedError:
            values = [backend.get(k) for k in keys]
        if isinstance(values, Mapping):  # some clients answer {key: value}
            by_key = {bytes_to_str(k): v for k, v in values.items()}
            values = [by_key.get(bytes_to_str(k)) for k in keys]
        for task_id, value in zip(ids, values, strict=True):
            if value:
                meta = _decoded(task_id, lambda v=value: backend.decode_result(v), skipped)
                if meta is not None:
                    found[task_id] = meta
        return found
    for task_id in ids:
        meta = _decoded(task_id, lambda t=task_id: backend.get_task_meta(t, cache=False), skipped)
        if meta is not None and meta.get("status") != states.PENDING:
            found[task_id] = meta
    return found


def _decoded(
    task_id: str, decode: Callable[[], Any], unreadable: list[tuple[str, Exception]]
) -> dict[str, Any] | None:
    try:
        return dict(decode())
    except _UNREADABLE as exc:
        unreadable.append((task_id, exc))
        return None


class BackendBusy(Exception):
    """The previous lookup has not come back yet (the backend hangs)."""


class BackendLookup:
    """Asks the result backend from one daemon thread of its own, with a timeout.

    The thread owns the backend object (Celery keeps one per thread for most backends), so
    connections are reused between passes. A call that does not answer within ``timeout``
    is abandoned; until it returns, further calls fail fast with :class:`BackendBusy`
    rather than queueing behind it.
    """

    def __init__(self, app: Celery, timeout: float = LOOKUP_TIMEOUT) -> None:
        self.app = app
        self.timeout = timeout
        self._jobs: queue.SimpleQueue[tuple[list[str], Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last: Future[Any] | None = None
        #: Kinds of unreadable record already logged: a result serializer this app does not
        #: accept would otherwise log every task of every pass.
        self._unreadable_logged: set[str] = set()

    def __call__(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        if self._last is not None and not self._last.done():
            raise BackendBusy("the previous lookup is still waiting for the result backend")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="stamen-backfill-io", daemon=True
            )
            self._thread.start()
        future: Future[Any] = Future()
        self._last = future
        self._jobs.put((ids, future))
        try:
            return future.result(self.timeout)  # type: ignore[no-any-return]
        except FutureTimeout:
            raise TimeoutError(f"no answer from the result backend in {self.timeout:g} s") from None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            ids, future = job
            unreadable: list[tuple[str, Exception]] = []
            try:
                future.set_result(fetch_metas(self.app.backend, ids, unreadable))
            except BaseException as exc:
                future.set_exception(exc)
            for task_id, error in unreadable:
                kind = type(error).__name__
                if kind not in self._unreadable_logged:
                    self._unreadable_logged.add(kind)
                    log.warning(
                        "Backfill skips tasks whose result backend record is unreadable "
                        "(%s for %s: %s); further ones are not logged",
                        kind,
                        task_id,
                        error,
                    )

    def close(self) -> None:
        """Let the thread end once its current call returns (it never blocks a stop)."""
        self._jobs.put(None)


@dataclass
class PassResult:
    """What one pass did: tasks looked up, events added, and whether it stopped at its
    bound with work found (then the next pass comes soon)."""

    looked_up: int = 0
    backfilled: int = 0
    more: bool = False


class Backfiller(threading.Thread):
    """Runs passes on start and every ``interval`` seconds until :meth:`stop`."""

    def __init__(
        self,
        app: Celery,
        reader: HistoryReader,
        ingester: Ingester,
        interval: float,
        *,
        per_pass: int = PER_PASS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="stamen-backfill", daemon=True)
        self.app = app
        self.reader = reader
        self.ingester = ingester
        self.interval = interval
        self.per_pass = per_pass
        self.lookup: Callable[[list[str]], dict[str, dict[str, Any]]] = BackendLookup(app)
        self.clock = clock
        self.cursor = Cursor()
        self.backfilled = 0
        #: Tasks the previous pass added events for: they may not be stored yet, so the
        #: next pass does not ask about them again.
        self._added: set[str] = set()
        self._failing = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        wait = min(self.interval, FIRST_PASS_DELAY)
        while not self._stop_event.wait(wait):
            try:
                done = self.run_pass()
            except Exception:
                log.exception("Backfill pass failed; trying again in %g s", self.interval)
                done = PassResult()
            wait = CATCH_UP_PAUSE if done.more else self.interval

    def run_pass(self) -> PassResult:
        """One pass: pick not-finished tasks, ask the backend, add the events it implies."""
        outcome = PassResult()
        previous, self._added = self._added, set()
        unfinished = unfinished_states(self.reader.states())
        budget = self.per_pass
        for state in self.cursor.rotation(unfinished):
            if budget <= 0 or self._stop_event.is_set():
                break
            offset, limit = self.cursor.offsets.get(state, 0), budget
            tasks = self._page(state, offset, limit)
            if not tasks and offset:  # walked past the newest: round again from the oldest
                offset = 0
                tasks = self._page(state, offset, limit)
            resolved = self._resolve(tasks, previous) if tasks else 0
            if resolved < 0:  # the backend is unavailable: try again next pass
                break
            outcome.looked_up += len(tasks)
            budget -= len(tasks)
            outcome.more = outcome.more or (resolved > 0 and len(tasks) == limit)
            self.cursor.advance(state, offset, limit, len(tasks), resolved)
        outcome.backfilled = len(self._added)
        self.backfilled += outcome.backfilled
        if outcome.backfilled:
            log.info("Backfill: %d task(s) filled in from the result backend", outcome.backfilled)
        return outcome

    def _page(self, state: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """Tasks in ``state``, oldest first (an indexed query on state and timestamp)."""
        query = TaskQuery(state=state, sort_by="timestamp", offset=offset, limit=limit)
        return self.reader.list_tasks(query)

    def _resolve(self, tasks: list[dict[str, Any]], previous: set[str]) -> int:
        """Add events for those of ``tasks`` the backend knows as finished; returns how many
        of ``tasks`` are on their way out of their state (-1: the backend failed)."""
        pending = len(tasks)
        tasks = [t for t in tasks if t["uuid"] not in previous]
        pending -= len(tasks)
        if not tasks:
            return pending
        try:
            metas = self.lookup([t["uuid"] for t in tasks])
        except Exception as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "Backfill cannot reach the result backend: %s: %s", type(exc).__name__, exc
                )
            return -1
        if self._failing:
            self._failing = False
            log.info("Backfill reaches the result backend again")
        now = self.clock()
        added = 0
        for task in tasks:
            meta = metas.get(task["uuid"])
            event = backfill_event(task, meta, now) if meta is not None else None
            if event is not None:
                self.ingester.add(event)
                self._added.add(task["uuid"])
                added += 1
        return pending + added

    def stop(self, timeout: float = 2.0) -> None:
        """Stop between lookups, waiting at most ``timeout`` seconds: a pass stuck on a
        dead backend is left behind (a daemon thread; whatever it would still have found
        is found again by the next pass, after a restart if need be)."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)
        if isinstance(self.lookup, BackendLookup):
            self.lookup.close()
