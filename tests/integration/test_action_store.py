"""The action store (audit log, retry links, paused queues) behaves alike on both backends,
and on PostgreSQL two instances on one schema share it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stamen.audit import ActionStore, SqliteActionStore, open_action_store
from stamen.store.manage import upgrade
from tests.integration import pgutil

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ActionStore]:
    if request.param == "sqlite":
        path = tmp_path / "h.sqlite3"
        upgrade(str(path))
        yield SqliteActionStore(path)
        return
    with pgutil.temp_schema() as url:
        actions = open_action_store(url, tmp_path / "unused.sqlite3")
        try:
            yield actions
        finally:
            actions.close()


def test_audit_log_filters_pages_and_truncates(store: ActionStore) -> None:
    first = store.record(user="ann", action="task.revoke", target="t1", params={"a": 1}, status=200)
    store.record(user="bob", action="queue.pause", target="q", params=None, status=403)
    store.record(
        user="ann", action="task.revoke", target="t2", params={"big": "x" * 20000},
        status=502, message="m" * 5000,
    )  # fmt: skip
    entries = store.entries()
    assert [e["target"] for e in entries] == ["t2", "q", "t1"]
    assert entries[2]["id"] == first
    assert entries[2]["params"] == {"a": 1} and entries[2]["outcome"] == "ok"
    assert entries[1]["outcome"] == "refused" and entries[1]["user"] == "bob"
    assert entries[0]["outcome"] == "error"
    assert isinstance(entries[0]["params"], str)  # truncated JSON comes back raw
    assert len(entries[0]["message"]) == 2000
    assert [e["target"] for e in store.entries(user="ann")] == ["t2", "t1"]
    assert [e["target"] for e in store.entries(action="task.revoke", limit=1, offset=1)] == ["t1"]
    assert store.entries(target="q", action="queue.pause")[0]["status"] == 403
    assert store.entries(offset=2**70) == []


def test_retry_links(store: ActionStore) -> None:
    assert store.retry_links("a") == {"retry_of": None, "retried_as": []}
    store.link_retry("b", "a")
    store.link_retry("c", "a")
    store.link_retry("d", "b")
    assert store.retry_links("a") == {"retry_of": None, "retried_as": ["b", "c"]}
    assert store.retry_links("b") == {"retry_of": "a", "retried_as": ["d"]}


def test_paused_queues(store: ActionStore) -> None:
    assert store.resume("q") is None
    store.pause("q", "ann", ["w2", "w1"])
    store.pause("q", "bob", ["w3", "w1"])
    store.add_paused_worker("q", "w4")
    store.add_paused_worker("nope", "w4")
    paused = store.paused()
    assert list(paused) == ["q"]
    assert paused["q"]["paused_by"] == "bob"
    assert paused["q"]["workers"] == ["w1", "w2", "w3", "w4"]
    assert store.resume("q") == ["w1", "w2", "w3", "w4"]
    assert store.paused() == {}


def test_two_postgres_instances_share_actions(tmp_path: Path) -> None:
    with pgutil.temp_schema() as url:
        a = open_action_store(url, tmp_path / "a.sqlite3")
        b = open_action_store(url, tmp_path / "b.sqlite3")
        try:
            # Concurrent pauses of one queue from both instances merge their worker lists.
            threads = [
                threading.Thread(target=s.pause, args=("q", name, [f"{name}-{i}"]))
                for i in range(10)
                for name, s in (("a", a), ("b", b))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert len(b.paused()["q"]["workers"]) == 20
            a.record(user="ann", action="task.revoke", target="t1", params={}, status=200)
            a.link_retry("t2", "t1")
            assert b.entries()[0]["target"] == "t1"
            assert b.retry_links("t1")["retried_as"] == ["t2"]
            assert b.resume("q") is not None
            assert a.paused() == {}
        finally:
            a.close()
            b.close()


def test_a_dropped_connection_is_replaced(tmp_path: Path) -> None:
    import psycopg

    from stamen.audit_pg import PostgresActionStore

    with pgutil.temp_schema() as url:
        store = PostgresActionStore(url)
        try:
            store.record(user="ann", action="x", target=None, params={}, status=200)
            assert store._conn is not None
            pid = store._conn.info.backend_pid
            with psycopg.connect(pgutil.SERVER, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            store.record(user="ann", action="y", target=None, params={}, status=200)
            assert [e["action"] for e in store.entries()] == ["y", "x"]
        finally:
            store.close()
