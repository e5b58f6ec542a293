"""The store contract: SQLite and PostgreSQL behave alike, checked by one suite run on both.

Every test takes ``backend`` (SQLite in a temporary file; PostgreSQL in a fresh schema that
is dropped afterwards) and goes through the public writer/reader interface only: ingest
into the writer, read back through the reader. The search examples are spec 6.3's, on the
four-task fixture of ``tests/unit/test_search_sql.py``. PostgreSQL-only checks (schema
versions, migrations) are at the end.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stamen.events.ingest import Ingester
from stamen.search.parser import SearchError, parse_query
from stamen.store import HistoryReader, HistoryWriter
from stamen.store.reader import StoreReader, TaskQuery
from stamen.store.rollup import COARSE, FINE, decode_hist, runtime_bin
from stamen.store.writer import Batch, StoreWriter
from stamen.web import stats
from tests.factories import (
    event,
    lifecycle,
    task_sent,
    worker_heartbeat,
    worker_offline,
    worker_online,
)
from tests.integration import pgutil
from tests.search_cases import EXAMPLES, FIXTURE
from tests.unit.test_search_sql import flower_matches, queries, tasks


@dataclass
class Backend:
    """One store backend under test: makes writers and readers on one database."""

    name: str
    target: str
    opened: list[Any] = field(default_factory=list)

    def writer(self, max_tasks: int = 1000, **limits: Any) -> HistoryWriter:
        made: HistoryWriter
        if self.name == "postgres":
            from stamen.store.postgres import PostgresWriter

            made = PostgresWriter(self.target, max_tasks=max_tasks, **limits)
        else:
            made = StoreWriter(self.target, max_tasks=max_tasks, **limits)
        self.opened.append(made)
        return made

    def reader(self) -> HistoryReader:
        if self.name == "postgres":
            from stamen.store.postgres import PostgresReader

            made = PostgresReader(self.target)
            self.opened.append(made)
            return made
        return StoreReader(self.target)

    def close(self) -> None:
        for item in self.opened:
            item.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        made = Backend("sqlite", str(tmp_path / "history.sqlite3"))
        yield made
        made.close()
        return
    with pgutil.temp_schema() as url:
        made = Backend("postgres", url)
        try:
            yield made
        finally:
            made.close()


def ingest(backend: Backend, events: list[dict[str, Any]], **limits: Any) -> Ingester:
    ingester = Ingester(backend.writer(**limits))
    for e in events:
        ingester.add(e)
    ingester.flush()
    return ingester


def uuids(reader: HistoryReader, **query: Any) -> list[str]:
    if isinstance(query.get("search"), str):
        query["search"] = parse_query(query["search"])
    return [t["uuid"] for t in reader.list_tasks(TaskQuery(**query))]


# --- ingest, merge, limits ----------------------------------------------------------------


def test_a_batch_of_lifecycles_is_stored_once_per_task(backend: Backend) -> None:
    events = lifecycle("a", ts=100.0) + lifecycle("b", name="tasks.mul", ts=101.0, outcome="failed")
    ingester = ingest(backend, events)
    assert ingester.writer.seq == 1
    reader = backend.reader()
    a = reader.get_task("a")
    assert a is not None
    assert (a["state"], a["result"], a["worker"], a["runtime"]) == ("SUCCESS", "3", "w1@host", 0.49)
    assert (a["received"], a["retries"], a["args"]) == (100.0, 0, "(1, 2)")
    assert isinstance(a["clock"], int)
    b = reader.get_task("b")
    assert b is not None and b["state"] == "FAILURE" and b["exception"] == "KeyError('x')"
    assert reader.task_count() == 2
    assert reader.seq() == 1
    assert reader.task_types() == ["tasks.add", "tasks.mul"]
    assert uuids(reader) == ["b", "a"]
    assert reader.get_task("nope") is None


def test_events_split_over_batches_merge_into_one_record(backend: Backend) -> None:
    events = lifecycle("a", ts=100.0)
    ingester = Ingester(backend.writer(), cache_size=0)  # force reads back from the database
    for e in reversed(events):  # out of order: succeeded first
        ingester.add(e)
        ingester.flush()
    reader = backend.reader()
    task = reader.get_task("a")
    assert task is not None
    assert task["state"] == "SUCCESS"
    assert task["name"] == "tasks.add" and task["args"] == "(1, 2)"
    assert reader.task_count() == 1
    assert reader.seq() == len(events)


def test_filters_sort_page_and_search(backend: Backend) -> None:
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
    ingest(backend, events)
    reader = backend.reader()
    assert uuids(reader, limit=5, offset=5) == ["t24", "t23", "t22", "t21", "t20"]
    assert uuids(reader, limit=0) == []
    assert len(uuids(reader, offset=28)) == 2
    failed = uuids(reader, state="failure")
    assert set(failed) == {f"t{i:02d}" for i in range(0, 30, 3)}
    w2_even = uuids(reader, workername="W2@HOST", taskname="tasks.even")
    assert set(w2_even) == {f"t{i:02d}" for i in range(16, 30, 2)}
    assert uuids(reader, sort_by="started", limit=2) == ["t00", "t01"]
    assert uuids(reader, sort_by="started", descending=True, limit=2) == ["t29", "t28"]
    assert uuids(reader, search="kwargs:customer=cust-7") == ["t07"]
    assert reader.count_tasks(TaskQuery(search=parse_query("cust-1"))) == 11
    assert reader.count_tasks(TaskQuery()) == 30
    assert reader.count_tasks(TaskQuery(state="FAILURE", workername="w1@host")) == 5
    windowed = uuids(reader, received_start=1010.0, received_end=1012.0)
    assert set(windowed) == {"t10", "t11", "t12"}
    started = uuids(reader, started_start=1028.0)
    assert set(started) == {"t28", "t29"}
    # A text sort folds ASCII case and breaks ties by uuid in the same direction.
    by_name = uuids(reader, sort_by="name", limit=3)
    assert by_name == ["t00", "t02", "t04"]
    by_name_desc = uuids(reader, sort_by="name", descending=True, limit=3)
    assert by_name_desc == ["t29", "t27", "t25"]
    assert uuids(reader, sort_by="not-a-column", limit=1) == ["t29"]
    assert len(uuids(reader, limit=10**30)) == 30  # beyond 64 bits: all
    assert uuids(reader, offset=10**30) == []  # beyond 64 bits: none


def test_sorting_puts_nulls_and_case_where_sqlite_does(backend: Backend) -> None:
    rows = {
        "n1": {"uuid": "n1", "name": "beta", "timestamp": 3.0, "runtime": None},
        "n2": {"uuid": "n2", "name": "Alpha", "timestamp": 2.0, "runtime": 1.5},
        "n3": {"uuid": "n3", "name": None, "timestamp": None, "runtime": 0.5},
        "n4": {"uuid": "n4", "name": "alpha", "timestamp": 1.0, "runtime": None},
        "n5": {"uuid": "n5", "name": "Ärger", "timestamp": 4.0, "runtime": 2.0},
        "n6": {"uuid": "n6", "name": "_under", "timestamp": 5.0, "runtime": 2.0},
    }
    backend.writer().write(Batch(tasks=rows, new_tasks=len(rows), reindex=set(rows)))
    reader = backend.reader()
    assert uuids(reader) == ["n6", "n5", "n1", "n2", "n4", "n3"]
    # NOCASE lowercases ASCII, so "_" (0x5f) sorts before "a"; ties go by uuid.
    assert uuids(reader, sort_by="name") == ["n3", "n6", "n2", "n4", "n1", "n5"]
    assert uuids(reader, sort_by="name", descending=True) == ["n5", "n1", "n4", "n2", "n6", "n3"]
    assert uuids(reader, sort_by="runtime") == ["n1", "n4", "n3", "n2", "n5", "n6"]
    assert uuids(reader, sort_by="runtime", descending=True) == ["n6", "n5", "n2", "n3", "n4", "n1"]
    assert uuids(reader, taskname="ALPHA") == ["n2", "n4"]
    assert uuids(reader, taskname="ärger") == []  # NOCASE folds ASCII only


def test_max_tasks_keeps_the_most_recent(backend: Backend) -> None:
    events = []
    for i in range(50):
        events += lifecycle(f"t{i:02d}", ts=1000.0 + i)
    ingester = ingest(backend, events, max_tasks=20)
    reader = backend.reader()
    assert reader.task_count() == 20
    assert uuids(reader) == [f"t{i:02d}" for i in range(49, 29, -1)]
    assert len(ingester.cache) <= 20
    assert reader.get_task("t00") is None


def test_max_tasks_over_several_batches(backend: Backend) -> None:
    ingester = Ingester(backend.writer(max_tasks=5))
    for i in range(12):
        for e in lifecycle(f"t{i:02d}", ts=1000.0 + i):
            ingester.add(e)
        ingester.flush()
    reader = backend.reader()
    assert reader.task_count() == 5
    assert reader.count_tasks(TaskQuery(search=parse_query("tasks.add"))) == 5
    assert uuids(reader) == [f"t{i:02d}" for i in range(11, 6, -1)]


def test_max_task_age_drops_old_tasks(backend: Backend) -> None:
    now = 1_700_000_000.0
    events = lifecycle("old", ts=now - 7200) + lifecycle("new", ts=now - 60)
    ingester = Ingester(backend.writer(max_task_age=3600, clock=lambda: now))
    for e in events:
        ingester.add(e)
    ingester.flush()
    reader = backend.reader()
    assert reader.get_task("old") is None
    assert reader.get_task("new") is not None
    assert reader.task_count() == 1
    assert uuids(reader, search="tasks.add") == ["new"]


def test_children_are_derived_from_parent_ids(backend: Backend) -> None:
    events = lifecycle("root", ts=10.0)
    events += lifecycle("kid1", ts=11.0, parent_id="root", root_id="root")
    events += lifecycle("kid2", ts=12.0, parent_id="root", root_id="root")
    ingest(backend, events)
    reader = backend.reader()
    root = reader.get_task("root")
    assert root is not None and root["children"] == ["kid1", "kid2"]
    kid = reader.get_task("kid2")
    assert kid is not None and (kid["parent"], kid["root"]) == ("root", "root")
    listed = {t["uuid"]: t["children"] for t in reader.list_tasks(TaskQuery())}
    assert listed == {"root": ["kid1", "kid2"], "kid1": [], "kid2": []}


def test_workers_counters_and_restart(backend: Backend) -> None:
    events = [worker_online("w1@host", 100.0)]
    events += lifecycle("a", ts=101.0)
    events += [worker_heartbeat("w1@host", 102.0, active=1, processed=1)]
    events += [task_sent("s", "tasks.add", 103.0)]
    events += [worker_offline("gone@host", 104.0)]
    ingester = ingest(backend, events)
    reader = backend.reader()
    workers = reader.workers()
    assert list(workers) == ["w1@host"]  # offline of an unknown worker creates nothing
    w1 = workers["w1@host"]
    assert (w1["processed"], w1["active"], w1["freq"]) == (1, 1, 2.0)
    assert len(w1["heartbeats"]) == 4
    assert w1["timestamp"] == 102.0
    counters = reader.counters()
    assert counters["w1@host"] == {
        "worker-online": 1, "task-received": 1, "task-started": 1, "task-succeeded": 1,
        "worker-heartbeat": 1,
    }  # fmt: skip
    assert list(counters["w1@host"]) == [
        "worker-online", "task-received", "task-started", "task-succeeded", "worker-heartbeat",
    ]  # fmt: skip
    assert counters["client@app"] == {"task-sent": 1}
    assert counters["gone@host"] == {"worker-offline": 1}
    assert list(counters) == ["w1@host", "client@app", "gone@host"]
    ingester.writer.close()
    again = ingest(backend, [worker_heartbeat("w1@host", 105.0), *lifecycle("b", ts=106.0)])
    assert again.writer.seq == 2
    assert set(again.workers) == {"w1@host"}
    reader = backend.reader()
    assert reader.counters()["w1@host"]["worker-heartbeat"] == 2
    assert reader.task_count() == 3
    assert reader.seq() == 2
    assert uuids(reader) == ["b", "s", "a"]
    again.writer.trim_workers({})
    assert backend.reader().workers() == {}


def test_restart_continues_ids_and_merges_into_stored_tasks(backend: Backend) -> None:
    events = lifecycle("a", ts=1.0, outcome="none")
    first = ingest(backend, events)
    first.writer.close()
    second = ingest(backend, [event("task-succeeded", 2.0, uuid="a", hostname="w1@host")])
    second_more = lifecycle("b", ts=3.0)
    for e in second_more:
        second.add(e)
    second.flush()
    reader = backend.reader()
    a = reader.get_task("a")
    assert a is not None and a["state"] == "SUCCESS" and a["name"] == "tasks.add"
    assert reader.task_count() == 2
    assert reader.seq() == 3
    assert uuids(reader, search="tasks.add") == ["b", "a"]


def test_custom_states_become_searchable_states(backend: Backend) -> None:
    events = lifecycle("p", ts=5.0, outcome="none")
    events.append(event("task-progress", 6.0, uuid="p", hostname="w1@host", done=50))
    ingester = ingest(backend, events)
    reader = backend.reader()
    assert "PROGRESS" in reader.states()
    assert uuids(reader, search="progress") == ["p"]
    assert uuids(reader, search="state:progress") == ["p"]
    ingester.writer.close()
    assert backend.writer().load_custom_states() == {"PROGRESS"}


# --- search -------------------------------------------------------------------------------


@pytest.fixture
def searchable(backend: Backend) -> HistoryReader:
    """The four tasks of spec 6.3, written through the store's writer."""
    rows = {str(t["uuid"]): {**t, "timestamp": float(n)} for n, t in FIXTURE.items()}
    backend.writer().write(Batch(tasks=rows, new_tasks=len(rows), reindex=set(rows)))
    return backend.reader()


def numbers(found: list[str]) -> set[int]:
    by_uuid = {task["uuid"]: number for number, task in FIXTURE.items()}
    return {by_uuid[uuid] for uuid in found}


@pytest.mark.parametrize(("query", "expected"), EXAMPLES)
def test_search_examples(searchable: HistoryReader, query: str, expected: set[int]) -> None:
    assert numbers(uuids(searchable, search=query)) == expected
    assert searchable.count_tasks(TaskQuery(search=parse_query(query))) == len(expected)


def test_search_combines_with_filters_and_paging(searchable: HistoryReader) -> None:
    assert numbers(uuids(searchable, search="customer", state="SUCCESS")) == {2}
    assert numbers(uuids(searchable, search="celery", workername="celery@beta")) == {3, 4}
    assert uuids(searchable, search="customer", limit=1) == [FIXTURE[3]["uuid"]]
    assert uuids(searchable, search="customer", limit=1, offset=2) == [FIXTURE[1]["uuid"]]


def test_updates_reindex_the_row(backend: Backend) -> None:
    writer = backend.writer()
    rows: dict[str, dict[str, Any]] = {str(t["uuid"]): dict(t) for t in FIXTURE.values()}
    writer.write(Batch(tasks=rows, new_tasks=len(rows), reindex=set(rows)))
    reader = backend.reader()
    uuid2, uuid4 = str(FIXTURE[2]["uuid"]), str(FIXTURE[4]["uuid"])
    rows[uuid2].update(args="()", name="tasks.fetch2")
    writer.write(Batch(tasks={uuid2: rows[uuid2]}, reindex={uuid2}))
    assert numbers(uuids(reader, search="customer")) == {1, 3}
    assert numbers(uuids(reader, search="name:fetch")) == {1, 2, 3}
    rows[uuid4].update(state="REVOKED", result="timeout", kwargs="{'priority': 'High'}")
    writer.write(Batch(tasks={uuid4: rows[uuid4]}, reindex={uuid4}))
    assert numbers(uuids(reader, search="state:revoked")) == {4}
    assert numbers(uuids(reader, search="revoked")) == {4}
    assert numbers(uuids(reader, search="result:timeout")) == {1, 3, 4}
    assert numbers(uuids(reader, search="kwargs:priority=high")) == {1, 3, 4}
    assert numbers(uuids(reader, search='kwargs:label="some value"')) == set()
    # A dict kwargs (not Celery's repr string) is kept as JSON and still yields pairs.
    rows[uuid4]["kwargs"] = {"label": "Some Value", "flag": True}
    writer.write(Batch(tasks={uuid4: rows[uuid4]}, reindex={uuid4}))
    assert numbers(uuids(reader, search='kwargs:label="some value"')) == {4}
    assert numbers(uuids(reader, search="kwargs:flag=true")) == {4}


def write_rows(backend: Backend, *rows: dict[str, Any]) -> HistoryReader:
    tasks = {str(r["uuid"]): dict(r) for r in rows}
    backend.writer().write(Batch(tasks=tasks, new_tasks=len(tasks), reindex=set(tasks)))
    return backend.reader()


def search_set(reader: HistoryReader, query: str) -> set[str]:
    return set(uuids(reader, search=query))


def test_special_characters(backend: Backend) -> None:
    reader = write_rows(
        backend,
        {"uuid": "q1", "args": "('say \"hi\" now',)", "kwargs": "{'foo': 1}"},
        {"uuid": "q2", "args": "('back\\\\slash',)", "result": "a%b_c*d"},
        {"uuid": "q3", "name": "AND OR NOT NEAR", "result": "{col}:x"},
        {"uuid": "q4", "result": "axbxcxd"},
    )
    assert search_set(reader, "{'foo'") == {"q1"}
    assert search_set(reader, '"say \\"hi\\""') == {"q1"}
    assert search_set(reader, '\\"hi\\"') == {"q1"}
    assert search_set(reader, "back\\\\\\\\slash") == {"q2"}
    assert search_set(reader, "a%b_c*d") == {"q2"}  # % and _ are not wildcards
    assert search_set(reader, "%b_") == {"q2"}
    assert search_set(reader, '"AND" "NOT" near') == {"q3"}
    assert search_set(reader, "{col}:x") == {"q3"}
    assert search_set(reader, 'result:"{col}:"') == {"q3"}
    assert search_set(reader, "abc\0def") == set()


def test_unicode_folding(backend: Backend) -> None:
    reader = write_rows(
        backend,
        {"uuid": "u1", "args": "('Straße',)"},
        {"uuid": "u2", "args": "('STRASSE',)"},
        {"uuid": "u3", "args": "('ärger ΣΑΣ',)"},
        {"uuid": "u4", "args": "('İstanbul',)"},
    )
    assert search_set(reader, "straße") == {"u1", "u2"}
    assert search_set(reader, "STRAẞE") == {"u1", "u2"}
    assert search_set(reader, "ÄRGER") == {"u3"}
    assert search_set(reader, "σας") == {"u3"}
    assert search_set(reader, "İstanbul") == {"u4"}
    assert search_set(reader, "strasse") == {"u2"}  # documented divergence from Flower


def test_state_with_non_ascii_case(backend: Backend) -> None:
    reader = write_rows(
        backend,
        {"uuid": "s1", "state": "ÄRGER"},
        {"uuid": "s2", "state": "ärger"},
        {"uuid": "s3", "state": "ARGER"},
    )
    # NOCASE folds ASCII only; plain terms see state text only for states the reader
    # knows (Celery's and custom ones), so these exotic states match only by ``state:``.
    assert search_set(reader, "state:ärger") == {"s2"}
    assert search_set(reader, "state:ÄRGER") == {"s2"}
    assert search_set(reader, "state:arger") == {"s3"}
    assert search_set(reader, "rger") == set()


def test_kwargs_pairs_that_cannot_be_narrowed(backend: Backend) -> None:
    reader = write_rows(
        backend,
        {"uuid": "k1", "kwargs": "{'items': [1, 2], 'q': \"it's\", 'n': 5}"},
        {"uuid": "k2", "kwargs": "{'items': [1,2]}"},
        {"uuid": "k3", "kwargs": "{'items': '[1, 2]'}"},
        {"uuid": "k4", "kwargs": "{'ab': 'Straße'}"},
        {"uuid": "k5", "kwargs": "not a dict {"},
        {"uuid": "k6", "kwargs": None},
        {"uuid": "k7", "kwargs": "{'nul': 'a\\x00b'}"},
    )
    assert search_set(reader, 'kwargs:items="[1, 2]"') == {"k1", "k2", "k3"}
    assert search_set(reader, "kwargs:q=it's") == {"k1"}
    assert search_set(reader, "kwargs:n=5") == {"k1"}
    assert search_set(reader, "kwargs:ab=STRAẞE") == {"k4"}
    assert search_set(reader, "kwargs:nul=a\0b") == {"k7"}
    # SQLite narrows through its FTS folding and misses what Flower finds; PostgreSQL
    # compares the stored pairs exactly, as Flower does.
    expected = {"k4"} if backend.name == "postgres" else set()
    assert search_set(reader, "kwargs:ab=strasse") == expected


def test_nul_characters_are_stored_and_do_not_break_queries(backend: Backend) -> None:
    reader = write_rows(backend, {"uuid": "z1", "name": "na\0me", "args": "('x\0y',)"})
    task = reader.get_task("z1")
    assert task is not None and task["name"] in ("na\0me", "na\ufffdme")
    assert reader.get_task("z\0") is None
    assert uuids(reader, taskname="nope\0") == []


# Random queries over random tasks: both stores agree with Flower's rules read directly.


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(tasks, min_size=1, max_size=6), queries())
def test_search_agrees_with_flower_rules(
    backend: Backend, generated: list[dict[str, Any]], query: str
) -> None:
    try:
        node = parse_query(query)
    except SearchError:
        assume(False)
        return
    rows = {}
    expected = set()
    for number, task in enumerate(generated):
        row = {"uuid": f"task-{number:04}", **task}
        rows[row["uuid"]] = row
        if node is None or flower_matches(node, row):
            expected.add(row["uuid"])
    reader = _fresh_rows(backend, rows)
    assert set(uuids(reader, search=query)) == expected


def _fresh_rows(backend: Backend, rows: Mapping[str, dict[str, Any]]) -> HistoryReader:
    """Replace every stored task with ``rows`` (a limit of 0 trims, then they are written)."""
    writer = _shared_writer(backend)
    writer.max_tasks = 0
    writer.write(Batch(task_types={"x"}))
    writer.max_tasks = 1000
    for row in rows.values():
        row.pop("id", None)
    batch = Batch(tasks=dict(rows), new_tasks=len(rows), reindex=set(rows))
    batch.custom_states = ["custom"]  # a state the generated tasks use
    writer.write(batch)
    return _shared_reader(backend)


def _shared_writer(backend: Backend) -> HistoryWriter:
    if not hasattr(backend, "_writer"):
        backend._writer = backend.writer()  # type: ignore[attr-defined]
    return backend._writer  # type: ignore[attr-defined,no-any-return]


def _shared_reader(backend: Backend) -> HistoryReader:
    if not hasattr(backend, "_reader"):
        backend._reader = backend.reader()  # type: ignore[attr-defined]
    return backend._reader  # type: ignore[attr-defined,no-any-return]


# --- rollups (charts and failure groups) and backfill marks -------------------------------

#: A clock near the tasks below, so the writer's pruning of old rollups keeps theirs.
NOW = 1_700_001_600.0


def rollup_counts(reader: HistoryReader, width: int) -> dict[tuple[float, str, str], int]:
    """(bucket, name, state) → count of the stored task rollups of ``width``."""
    return {
        (float(bucket), name, state): int(count)
        for bucket, name, state, count, _ in reader.task_rollups(width, 0.0)
    }


def test_rollups_count_finished_tasks_per_bucket(backend: Backend) -> None:
    t0 = NOW - 600.0  # on a 30 s and a 30 min boundary
    events = (
        lifecycle("a", ts=t0)
        + lifecycle("b", ts=t0 + 1)
        + lifecycle("c", name="tasks.mul", ts=t0 + 40, outcome="failed")
        + lifecycle("d", ts=t0 + 41, outcome="none")  # still running: not counted
    )
    ingest(backend, events, clock=lambda: NOW)
    reader = backend.reader()
    assert rollup_counts(reader, FINE) == {
        (t0, "tasks.add", "SUCCESS"): 2,
        (t0 + 30, "tasks.mul", "FAILURE"): 1,
    }
    assert rollup_counts(reader, COARSE) == {
        (t0, "tasks.add", "SUCCESS"): 2,
        (t0, "tasks.mul", "FAILURE"): 1,
    }
    hists = {row[1]: decode_hist(row[4]) for row in reader.task_rollups(FINE, t0)}
    assert hists["tasks.add"] == {runtime_bin(0.49): 2}
    data = stats.chart_data(reader, "15m", NOW)
    assert data["finished"] == 3 and data["partial"] is False
    assert sum(data["throughput"]) == pytest.approx(3 * 60 / 30)
    i = data["times"].index(t0)
    assert data["failure_rate"][i] == 0 and data["failure_rate"][i + 1] == 100
    assert data["p50"][i] == pytest.approx(0.49, rel=0.05)
    assert data["p50"][i + 1] is None  # a failure reports no runtime
    types = {t["name"]: t for t in data["types"]}
    assert types["tasks.add"]["count"] == 2 and types["tasks.mul"]["count"] == 1
    groups = stats.failure_groups(reader, "15m", NOW)
    assert [(g["exception_type"], g["name"], g["count"]) for g in groups] == [
        ("KeyError", "tasks.mul", 1)
    ]
    assert (groups[0]["first_seen"], groups[0]["last_seen"]) == (t0 + 40.5, t0 + 40.5)
    assert groups[0]["sample_uuid"] == "c"
    assert groups[0]["sample_traceback"] == "Traceback...\nKeyError: 'x'"


@pytest.mark.parametrize("cache_size", [0, 100])
def test_a_task_that_changes_after_counting_moves_buckets(
    backend: Backend, cache_size: int
) -> None:
    t0 = NOW - 600.0
    ingester = Ingester(backend.writer(clock=lambda: NOW), cache_size=cache_size)
    for e in lifecycle("a", ts=t0):
        ingester.add(e)
    ingester.flush()
    reader = backend.reader()
    assert rollup_counts(reader, FINE) == {(t0, "tasks.add", "SUCCESS"): 1}
    # Retried (RETRY overrides SUCCESS) and run again, failing 100 s later: out of SUCCESS
    # at t0, into FAILURE at t0 + 90.
    ingester.add(event("task-retried", t0 + 60, uuid="a", hostname="w1@host"))
    ingester.add(event("task-started", t0 + 100, uuid="a", hostname="w1@host"))
    ingester.add(
        event("task-failed", t0 + 101, uuid="a", hostname="w1@host", exception="OSError(5)")
    )
    ingester.flush()
    assert rollup_counts(reader, FINE) == {(t0 + 90, "tasks.add", "FAILURE"): 1}
    assert rollup_counts(reader, COARSE) == {(t0, "tasks.add", "FAILURE"): 1}
    groups = stats.failure_groups(reader, "15m", NOW)
    assert [(g["exception_type"], g["count"]) for g in groups] == [("OSError", 1)]
    # Retried again: counted nowhere, and the failure group is gone.
    ingester.add(event("task-retried", t0 + 200, uuid="a", hostname="w1@host"))
    ingester.flush()
    assert rollup_counts(reader, FINE) == {} and rollup_counts(reader, COARSE) == {}
    assert stats.failure_groups(reader, "1d", NOW) == []


def test_trimming_tasks_keeps_their_rollups(backend: Backend) -> None:
    ingester = Ingester(backend.writer(max_tasks=5, clock=lambda: NOW))
    for i in range(12):
        for e in lifecycle(
            f"t{i:02d}", ts=NOW - 300 + i, outcome="failed" if i < 4 else "succeeded"
        ):
            ingester.add(e)
        ingester.flush()
    reader = backend.reader()
    assert reader.task_count() == 5
    assert sum(rollup_counts(reader, COARSE).values()) == 12
    assert stats.chart_data(reader, "1h", NOW)["finished"] == 12
    groups = stats.failure_groups(reader, "1h", NOW)
    assert groups[0]["count"] == 4
    assert groups[0]["sample_uuid"] == "t03" and groups[0]["sample_exception"] is None


def test_old_rollups_are_pruned_by_the_writer(backend: Backend) -> None:
    clock = [NOW]
    ingester = Ingester(backend.writer(clock=lambda: clock[0]))
    for e in lifecycle("old", ts=NOW - 100) + lifecycle("f", ts=NOW - 100, outcome="failed"):
        ingester.add(e)
    ingester.flush()
    reader = backend.reader()
    assert sum(rollup_counts(reader, FINE).values()) == 2
    clock[0] = NOW + 8 * 86400
    for e in lifecycle("new", ts=clock[0] - 10):
        ingester.add(e)
    ingester.flush()
    assert set(rollup_counts(reader, FINE)) == {(clock[0] - 30, "tasks.add", "SUCCESS")}
    assert reader.failure_rollups(FINE, 0.0) == []


def test_backfilled_tasks_are_marked(backend: Backend) -> None:
    events = lifecycle("filled", ts=NOW - 10)
    events[0]["stamen_backfilled"] = True
    events += lifecycle("heard", ts=NOW - 5)
    ingester = ingest(backend, events, max_tasks=2, clock=lambda: NOW)
    reader = backend.reader()
    filled, heard = reader.get_task("filled"), reader.get_task("heard")
    assert filled is not None and filled["backfilled"] is True
    assert heard is not None and "backfilled" not in heard
    assert "backfilled" not in reader.list_tasks(TaskQuery())[0]
    # Trimmed with its task: the same uuid heard of again later is not marked.
    for e in lifecycle("newer", ts=NOW - 1) + lifecycle("newest", ts=NOW):
        ingester.add(e)
    ingester.flush()
    assert reader.get_task("filled") is None
    for e in lifecycle("filled", ts=NOW + 1):
        ingester.add(e)
    ingester.flush()
    again = reader.get_task("filled")
    assert again is not None and "backfilled" not in again


def test_rollups_of_nul_names_and_exceptions(backend: Backend) -> None:
    events = lifecycle("n", name="tasks.\0odd", ts=NOW - 60, outcome="failed")
    events[-1]["exception"] = "Bad\0Error('x')"
    ingest(backend, events, clock=lambda: NOW)
    reader = backend.reader()
    assert list(rollup_counts(reader, FINE).values()) == [1]
    assert next(iter(rollup_counts(reader, FINE)))[1] == "tasks.\ufffdodd"
    groups = stats.failure_groups(reader, "15m", NOW)
    assert [(g["exception_type"], g["name"]) for g in groups] == [
        ("Bad\ufffdError", "tasks.\ufffdodd")
    ]
    assert groups[0]["sample_traceback"] == "Traceback...\nKeyError: 'x'"


def test_sqlite_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """A version-1 SQLite file (made with the version-1 DDL) keeps its history and gets
    rollups built from its tasks, like the PostgreSQL fixture below."""
    import sqlite3

    from stamen.store.schema import DDL, TASK_COLUMNS, V2_DDL

    path = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in DDL:
        if statement not in V2_DDL:
            conn.execute(statement)
    conn.execute("PRAGMA user_version=1")
    cols = ("id", "uuid", "name", "state", "timestamp", "runtime", "exception", "seq")
    conn.executemany(
        f"INSERT INTO tasks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        [
            (1, "v1-a", "tasks.add", "SUCCESS", 101.5, 0.49, None, 1),
            (2, "v1-b", "tasks.mul", "FAILURE", 102.5, None, "KeyError('x')", 1),
            (3, "v1-kid", "tasks.add", "SUCCESS", 103.5, 0.49, None, 1),
            (4, "v1-p", "tasks.add", "PROGRESS", 105.0, None, None, 1),
        ],
    )
    conn.execute("INSERT INTO meta (key, value) VALUES ('seq', 1)")
    conn.close()
    assert "traceback" in TASK_COLUMNS
    writer = StoreWriter(path, max_tasks=10)
    assert writer.conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert (writer.seq, writer.task_count) == (1, 4)
    writer.close()
    reader = StoreReader(path)
    assert_v1_fixture_rollups(reader)
    plan = reader.conn.execute(
        "EXPLAIN QUERY PLAN SELECT uuid FROM tasks WHERE tasks.state = ? COLLATE NOCASE "
        "ORDER BY tasks.received DESC, tasks.uuid DESC LIMIT 15",
        ("FAILURE",),
    ).fetchall()
    assert "tasks_by_state_received" in str(plan) and "TEMP B-TREE" not in str(plan), plan


# --- PostgreSQL only: schema versions and migrations ----------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pgutil.temp_schema() as url:
        yield url


pg_only = pytest.mark.integration


@pg_only
def test_schema_is_versioned_and_migration_is_idempotent(pg_url: str) -> None:
    from stamen.store.postgres import SCHEMA_VERSION, PostgresWriter, connect, migrate

    PostgresWriter(pg_url, max_tasks=10).close()
    with connect(pg_url) as conn:
        assert migrate(conn) == SCHEMA_VERSION
        assert migrate(conn) == SCHEMA_VERSION
        rows = conn.execute("SELECT version FROM stamen_schema_version ORDER BY 1").fetchall()
        assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        indexes = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            )
        }
        assert {"tasks_trgm", "tasks_by_kwargs_pairs"} <= indexes


@pg_only
def test_a_newer_or_foreign_database_is_refused(pg_url: str) -> None:
    from stamen.store.postgres import PostgresWriter, connect
    from stamen.store.sqlite import StoreError

    for table in ("tasks", "workers", "audit_log"):  # the history's or the action store's
        with connect(pg_url) as conn:
            conn.execute(f"CREATE TABLE {table} (x int)")
        with pytest.raises(StoreError, match=f"not Stamen's \\({table}\\)"):
            PostgresWriter(pg_url, max_tasks=10)
        with connect(pg_url) as conn:
            conn.execute(f"DROP TABLE {table}")
    PostgresWriter(pg_url, max_tasks=10).close()
    with connect(pg_url) as conn:
        conn.execute("INSERT INTO stamen_schema_version VALUES (999, 0)")
    with pytest.raises(StoreError, match="newer than this Stamen"):
        PostgresWriter(pg_url, max_tasks=10)


FIXTURE_V1 = Path(__file__).parent / "fixtures" / "pg_schema_v1.sql"


def load_v1_fixture(url: str) -> None:
    """Restore the version-1 fixture database into the schema ``url`` points at."""
    from stamen.store.postgres import connect

    with connect(url) as conn:
        schema = conn.execute("SELECT current_schema()").fetchone()
        assert schema is not None
        conn.execute(FIXTURE_V1.read_text().replace("__SCHEMA__", f'"{schema[0]}"'))  # type: ignore[arg-type]


@pg_only
def test_the_version_1_fixture_opens_and_keeps_its_history(pg_url: str) -> None:
    from stamen.store.postgres import PostgresReader, PostgresWriter, connect, schema_version

    load_v1_fixture(pg_url)
    writer = PostgresWriter(pg_url, max_tasks=100)
    with connect(pg_url) as conn:
        assert schema_version(conn) == 2  # upgraded on open
        indexes = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            )
        }
        assert "tasks_trgm" in indexes  # ensured on start, though the fixture lacks it
    assert (writer.seq, writer.task_count) == (1, 4)
    reader = PostgresReader(pg_url)
    assert set(uuids(reader)) == {"v1-a", "v1-b", "v1-kid", "v1-p"}
    a = reader.get_task("v1-a")
    assert a is not None and a["children"] == ["v1-kid"] and a["state"] == "SUCCESS"
    assert uuids(reader, search="kwargs:colour=teal") == ["v1-a"]
    assert uuids(reader, search="progress") == ["v1-p"]
    assert uuids(reader, search="tasks.mul") == ["v1-b"]
    assert reader.workers()["w1@host"]["processed"] == 3
    assert reader.counters()["w1@host"]["task-received"] == 4
    ingester = Ingester(writer)
    for e in lifecycle("new", ts=200.0):
        ingester.add(e)
    ingester.flush()
    assert reader.seq() == 2 and reader.task_count() == 5
    assert uuids(reader, limit=1) == ["new"]
    writer.close()


@pg_only
def test_a_version_1_database_is_upgraded_in_place(pg_url: str) -> None:
    """The version-1 fixture keeps its history through the migration to version 2, which
    builds the rollups from the stored tasks."""
    from stamen.store import postgres
    from stamen.store.postgres import PostgresReader, PostgresWriter

    load_v1_fixture(pg_url)
    writer = PostgresWriter(pg_url, max_tasks=10)
    assert postgres.schema_version(writer.conn) == 2
    assert writer.seq == 1 and writer.task_count == 4
    writer.close()
    reader = PostgresReader(pg_url)
    assert uuids(reader, search="tasks.mul") == ["v1-b"]
    assert_v1_fixture_rollups(reader)


def assert_v1_fixture_rollups(reader: HistoryReader) -> None:
    """The rollups of the version-1 fixture's tasks (two tasks.add successes with runtime
    0.49 finishing at 101.5 and 103.5, a tasks.mul KeyError at 102.5, one PROGRESS task)."""
    assert rollup_counts(reader, FINE) == {
        (90.0, "tasks.add", "SUCCESS"): 2,
        (90.0, "tasks.mul", "FAILURE"): 1,
    }
    assert rollup_counts(reader, COARSE) == {
        (0.0, "tasks.add", "SUCCESS"): 2,
        (0.0, "tasks.mul", "FAILURE"): 1,
    }
    groups = stats.failure_groups(reader, "1d", 1000.0)
    assert [(g["exception_type"], g["name"], g["count"]) for g in groups] == [
        ("KeyError", "tasks.mul", 1)
    ]
    assert groups[0]["sample_uuid"] == "v1-b" and groups[0]["sample_exception"] == "KeyError('x')"


@pg_only
@pytest.mark.parametrize(
    ("query", "index"),
    [
        (TaskQuery(search=parse_query("customer")), "tasks_trgm"),
        (TaskQuery(search=parse_query("customer result:timeout")), "tasks_trgm"),
        (TaskQuery(search=parse_query("fetch OR echo")), "tasks_trgm"),
        (TaskQuery(search=parse_query("failure")), "tasks_by_state"),
        (TaskQuery(search=parse_query("kwargs:priority=high")), "tasks_by_kwargs_pairs"),
        (TaskQuery(search=parse_query("state:FAILURE")), "tasks_by_state"),
        (TaskQuery(state="failure"), "tasks_by_state"),
        (TaskQuery(workername="celery@alpha"), "tasks_by_worker"),
        (TaskQuery(taskname="tasks.fetch"), "tasks_by_name"),
        (TaskQuery(received_start=1.0, sort_by="received"), "tasks_by_received"),
        (
            TaskQuery(search=parse_query("state:FAILURE"), sort_by="received", limit=15),
            "tasks_by_state_received",
        ),
        (TaskQuery(state="FAILURE", sort_by="received", limit=15), "tasks_by_state_received"),
        (TaskQuery(limit=10), "tasks_by_time"),
        (TaskQuery(sort_by="name", limit=10), "tasks_by_name"),
    ],
)
def test_postgres_queries_can_use_their_index(pg_url: str, query: TaskQuery, index: str) -> None:
    """Every filter, sort and search has an index whose expression the query matches
    (sequential scans are disabled: on four rows the planner would rightly prefer one)."""
    from stamen.store.postgres import PostgresReader, PostgresWriter

    writer = PostgresWriter(pg_url, max_tasks=100)
    rows = {str(t["uuid"]): {**t, "timestamp": float(n)} for n, t in FIXTURE.items()}
    writer.write(Batch(tasks=rows, new_tasks=len(rows)))
    writer.close()
    reader = PostgresReader(pg_url)
    where, params = reader._where(query)
    with reader.connection() as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                f"EXPLAIN SELECT uuid FROM tasks WHERE {where} ORDER BY {reader._order(query)} "
                "LIMIT %s",
                [*params, query.limit],
            )
        )
    reader.close()
    assert index in plan and "Seq Scan" not in plan, plan


def test_changed_tasks_are_what_the_live_pages_patch(backend: Backend) -> None:
    ingester = ingest(backend, lifecycle("a", ts=100.0) + lifecycle("b", ts=101.0))
    reader = backend.reader()
    before = reader.seq()
    for e in lifecycle("c", ts=102.0, outcome="failed") + lifecycle("a", ts=103.0):
        ingester.add(e)
    ingester.flush()
    changed, total = reader.changed_tasks(before, 10)
    assert total == 2
    assert sorted(t["uuid"] for t in changed) == ["a", "c"]
    c = next(t for t in changed if t["uuid"] == "c")
    assert (c["state"], c["name"], c["worker"]) == ("FAILURE", "tasks.add", "w1@host")
    assert set(c) == {
        "uuid", "name", "state", "received", "started", "runtime", "worker", "timestamp",
        "retries", "root_id", "parent_id",
    }  # fmt: skip
    one, total = reader.changed_tasks(before, 1)
    assert len(one) == 1 and total == 2
    assert reader.changed_tasks(reader.seq(), 10) == ([], 0)


def test_a_uuid_holding_nul_merges_its_later_events_into_one_task(backend: Backend) -> None:
    """PostgreSQL stores the NUL as U+FFFD; reading the task back for the next batch must
    find it under the uuid ingest knows, not fail the batch or start a second task."""
    received, started, succeeded = lifecycle("a\0b", ts=100.0)
    ingester = Ingester(backend.writer(), cache_size=0)  # the second batch reads it back
    ingester.add(received)
    ingester.flush()
    for e in (started, succeeded):
        ingester.add(e)
    ingester.flush()
    reader = backend.reader()
    assert reader.task_count() == 1
    task = reader.get_task("a\0b")
    assert task is not None
    assert task["uuid"] in ("a\0b", "a\ufffdb")
    assert (task["state"], task["received"], task["result"]) == ("SUCCESS", 100.0, "3")
    assert [t["uuid"] for t in reader.list_tasks(TaskQuery())] == [task["uuid"]]


def _walk_history(count: int) -> dict[str, dict[str, Any]]:
    """``count`` tasks where ``common`` matches all, ``tenth`` every tenth, ``only-old`` one
    of the oldest; some received/started times are missing (NULLs sort at one end)."""
    rows = {}
    for i in range(count):
        uuid = f"w{i:05}"
        tags = ["common", *(["tenth"] if i % 10 == 3 else []), *(["only-old"] if i == 2 else [])]
        rows[uuid] = {
            "uuid": uuid,
            "name": ("tasks.add", "tasks.mul", "tasks.div")[i % 3],
            "state": "FAILURE" if i % 7 == 0 else "SUCCESS",
            "worker": f"w{i % 2}@host",
            "args": f"({i}, {' '.join(tags)!r})",
            "kwargs": f"{{'n': {i % 4}}}",
            "timestamp": 1_000.0 + i // 2,  # ties: uuid breaks them
            "received": None if i % 11 == 0 else 900.0 + (i * 7919) % count,
            "started": None if i % 13 == 0 else 950.0 + i,
        }
    return rows


WALK_QUERIES = ["common", "tenth", "only-old", "nothing-matches", "tenth OR only-old"]
WALK_QUERIES += ["kwargs:n=1", "state:failure tenth", "name:mul"]
WALK_PAGES: list[dict[str, Any]] = [
    {},
    {"offset": 120},
    {"state": "FAILURE"},
    {"taskname": "tasks.mul", "workername": "w1@host"},
    {"sort_by": "received"},
    {"sort_by": "received", "descending": True, "offset": 40},
    {"sort_by": "started", "descending": True},
    {"sort_by": "timestamp", "received_start": 1_500.0},
]


@pg_only
def test_postgres_search_walk_gives_the_exact_plans_page(pg_url: str) -> None:
    from stamen.store.postgres import PostgresReader, PostgresWriter

    rows = _walk_history(3000)
    writer = PostgresWriter(pg_url, max_tasks=10_000)
    writer.write(Batch(tasks=rows, new_tasks=len(rows)))
    writer.close()
    reader = PostgresReader(pg_url)
    walked = 0
    for text in WALK_QUERIES:
        for page in WALK_PAGES:
            query = TaskQuery(search=parse_query(text), limit=50, **page)
            exact = reader.exact_page(query)
            with reader.connection():
                walk = reader._walk(query)
            if walk is not None:
                walked += 1
                assert walk == exact, (text, page)
            assert reader.list_tasks(query) == exact, (text, page)
    assert walked >= len(WALK_PAGES) * 3
    # A broad term is found by walking; one that matches no recent task hands over.
    with reader.connection():
        assert reader._walk(TaskQuery(search=parse_query("common"), limit=100)) is not None
        assert reader._walk(TaskQuery(search=parse_query("kwargs:n=1"), limit=100)) is not None
        assert reader._walk(TaskQuery(search=parse_query("only-old"), limit=100)) is None
    assert uuids(reader, search="only-old", limit=100) == ["w00002"]
