"""Celery-shaped events for tests that feed ingest directly.

The fields are the ones a Celery 5 worker and client really send, so tests that use these
exercise the same merge paths as a live cluster.
"""

from __future__ import annotations

import itertools
from typing import Any

_clock = itertools.count(1)


def event(kind: str, ts: float, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "timestamp": ts,
        "local_received": ts + 0.001,
        "clock": next(_clock),
        "utcoffset": 0,
        "pid": 4242,
        **fields,
    }


def task_sent(uuid: str, name: str, ts: float, **fields: Any) -> dict[str, Any]:
    return event(
        "task-sent", ts, uuid=uuid, name=name, hostname="client@app",
        args=fields.pop("args", "()"), kwargs=fields.pop("kwargs", "{}"),
        retries=0, eta=None, expires=None, queue="celery", exchange="",
        routing_key="celery", root_id=fields.pop("root_id", uuid),
        parent_id=fields.pop("parent_id", None), **fields,
    )  # fmt: skip


def lifecycle(
    uuid: str,
    name: str = "tasks.add",
    *,
    worker: str = "w1@host",
    ts: float = 1_700_000_000.0,
    outcome: str = "succeeded",
    args: str = "(1, 2)",
    kwargs: str = "{}",
    result: str = "3",
    parent_id: str | None = None,
    root_id: str | None = None,
) -> list[dict[str, Any]]:
    """received → started → outcome events of one task run by ``worker``."""
    events = [
        event(
            "task-received",
            ts,
            uuid=uuid,
            name=name,
            args=args,
            kwargs=kwargs,
            root_id=root_id or uuid,
            parent_id=parent_id,
            retries=0,
            eta=None,
            expires=None,
            hostname=worker,
        ),
        event("task-started", ts + 0.01, uuid=uuid, hostname=worker),
    ]
    if outcome == "succeeded":
        events.append(
            event(
                "task-succeeded", ts + 0.5, uuid=uuid, hostname=worker, result=result, runtime=0.49
            )
        )
    elif outcome == "failed":
        events.append(
            event(
                "task-failed",
                ts + 0.5,
                uuid=uuid,
                hostname=worker,
                exception="KeyError('x')",
                traceback="Traceback...\nKeyError: 'x'",
            )
        )
    return events


def worker_online(hostname: str, ts: float, freq: float = 2.0) -> dict[str, Any]:
    return event(
        "worker-online", ts, hostname=hostname, freq=freq, sw_ident="py-celery",
        sw_ver="5.7.0", sw_sys="Linux", active=0, processed=0, loadavg=[0.1, 0.2, 0.3],
    )  # fmt: skip


def worker_heartbeat(
    hostname: str, ts: float, active: int = 0, processed: int = 0, freq: float = 2.0
) -> dict[str, Any]:
    return event(
        "worker-heartbeat", ts, hostname=hostname, freq=freq, sw_ident="py-celery",
        sw_ver="5.7.0", sw_sys="Linux", active=active, processed=processed,
        loadavg=[0.1, 0.2, 0.3],
    )  # fmt: skip


def worker_offline(hostname: str, ts: float) -> dict[str, Any]:
    return event("worker-offline", ts, hostname=hostname, freq=2.0)
