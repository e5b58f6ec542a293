"""Fold Celery events into task and worker records: the pure core of ingest.

Pipeline: events (a receiver hands over decoded event dicts) → **merge** (this module
updates plain-dict records) → store (rows are written to SQLite). Nothing here does I/O
or keeps state between calls, so the store can replay, batch or shard events freely.

The result must be indistinguishable from ``celery.events.state.State`` because Flower's
API shows ``Task.as_dict()``; ``tests/unit/test_merge.py`` checks that against Celery on
random, reordered event streams. Celery's quirks are kept on purpose and noted inline.

What the caller does around these functions, mirroring ``State``:

* **task-sent** comes from the client: it touches no worker.
* **Any other task event** names a worker by ``hostname``; ``State`` creates that worker
  if unknown (``new_worker``) and then calls ``note_task_event_on_worker``.
* **worker-offline for an unknown worker**: ``State`` applies it to a throw-away worker
  and stores nothing, so the caller should drop the event (at most report it as a node
  leaving). For a known worker, ``apply_worker_event`` clears its heartbeats and
  Flower's plain ``State`` keeps the worker listed (offline).
* **children** are not merged: ``State`` derives them from other tasks' ``parent_id``,
  so the store answers them with a lookup by ``parent_id``; ``root``/``parent`` are
  the ``root_id``/``parent_id`` values.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Mapping
from typing import Any

from stamen.model import HEARTBEAT_EXPIRE_FACTOR, STORED_TASK_FIELDS, WORKER_FIELDS

#: Celery's state precedence (``celery.states.PRECEDENCE``): a lower rank is later in
#: a task's life. Custom states (e.g. ``PROGRESS``) rank where ``None`` sits.
_RANK: dict[str | None, int] = {
    state: rank
    for rank, state in enumerate(
        (
            "SUCCESS",
            "FAILURE",
            None,
            "REVOKED",
            "STARTED",
            "RECEIVED",
            "REJECTED",
            "RETRY",
            "PENDING",
        )
    )
}
_CUSTOM_RANK = _RANK[None]

#: Event type → (timestamp field it sets, state it means), as Celery's
#: ``TASK_EVENT_TO_STATE``; the timestamp field is the event's subject.
_TASK_EVENTS: dict[str, tuple[str, str]] = {
    f"task-{subject}": (subject, state)
    for subject, state in (
        ("sent", "PENDING"),
        ("received", "RECEIVED"),
        ("started", "STARTED"),
        ("failed", "FAILURE"),
        ("retried", "RETRY"),
        ("succeeded", "SUCCESS"),
        ("revoked", "REVOKED"),
        ("rejected", "REJECTED"),
    )
}

#: Event fields that may land in a task record. ``uuid`` is the record's key and
#: ``worker`` is set from ``hostname``; an event must not overwrite either.
_TASK_COPIED = frozenset(STORED_TASK_FIELDS) - {"uuid", "worker"}

#: Celery's ``Task.merge_rules``: when a state arrives after a later one, only these
#: fields are taken from it. States without a rule contribute all their fields.
_MERGE_RULES: dict[str, frozenset[str]] = {
    "RECEIVED": frozenset(
        ("name", "args", "kwargs", "parent_id", "root_id", "retries", "eta", "expires")
    ),
}

_WORKER_KEYS: tuple[str, ...] = (*WORKER_FIELDS, "timestamp")

#: ``heartbeats`` is excluded: Celery keeps its own list even if an event carried one.
_WORKER_COPIED = frozenset(_WORKER_KEYS) - {"heartbeats"}

#: Celery's ``Worker.heartbeat_max``.
_HEARTBEAT_MAX = 4


def new_task(uuid: str) -> dict[str, Any]:
    """A record for a task seen for the first time, with Celery's ``Task`` defaults."""
    task = dict.fromkeys(STORED_TASK_FIELDS)
    task["uuid"] = uuid
    task["state"] = "PENDING"
    task["clock"] = 0
    return task


def apply_task_event(task: dict[str, Any], event: Mapping[str, Any]) -> None:
    """Merge one ``task-*`` event into ``task`` in place, exactly as Celery's ``State``.

    Events can arrive out of order (several workers, several connections), so a state
    that logically comes before the current one does not move the state back; it only
    fills in fields. Celery's quirks are kept so the API matches Flower's:

    * ``RETRY`` bypasses precedence both ways, so a retried task can be received again.
    * A late ``task-received`` contributes only ``_MERGE_RULES`` fields (name, args, …).
    * Any other late event still copies all its fields, ``timestamp`` and ``clock``
      included, just not its state.
    * The per-state timestamp field (``received``, ``started``, …) is always set.

    ``event`` is read, never modified, and must carry ``type``. A missing ``hostname``
    or ``timestamp`` (Celery's ``State`` would raise) is taken as ``None`` so one malformed
    event cannot stop ingest.
    """
    etype = event["type"]
    try:
        stamp_field, state = _TASK_EVENTS[etype]
    except KeyError:
        # Custom events (``task.send_event("task-progress")``) name their own state.
        stamp_field, state = None, etype.partition("-")[2].upper()

    # task-sent is published by the client, every other task event by the worker.
    if stamp_field == "sent":
        task["client"] = event.get("hostname")
    else:
        task["worker"] = event.get("hostname")

    timestamp = event.get("timestamp")
    if stamp_field is not None:
        task[stamp_field] = timestamp

    current = task["state"]
    if (
        state != "RETRY"
        and current != "RETRY"
        and _RANK.get(state, _CUSTOM_RANK) > _RANK.get(current, _CUSTOM_RANK)
    ):
        keep = _MERGE_RULES.get(state, _TASK_COPIED)
        for key, value in event.items():
            if key in keep:
                task[key] = value
    else:
        for key, value in event.items():
            if key in _TASK_COPIED:
                task[key] = value
        task["state"] = state
        task["timestamp"] = timestamp


def new_worker(hostname: str) -> dict[str, Any]:
    """A record for a worker seen for the first time, with Celery's ``Worker`` defaults.

    ``timestamp`` is not one of Celery's ``Worker._fields``; it holds the time of the
    last worker event (Celery keeps it as a plain attribute) so the store can order rows.
    """
    worker = dict.fromkeys(_WORKER_KEYS)
    worker["hostname"] = hostname
    worker["freq"] = 60
    worker["heartbeats"] = []
    worker["clock"] = 0
    return worker


def apply_worker_event(worker: dict[str, Any], event: Mapping[str, Any]) -> None:
    """Merge a ``worker-online``/``-heartbeat``/``-offline`` event into a known worker.

    Mutates ``worker`` (and its ``heartbeats`` list) in place. Like ``State``, an event
    without ``timestamp`` or ``local_received`` is ignored entirely. The caller decides
    what to do with ``worker-offline`` for a worker it has no record of: ``State``
    stores nothing for it (see the module docstring).
    """
    try:
        timestamp = event["timestamp"]
        local_received = event["local_received"]
    except KeyError:
        return
    for key, value in event.items():
        if key in _WORKER_COPIED:
            worker[key] = value
    if event["type"] == "worker-offline":
        worker["heartbeats"].clear()
    elif timestamp and local_received:
        _beat(worker["heartbeats"], local_received)


def note_task_event_on_worker(
    worker: dict[str, Any], timestamp: float | None, local_received: float | None
) -> None:
    """Count a task event from ``worker`` as a sign of life, as ``State`` does.

    Celery's ``State`` passes the two times to ``Worker.event`` swapped, so the heartbeat
    it records is the event's *sent* ``timestamp``, not ``local_received``. We keep that
    so ``worker_alive`` agrees with Flower.
    """
    if timestamp and local_received:
        _beat(worker["heartbeats"], timestamp)


def worker_alive(worker: Mapping[str, Any], now: float) -> bool:
    """Celery's rule: online until ``freq * 2`` seconds after the newest heartbeat."""
    heartbeats = worker["heartbeats"]
    if not heartbeats:
        return False
    # float(): some JSON decoders hand over Decimal, which does not mix with float.
    return now < float(heartbeats[-1]) + float(worker["freq"]) * HEARTBEAT_EXPIRE_FACTOR


def _beat(heartbeats: list[Any], at: Any) -> None:
    """Add a heartbeat, keeping the newest few sorted for ``worker_alive``.

    As in Celery, the oldest entry is dropped before inserting even when ``at`` is
    older still, so a very late heartbeat can displace a newer one.
    """
    if len(heartbeats) >= _HEARTBEAT_MAX:
        del heartbeats[0]
    if heartbeats and at > heartbeats[-1]:
        heartbeats.append(at)
    else:
        insort(heartbeats, at)
