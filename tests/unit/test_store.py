"""Ingest into a real SQLite store and read it back: merge, batching, limits, restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from stamen.events.ingest import Ingester
from stamen.search.parser import parse_query
from stamen.store.reader import StoreReader, TaskQuery
from stamen.store.writer import StoreWriter
from tests.factories import lifecycle, task_sent, worker_heartbeat, worker_offline, worker_online


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "history.sqlite3"


def ingest(db: Path, events: list[dict], **limits: object) -> Ingester:
    writer = StoreWriter(db, max_tasks=limits.pop("max_tasks", 1000), **limits)  # type: ignore[arg-type]
    ingester = Ingester(writer)
    for e in events:
        ingester.add(e)
    ingester.flush()
    return ingester


def test_a_batch_of_lifecycles_is_stored_once_per_task(db: Path) -> None:
    events = lifecycle("a", ts=100.0) + lifecycle("b", name="tasks.mul", ts=101.0, outcome="failed")
    ingester = ingest(db, events)
    assert ingester.writer.seq == 1
    reader = StoreReader(db)
    a = reader.get_task("a")
    assert a is not None
    assert (a["state"], a["result"], a["worker"], a["runtime"]) == ("SUCCESS", "3", "w1@host", 0.49)
    b = reader.get_task("b")
    assert b is not None and b["state"] == "FAILURE" and b["exception"] == "KeyError('x')"
    assert reader.task_count() == 2
    assert reader.task_types() == ["tasks.add", "tasks.mul"]
    assert [t["uuid"] for t in reader.list_tasks(TaskQuery())] == ["b", "a"]


def test_events_split_over_batches_merge_into_one_record(db: Path) -> None:
    events = lifecycle("a", ts=100.0)
    writer = StoreWriter(db, max_tasks=1000)
    ingester = Ingester(writer, cache_size=0)  # force reads back from the database
    for e in reversed(events):  # out of order: succeeded first
        ingester.add(e)
        ingester.flush()
    task = StoreReader(db).get_task("a")
    assert task is not None
    assert task["state"] == "SUCCESS"
    assert task["name"] == "tasks.add" and task["args"] == "(1, 2)"
    assert StoreReader(db).task_count() == 1


def test_filters_sort_page_and_search(db: Path) -> None:
    events = []
    for i in range(30):
        events += lifecycle(
            f"t{i:02d}",
            name="tasks.even" if i % 2 == 0 else "tasks.odd",
            ts=1000.0 + i,
            worker="w1@host" if i < 15 else "w2@host",
            outcome="succeeded" if i % 3 else "failed",
            kwargs=f"{{'customer': 'cust-{i}', 'priority': 'high'}}",
        )
    ingest(db, events)
    reader = StoreReader(db)
    page = reader.list_tasks(TaskQuery(limit=5, offset=5))
    assert [t["uuid"] for t in page] == ["t24", "t23", "t22", "t21", "t20"]
    failed = reader.list_tasks(TaskQuery(state="failure"))
    assert {t["uuid"] for t in failed} == {f"t{i:02d}" for i in range(0, 30, 3)}
    w2_even = reader.list_tasks(TaskQuery(workername="W2@HOST", taskname="tasks.even"))
    assert {t["uuid"] for t in w2_even} == {f"t{i:02d}" for i in range(16, 30, 2)}
    by_started = reader.list_tasks(TaskQuery(sort_by="started", descending=False, limit=2))
    assert [t["uuid"] for t in by_started] == ["t00", "t01"]
    found = reader.list_tasks(TaskQuery(search=parse_query("kwargs:customer=cust-7")))
    assert [t["uuid"] for t in found] == ["t07"]
    assert reader.count_tasks(TaskQuery(search=parse_query("cust-1"))) == 11
    windowed = reader.list_tasks(TaskQuery(received_start=1010.0, received_end=1012.0))
    assert {t["uuid"] for t in windowed} == {"t10", "t11", "t12"}


def test_max_tasks_keeps_the_most_recent(db: Path) -> None:
    events = []
    for i in range(50):
        events += lifecycle(f"t{i:02d}", ts=1000.0 + i)
    ingester = ingest(db, events, max_tasks=20)
    reader = StoreReader(db)
    assert reader.task_count() == 20
    kept = [t["uuid"] for t in reader.list_tasks(TaskQuery())]
    assert kept == [f"t{i:02d}" for i in range(49, 29, -1)]
    assert len(ingester.cache) <= 20


def test_max_task_age_drops_old_tasks(db: Path) -> None:
    now = 1_700_000_000.0
    events = lifecycle("old", ts=now - 7200) + lifecycle("new", ts=now - 60)
    writer = StoreWriter(db, max_tasks=1000, max_task_age=3600, clock=lambda: now)
    ingester = Ingester(writer)
    for e in events:
        ingester.add(e)
    ingester.flush()
    reader = StoreReader(db)
    assert reader.get_task("old") is None
    assert reader.get_task("new") is not None
    assert reader.task_count() == 1


def test_children_are_derived_from_parent_ids(db: Path) -> None:
    events = lifecycle("root", ts=10.0) + lifecycle(
        "kid1", ts=11.0, parent_id="root", root_id="root"
    )
    events += lifecycle("kid2", ts=12.0, parent_id="root", root_id="root")
    ingest(db, events)
    root = StoreReader(db).get_task("root")
    assert root is not None and root["children"] == ["kid1", "kid2"]
    kid = StoreReader(db).get_task("kid2")
    assert kid is not None and (kid["parent"], kid["root"]) == ("root", "root")


def test_workers_counters_and_restart(db: Path) -> None:
    events = [worker_online("w1@host", 100.0)]
    events += lifecycle("a", ts=101.0)
    events += [worker_heartbeat("w1@host", 102.0, active=1, processed=1)]
    events += [task_sent("s", "tasks.add", 103.0)]
    events += [worker_offline("gone@host", 104.0)]
    ingester = ingest(db, events)
    reader = StoreReader(db)
    workers = reader.workers()
    assert list(workers) == ["w1@host"]  # offline of an unknown worker creates nothing
    w1 = workers["w1@host"]
    assert (w1["processed"], w1["active"], w1["freq"]) == (1, 1, 2.0)
    assert len(w1["heartbeats"]) == 4
    counters = reader.counters()
    assert counters["w1@host"] == {
        "worker-online": 1, "task-received": 1, "task-started": 1, "task-succeeded": 1,
        "worker-heartbeat": 1,
    }  # fmt: skip
    assert counters["client@app"] == {"task-sent": 1}
    assert counters["gone@host"] == {"worker-offline": 1}
    ingester.writer.close()
    again = ingest(db, [worker_heartbeat("w1@host", 105.0)])
    assert again.writer.seq == 2
    assert StoreReader(db).counters()["w1@host"]["worker-heartbeat"] == 2
    assert StoreReader(db).task_count() == 2


def test_custom_states_become_searchable_states(db: Path) -> None:
    from tests.factories import event

    events = lifecycle("p", ts=5.0, outcome="none")
    events.append(event("task-progress", 6.0, uuid="p", hostname="w1@host", done=50))
    ingest(db, events)
    reader = StoreReader(db)
    assert "PROGRESS" in reader.states()
    assert [t["uuid"] for t in reader.list_tasks(TaskQuery(search=parse_query("progress")))] == [
        "p"
    ]


def test_broad_search_plan_gives_the_same_page(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stamen.store.reader as reader_module

    events = []
    for i in range(60):
        events += lifecycle(
            f"t{i:02d}", ts=1000.0 + (i * 7919) % 60, args=f"('customer-{i}',)",
            outcome="failed" if i % 4 == 0 else "succeeded",
        )  # fmt: skip
    ingest(db, events)
    reader = StoreReader(db)
    queries = [
        TaskQuery(search=parse_query("customer"), limit=10),
        TaskQuery(search=parse_query("customer state:FAILURE"), limit=5, offset=2),
        TaskQuery(search=parse_query("customer"), sort_by="received", descending=True, limit=7),
    ]
    narrow = [[t["uuid"] for t in reader.list_tasks(q)] for q in queries]
    monkeypatch.setattr(reader_module, "BROAD_MATCHES", 3)
    broad = [[t["uuid"] for t in reader.list_tasks(q)] for q in queries]
    assert broad == narrow
    assert all(narrow)
