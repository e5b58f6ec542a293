"""The PostgreSQL reader's connections: bounded however many threads ask, and replaced
when the server drops one."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from celery import Celery

from stamen.config.settings import Settings
from stamen.services import Services
from stamen.store.manage import open_store
from stamen.store.postgres import PostgresReader, PostgresWriter
from stamen.store.reader import TaskQuery
from stamen.store.sqlite import StoreError
from stamen.store.writer import Batch
from stamen.web.app import create_app
from tests.integration import pgutil

pytestmark = pytest.mark.integration

#: Marks this test's reader connections among every other client of the server.
APP = "stamen-pool-test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pgutil.temp_schema() as url:
        writer = PostgresWriter(url, max_tasks=100)
        rows = {
            f"t{i}": {"uuid": f"t{i}", "name": "tasks.x", "timestamp": float(i)} for i in range(50)
        }
        writer.write(Batch(tasks=rows, new_tasks=len(rows)))
        writer.close()
        yield f"{url}&application_name={APP}"


def _ours() -> list[int]:
    with psycopg.connect(pgutil.SERVER, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (APP,)
        ).fetchall()
    return [pid for (pid,) in rows]


def test_many_threads_share_a_bounded_number_of_connections(pg_url: str) -> None:
    reader = PostgresReader(pg_url, connections=3)
    peak = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len(_ours()))
            time.sleep(0.01)

    def read() -> None:
        try:
            for _ in range(20):
                assert len(reader.list_tasks(TaskQuery(limit=10))) == 10
                assert reader.get_task("t7") is not None
        except BaseException as exc:  # reported below, with the thread's own failure
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    readers = [threading.Thread(target=read) for _ in range(24)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
    stop.set()
    sampler.join()
    reader.close()
    assert errors == []
    assert 1 <= peak <= 3
    assert _ours() == []  # closing the reader closes its connections


def _drop_ours() -> None:
    with psycopg.connect(pgutil.SERVER, autocommit=True) as admin:
        for pid in _ours():
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_an_idle_connection_the_server_dropped_is_replaced_unnoticed(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stamen.store import postgres

    monkeypatch.setattr(postgres, "IDLE_CHECK", 0.0)  # every connection counts as idle
    reader = PostgresReader(pg_url, connections=2)
    try:
        assert reader.task_count() == 50
        _drop_ours()
        assert reader.task_count() == 50
    finally:
        reader.close()


def test_a_busy_connection_the_server_dropped_fails_one_call_only(pg_url: str) -> None:
    reader = PostgresReader(pg_url, connections=1)
    try:
        assert reader.task_count() == 50
        _drop_ours()  # used a moment ago, so not checked before the next call
        with pytest.raises(StoreError, match="PostgreSQL unavailable"):
            reader.task_count()
        assert reader.task_count() == 50
    finally:
        reader.close()


def test_db_pool_size_reaches_the_reader(pg_url: str) -> None:
    writer, reader = open_store(pg_url, pool_size=4, max_tasks=100)
    try:
        assert isinstance(reader, PostgresReader)
        assert reader._pool.max_size == 4
    finally:
        writer.close()
        reader.close()


def test_requests_answer_503_while_every_connection_is_busy(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from stamen.store import postgres

    monkeypatch.setattr(postgres, "POOL_TIMEOUT", 0.3)
    settings = dataclasses.replace(
        Settings(), db=pg_url, db_pool_size=1, enable_events=False, unauthenticated_api=True
    )
    services = Services(settings, Celery("pool", broker="memory://"), ingest=False)
    # The StoreError is answered where it is raised: nothing reaches the server (the test
    # client would re-raise it), so the log has one warning line, not a traceback.
    with TestClient(create_app(services)) as client:
        assert client.get("/api/tasks", params={"limit": 1}).status_code == 200
        reader = services.reader
        assert isinstance(reader, PostgresReader)
        with reader.connection():  # the only connection, held by this thread
            api = client.get("/api/tasks", params={"limit": 1})
            page = client.get("/failures")
        assert api.status_code == 503 and "unavailable" in api.text
        assert page.status_code == 503
        assert client.get("/api/tasks", params={"limit": 1}).status_code == 200
