"""Turning stored records into what the pages show: worker rows, formatted tasks, timelines.

Kept apart from the route handlers so the JSON the workers page polls, the rows the first
render contains and the live updates pushed over SSE are built by the same code and cannot
drift apart.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from datetime import tzinfo
from types import SimpleNamespace
from typing import Any

from stamen.compat.flower.utils.template import format_duration, format_time, humanize
from stamen.events.merge import worker_alive
from stamen.model import WORKER_FIELDS

log = logging.getLogger(__name__)

#: Column slugs the tasks page knows, with their header labels (Flower 2.2's set).
TASK_COLUMN_LABELS: dict[str, str] = {
    "name": "Name",
    "uuid": "UUID",
    "state": "State",
    "args": "args",
    "kwargs": "kwargs",
    "result": "Result",
    "received": "Received",
    "started": "Started",
    "runtime": "Runtime",
    "worker": "Worker",
    "exchange": "Exchange",
    "routing_key": "Routing Key",
    "retries": "Retries",
    "revoked": "Revoked",
    "exception": "Exception",
    "expires": "Expires",
    "eta": "ETA",
}

#: Task fields holding epoch times, formatted as dates on the task page.
TIME_FIELDS = frozenset(
    {"sent", "received", "started", "succeeded", "retried", "timestamp", "failed", "revoked"}
)
#: Timeline order for events that share a timestamp.
_TIMELINE = (
    ("sent", "PENDING"),
    ("received", "RECEIVED"),
    ("started", "STARTED"),
    ("retried", "RETRY"),
    ("rejected", "REJECTED"),
    ("revoked", "REVOKED"),
    ("failed", "FAILURE"),
    ("succeeded", "SUCCESS"),
)


def worker_records(
    counters: Mapping[str, Mapping[str, int]],
    workers: Mapping[str, Mapping[str, Any]],
    *,
    purge_offline_after: int | None = None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Flower's ``/workers?json=1`` records: hosts with both counters and a worker row.

    Each record is the host's event counters, then the 11 worker fields, then ``status``.
    With ``purge_offline_after`` an offline worker last seen at least that many seconds ago
    is left out; last seen is its newest heartbeat, else its last event (Flower 2.2).
    """
    now = time.time() if now is None else now
    records: list[dict[str, Any]] = []
    for host, counts in counters.items():
        worker = workers.get(host)
        if worker is None:
            continue
        alive = worker_alive(worker, now)
        if purge_offline_after is not None and not alive:
            beats = worker.get("heartbeats") or []
            last_seen = beats[-1] if beats else worker.get("timestamp")
            if last_seen is not None and now - float(last_seen) >= purge_offline_after:
                continue
        record: dict[str, Any] = dict(counts)
        for field in WORKER_FIELDS:
            record[field] = worker.get(field)
        record["status"] = alive
        records.append(record)
    return records


def apply_format_task(
    formatter: Callable[[Any], Any] | None, task: dict[str, Any]
) -> dict[str, Any]:
    """Run the user's ``format_task`` hook on a copy of ``task``; fail open to the raw task.

    Hooks written for Flower use attribute access (``task.args = ...``), so they get an
    object; whatever it returns (that object, another object or a dict) is turned back into
    a dict. Any error is logged with Flower's message and the unformatted task is shown.
    """
    if formatter is None:
        return task
    subject = SimpleNamespace(**copy.copy(task))
    try:
        formatted = formatter(subject)
        result = dict(formatted) if isinstance(formatted, Mapping) else dict(vars(formatted))
    except Exception:
        log.exception("Failed to format '%s' task", task.get("uuid"))
        return task
    for key in ("uuid", "state"):
        result.setdefault(key, task.get(key))
    return result


def field_label(name: str) -> str:
    """A field name as a label (``routing_key`` → ``Routing key``, ``eta`` → ``ETA``)."""
    label = humanize(name)
    return label if isinstance(label, str) else str(name)


def show_time(value: Any, zone: tzinfo) -> str:
    """A stored epoch as a full date in ``zone``; anything unusable as it is."""
    try:
        return format_time(float(value), zone)
    except (TypeError, ValueError, OverflowError):
        return str(value)


def show_duration(value: Any) -> str:
    try:
        return format_duration(float(value))
    except (TypeError, ValueError):
        return str(value)


def timeline(task: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The task's states in the order they happened, from the timestamps Celery keeps."""
    steps: list[tuple[float, int, str]] = []
    for rank, (field, state) in enumerate(_TIMELINE):
        value = task.get(field)
        if isinstance(value, (int, float)):
            steps.append((float(value), rank, state))
    steps.sort()
    return [(state, at) for at, _, state in steps]
