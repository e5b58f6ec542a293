"""The merge core must reproduce ``celery.events.state.State`` record for record.

Table tests pin down the behaviour we rely on (and Celery's quirks); every table case
and the hypothesis test also replay the same events through Celery's own ``State``
and compare, so a Celery upgrade that changes semantics fails here first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
from celery import states
from celery.events.state import TASK_EVENT_TO_STATE, State, Task, Worker
from hypothesis import given, settings
from hypothesis import strategies as st

from stamen.events import merge
from stamen.events.merge import (
    apply_task_event,
    apply_worker_event,
    new_task,
    new_worker,
    note_task_event_on_worker,
    worker_alive,
)
from stamen.model import STORED_TASK_FIELDS, WORKER_FIELDS

UUID = "d3b07384-d9a0-4c9b-8f1a-000000000001"
WORKER = "celery@alpha"
CLIENT = "gen42@client"

Event = dict[str, Any]


# --- replaying a stream: ours the way the ingest caller will, and Celery's ------------


def replay_ours(events: Iterable[Mapping[str, Any]]) -> tuple[dict, dict]:
    """Drive the merge functions the way ``State._event`` drives Task and Worker."""
    tasks: dict[str, dict[str, Any]] = {}
    workers: dict[str, dict[str, Any]] = {}
    for raw in events:
        event = MappingProxyType(dict(raw))  # proves the functions never write to it
        group, _, subject = event["type"].partition("-")
        hostname = event["hostname"]
        if group == "task":
            task = tasks.get(event["uuid"])
            if task is None:
                task = tasks[event["uuid"]] = new_task(event["uuid"])
            if subject != "sent":
                worker = workers.get(hostname)
                if worker is None:
                    worker = workers[hostname] = new_worker(hostname)
                note_task_event_on_worker(worker, event["timestamp"], event["local_received"])
            apply_task_event(task, event)
        elif group == "worker":
            worker = workers.get(hostname)
            if worker is None:
                if subject == "offline":
                    continue  # State keeps nothing for a worker it never saw
                worker = workers[hostname] = new_worker(hostname)
            apply_worker_event(worker, event)
    return tasks, workers


def celery_task_record(task: Task) -> dict[str, Any]:
    record = task.as_dict()
    for derived in ("root", "parent", "children"):
        del record[derived]
    record["worker"] = None if task.worker is None else task.worker.hostname
    return record


def celery_worker_record(worker: Worker) -> dict[str, Any]:
    record = {f: getattr(worker, f) for f in WORKER_FIELDS}
    record["timestamp"] = getattr(worker, "timestamp", None)
    return record


def replay_celery(events: Iterable[Mapping[str, Any]]) -> tuple[dict, dict]:
    state = State()
    for event in events:
        state.event(dict(event))  # Celery writes state/timestamp into the event
    tasks = {uuid: celery_task_record(t) for uuid, t in state.tasks.items()}
    workers = {name: celery_worker_record(w) for name, w in state.workers.items()}
    return tasks, workers


def assert_same_as_celery(events: list[Event]) -> tuple[dict, dict]:
    ours = replay_ours(events)
    assert ours == replay_celery(events)
    return ours


# --- task table ---------------------------------------------------------------------


def task_event(subject: str, ts: float, clock: int, hostname: str = WORKER, **fields) -> Event:
    return {
        "type": f"task-{subject}",
        "uuid": UUID,
        "hostname": hostname,
        "timestamp": ts,
        "local_received": ts + 0.01,
        "clock": clock,
        "utcoffset": 0,
        "pid": 1234,
        **fields,
    }


REQUEST = {
    "name": "proj.tasks.add",
    "args": "(1, 2)",
    "kwargs": "{}",
    "retries": 0,
    "eta": None,
    "expires": None,
    "root_id": UUID,
    "parent_id": None,
}
SENT = task_event(
    "sent", 1.0, 1, hostname=CLIENT, queue="celery", exchange="", routing_key="celery", **REQUEST
)
RECEIVED = task_event("received", 2.0, 2, **REQUEST)
STARTED = task_event("started", 3.0, 3)
SUCCEEDED = task_event("succeeded", 4.0, 4, result="3", runtime=0.5)
FAILED = task_event("failed", 4.0, 4, exception="ValueError('boom')", traceback="Traceback …")
RETRIED = task_event("retried", 4.0, 4, exception="Retry(in 1s)", traceback="Traceback …")
RECEIVED_AGAIN = task_event("received", 5.0, 5, **dict(REQUEST, retries=1))
STARTED_AGAIN = task_event("started", 6.0, 6)
SUCCEEDED_AGAIN = task_event("succeeded", 7.0, 7, result="3", runtime=0.25)
REVOKED = task_event("revoked", 2.5, 3, terminated=False, signum=None, expired=False)
REJECTED = task_event("rejected", 2.5, 3, requeue=False)
PROGRESS = task_event("progress", 3.5, 4, current=5, total=10)

TASK_CASES = [
    pytest.param(
        [SENT, RECEIVED, STARTED, SUCCEEDED],
        {
            "state": "SUCCESS",
            "sent": 1.0,
            "received": 2.0,
            "started": 3.0,
            "succeeded": 4.0,
            "client": CLIENT,
            "worker": WORKER,
            "name": "proj.tasks.add",
            "args": "(1, 2)",
            "root_id": UUID,
            "result": "3",
            "runtime": 0.5,
            "exchange": "",
            "routing_key": "celery",
            "timestamp": 4.0,
            "clock": 4,
        },
        id="lifecycle",
    ),
    pytest.param(
        [RECEIVED, STARTED, FAILED],
        {
            "state": "FAILURE",
            "failed": 4.0,
            "succeeded": None,
            "exception": "ValueError('boom')",
            "traceback": "Traceback …",
            "client": None,
        },
        id="failure",
    ),
    # RETRY is exempt from precedence (rank 7 is "earlier" than STARTED's 4), else a
    # retried event would be treated as stale.
    pytest.param(
        [RECEIVED, STARTED, RETRIED],
        {"state": "RETRY", "retried": 4.0, "exception": "Retry(in 1s)"},
        id="retry",
    ),
    pytest.param(
        [RECEIVED, STARTED, RETRIED, RECEIVED_AGAIN, STARTED_AGAIN, SUCCEEDED_AGAIN],
        {
            "state": "SUCCESS",
            "retries": 1,
            "received": 5.0,
            "started": 6.0,
            "retried": 4.0,
            "succeeded": 7.0,
            "exception": "Retry(in 1s)",  # Celery never clears it
            "runtime": 0.25,
        },
        id="retry-then-success",
    ),
    # ... and the exemption works both ways: a delayed retried event wins over SUCCESS,
    # and anything (even task-sent) wins over RETRY.
    pytest.param(
        [RECEIVED_AGAIN, STARTED_AGAIN, SUCCEEDED_AGAIN, RETRIED],
        {"state": "RETRY", "succeeded": 7.0, "timestamp": 4.0},
        id="late-retry-wins",
    ),
    pytest.param(
        [RECEIVED, STARTED, RETRIED, SENT],
        {"state": "PENDING", "client": CLIENT, "worker": WORKER},
        id="sent-after-retry-wins",
    ),
    pytest.param(
        [SENT, RECEIVED, REVOKED],
        {"state": "REVOKED", "revoked": 2.5, "worker": WORKER, "name": "proj.tasks.add"},
        id="revoked",
    ),
    pytest.param([SENT, REJECTED], {"state": "REJECTED", "rejected": 2.5}, id="rejected"),
    # REJECTED ranks before RECEIVED, so after a received it only merges its fields.
    pytest.param(
        [RECEIVED, REJECTED],
        {"state": "RECEIVED", "rejected": 2.5, "timestamp": 2.5, "clock": 3},
        id="rejected-after-received",
    ),
    pytest.param(
        [RECEIVED, STARTED, PROGRESS],
        {"state": "PROGRESS", "timestamp": 3.5, "clock": 4, "started": 3.0},
        id="custom-progress",
    ),
    pytest.param(
        [RECEIVED, STARTED, PROGRESS, SUCCEEDED],
        {"state": "SUCCESS", "timestamp": 4.0},
        id="custom-then-success",
    ),
    pytest.param(
        [RECEIVED, SUCCEEDED, PROGRESS],
        {"state": "SUCCESS", "timestamp": 3.5},
        id="custom-after-success",
    ),
    # Out of order: a late received gives only its merge-rule fields.
    pytest.param(
        [SUCCEEDED, RECEIVED],
        {
            "state": "SUCCESS",
            "received": 2.0,
            "succeeded": 4.0,
            "name": "proj.tasks.add",
            "args": "(1, 2)",
            "kwargs": "{}",
            "retries": 0,
            "timestamp": 4.0,
            "clock": 4,
        },
        id="received-after-succeeded",
    ),
    # A late started has no merge rule: all its fields land, timestamp and clock too.
    pytest.param(
        [SUCCEEDED, STARTED, RECEIVED],
        {"state": "SUCCESS", "started": 3.0, "name": "proj.tasks.add", "timestamp": 3.0},
        id="started-and-received-after-succeeded",
    ),
    pytest.param(
        [RECEIVED, STARTED, SUCCEEDED, SENT],
        {
            "state": "SUCCESS",
            "sent": 1.0,
            "client": CLIENT,
            "worker": WORKER,
            "routing_key": "celery",
            "timestamp": 1.0,
            "clock": 1,
        },
        id="sent-after-succeeded",
    ),
]


@pytest.mark.parametrize(("events", "expected"), TASK_CASES)
def test_task_merge(events: list[Event], expected: dict[str, Any]) -> None:
    tasks, _ = assert_same_as_celery(events)
    record = tasks[UUID]
    assert {k: record[k] for k in expected} == expected
    assert tuple(record) == STORED_TASK_FIELDS


def test_event_fields_outside_the_record_are_dropped() -> None:
    task = new_task(UUID)
    apply_task_event(task, dict(SENT, worker="bogus", uuid="other"))
    apply_task_event(task, PROGRESS)
    assert tuple(task) == STORED_TASK_FIELDS
    assert task["uuid"] == UUID
    assert task["worker"] == WORKER


def test_event_missing_hostname_and_timestamp_does_not_raise() -> None:
    task = new_task(UUID)
    apply_task_event(task, {"type": "task-started", "uuid": UUID})
    assert (task["state"], task["worker"], task["started"], task["timestamp"]) == (
        "STARTED",
        None,
        None,
        None,
    )


def test_new_records_match_celery_defaults() -> None:
    assert new_task(UUID) == celery_task_record(Task(UUID))
    worker = new_worker(WORKER)
    assert worker == celery_worker_record(Worker(WORKER))
    assert tuple(worker) == (*WORKER_FIELDS, "timestamp")


def test_tables_match_installed_celery() -> None:
    assert merge._RANK == states.PRECEDENCE_LOOKUP
    assert {t: s for t, (_, s) in merge._TASK_EVENTS.items()} == {
        f"task-{subject}": state for subject, state in TASK_EVENT_TO_STATE.items()
    }
    celery_rules = {state: frozenset(keep) for state, keep in Task.merge_rules.items()}
    assert celery_rules == merge._MERGE_RULES


# --- workers ------------------------------------------------------------------------


def worker_event(subject: str, ts: float, received: float | None = None, **fields) -> Event:
    return {
        "type": f"worker-{subject}",
        "hostname": WORKER,
        "timestamp": ts,
        "local_received": ts + 0.5 if received is None else received,
        "utcoffset": 0,
        "pid": 99,
        "clock": int(ts),
        "freq": 2.0,
        "active": 0,
        "processed": 0,
        "loadavg": [0.1, 0.2, 0.3],
        "sw_ident": "py-celery",
        "sw_ver": "5.7.0",
        "sw_sys": "Linux",
        **fields,
    }


def test_worker_online_heartbeat_offline() -> None:
    online = worker_event("online", 100.0)
    beat = worker_event("heartbeat", 102.0, active=3, processed=17)
    offline = worker_event("offline", 104.0, processed=20)

    _, workers = assert_same_as_celery([online])
    assert workers[WORKER] | {"loadavg": None} == {
        "hostname": WORKER,
        "pid": 99,
        "freq": 2.0,
        "heartbeats": [100.5],
        "clock": 100,
        "active": 0,
        "processed": 0,
        "loadavg": None,
        "sw_ident": "py-celery",
        "sw_ver": "5.7.0",
        "sw_sys": "Linux",
        "timestamp": 100.0,
    }

    _, workers = assert_same_as_celery([online, beat])
    assert workers[WORKER]["heartbeats"] == [100.5, 102.5]
    assert (workers[WORKER]["active"], workers[WORKER]["processed"]) == (3, 17)

    _, workers = assert_same_as_celery([online, beat, offline])
    assert workers[WORKER]["heartbeats"] == []
    assert workers[WORKER]["processed"] == 20
    assert workers[WORKER]["timestamp"] == 104.0


def test_heartbeats_capped_at_four_and_sorted() -> None:
    beats = [worker_event("heartbeat", 100.0, received=r) for r in (5, 1, 3, 6, 2, 4)]
    _, workers = assert_same_as_celery(beats)
    # Celery drops the oldest *before* inserting, so 1 is gone before 2 arrives.
    assert workers[WORKER]["heartbeats"] == [3, 4, 5, 6]


def test_worker_event_without_times_is_ignored() -> None:
    worker = new_worker(WORKER)
    event = worker_event("online", 100.0)
    del event["local_received"]
    apply_worker_event(worker, event)
    assert worker == new_worker(WORKER)


def test_offline_of_unknown_worker_is_not_kept_by_celery() -> None:
    tasks, workers = assert_same_as_celery([worker_event("offline", 100.0)])
    assert (tasks, workers) == ({}, {})


def test_task_events_beat_with_the_sent_timestamp() -> None:
    worker = new_worker(WORKER)
    note_task_event_on_worker(worker, 50.0, 50.7)
    note_task_event_on_worker(worker, 51.0, None)
    assert worker["heartbeats"] == [50.0]
    assert_same_as_celery([STARTED, SUCCEEDED])  # worker created, heartbeats 3.0, 4.0


@pytest.mark.parametrize(
    ("now", "alive"),
    [(99.0, True), (103.999, True), (104.0, False), (200.0, False)],
)
def test_worker_alive_boundary(now: float, alive: bool) -> None:
    worker = new_worker(WORKER) | {"heartbeats": [90.0, 100.0], "freq": 2.0}
    assert worker_alive(worker, now) is alive


def test_worker_alive_edge_values() -> None:
    assert worker_alive(new_worker(WORKER), 0.0) is False
    worker = new_worker(WORKER) | {"heartbeats": [Decimal("100")], "freq": Decimal("2")}
    assert worker_alive(worker, 103.5) is True


# --- property: random, reordered, partial, duplicated streams agree with Celery --------

HOSTS = ("celery@alpha", "celery@beta")
TASK_PLANS = {
    "success": ("received", "started", "succeeded"),
    "failure": ("received", "started", "failed"),
    "retry": ("received", "started", "retried", "received", "started", "succeeded"),
    "retry-fail": ("received", "started", "retried", "received", "started", "failed"),
    "revoked-queued": ("received", "revoked"),
    "revoked-running": ("received", "started", "revoked"),
    "rejected": ("received", "rejected"),
    "progress": ("received", "started", "progress", "progress", "succeeded"),
    "not-registered": ("failed",),
}
SUBJECT_FIELDS = {
    "succeeded": lambda n: {"result": repr(n), "runtime": 0.01 * n},
    "failed": lambda n: {"exception": f"KeyError({n})", "traceback": f"Traceback {n}"},
    "retried": lambda n: {"exception": f"Retry({n})", "traceback": f"Traceback {n}"},
    "revoked": lambda n: {"terminated": n % 2 == 0, "signum": 15, "expired": False},
    "rejected": lambda n: {"requeue": False},
    "progress": lambda n: {"current": n, "total": 10},
    "started": lambda n: {},
}
DELAYS = st.sampled_from([0.0, 0.001, 0.25, 3.0])


@st.composite
def event_streams(draw: st.DrawFn) -> list[Event]:
    clock = iter(range(1, 10_000))
    events: list[Event] = []
    base = 1_700_000_000.0

    def stamp(ts: float) -> dict[str, Any]:
        return {"timestamp": ts, "local_received": ts + draw(DELAYS), "clock": next(clock)}

    uuids = [f"task-{i}" for i in range(draw(st.integers(1, 3)))]
    for i, uuid in enumerate(uuids):
        plan = TASK_PLANS[draw(st.sampled_from(sorted(TASK_PLANS)))]
        ts = base + draw(st.integers(0, 20))
        retries = 0
        request = {
            "uuid": uuid,
            "name": f"proj.tasks.t{i}",
            "args": f"({i},)",
            "kwargs": "{}",
            "eta": draw(st.sampled_from([None, "2024-01-01T00:00:00+00:00"])),
            "expires": None,
            "root_id": uuids[0],
            "parent_id": uuids[0] if i else None,
        }
        common = {"uuid": uuid, "utcoffset": 0, "pid": 4000 + i}
        if draw(st.booleans()):
            routing = {"queue": "celery", "exchange": "", "routing_key": "celery"}
            events.append(
                {
                    "type": "task-sent",
                    "hostname": CLIENT,
                    **common,
                    **request,
                    "retries": 0,
                    **routing,
                    **stamp(ts),
                }
            )
        host = draw(st.sampled_from(HOSTS))
        for n, subject in enumerate(plan):
            ts += 0.5
            if subject == "received":
                fields = dict(request, retries=retries)
            else:
                fields = SUBJECT_FIELDS[subject](n)
            if subject == "retried":
                retries += 1
                host = draw(st.sampled_from(HOSTS))
            events.append(
                {"type": f"task-{subject}", "hostname": host, **common, **fields, **stamp(ts)}
            )

    for host in HOSTS:
        ts = base + draw(st.integers(0, 20))
        beats = draw(st.integers(0, 6))
        subjects = ["online", *["heartbeat"] * beats]
        if draw(st.booleans()):
            subjects.append("offline")
        for n, subject in enumerate(subjects):
            ts += 2.0
            events.append(
                {
                    "type": f"worker-{subject}",
                    "hostname": host,
                    "utcoffset": 0,
                    "pid": 99,
                    "freq": 2.0,
                    "active": n % 3,
                    "processed": n,
                    "loadavg": [0.1 * n, 0.2, 0.3],
                    "sw_ident": "py-celery",
                    "sw_ver": "5.7.0",
                    "sw_sys": "Linux",
                    **stamp(ts),
                }
            )

    # Delivery: any order, some events lost, some delivered twice.
    delivered = [e for e in draw(st.permutations(events)) if draw(st.integers(0, 4))]
    for dup in draw(st.lists(st.sampled_from(events), max_size=3)):
        delivered.insert(draw(st.integers(0, len(delivered))), dup)
    return delivered


@settings(max_examples=300, deadline=None)
@given(event_streams())
def test_matches_celery_state(events: list[Event]) -> None:
    tasks, _ = assert_same_as_celery(events)
    for task in tasks.values():
        assert tuple(task) == STORED_TASK_FIELDS
