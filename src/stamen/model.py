"""The shapes of a task record and a worker record, shared by ingest, store and web.

A record is a plain ``dict`` keyed by Celery's own field names (``celery.events.state``),
so what the API returns is exactly what Celery's ``Task.as_dict()`` would give Flower.
"""

from __future__ import annotations

#: Celery's ``Task._fields``, in Celery's order (the order of keys in Flower's JSON).
TASK_FIELDS: tuple[str, ...] = (
    "uuid", "name", "state", "received", "sent", "started", "rejected",
    "succeeded", "failed", "retried", "revoked", "args", "kwargs",
    "eta", "expires", "retries", "worker", "result", "exception",
    "timestamp", "runtime", "traceback", "exchange", "routing_key",
    "clock", "client", "root", "root_id", "parent", "parent_id",
    "children",
)  # fmt: skip

#: Fields kept in a stored task row; ``root``, ``parent`` and ``children`` are derived
#: (``root``/``parent`` mirror the ids, ``children`` is looked up by ``parent_id``).
STORED_TASK_FIELDS: tuple[str, ...] = tuple(
    f for f in TASK_FIELDS if f not in ("root", "parent", "children")
)

#: Celery's ``Worker._fields``, in Celery's order.
WORKER_FIELDS: tuple[str, ...] = (
    "hostname", "pid", "freq", "heartbeats", "clock", "active",
    "processed", "loadavg", "sw_ident", "sw_ver", "sw_sys",
)  # fmt: skip

#: Celery's heartbeat expiry window: a worker is alive until ``freq * 2`` seconds
#: after its newest heartbeat (``HEARTBEAT_EXPIRE_WINDOW`` = 200 %).
HEARTBEAT_EXPIRE_FACTOR = 2.0

#: Celery's built-in states; custom event types (``task-progress``) add upper-cased ones.
CELERY_STATES: tuple[str, ...] = (
    "PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE",
    "RETRY", "REVOKED", "REJECTED",
)  # fmt: skip
