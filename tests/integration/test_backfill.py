"""Backfill: tasks that end while no Stamen listens get their end from the result backend.

Each test runs its own redis-server (broker on db 0, result backend on db 1), a real worker
and Stamen processes on one persistent history file. Stamen is stopped while tasks run,
the tasks end unheard (Redis events are fan-out), and a restarted Stamen must fill in how
they ended, marked as backfilled.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from stamen.events.backfill import Backfiller
from stamen.events.ingest import Ingester
from tests.integration import pgutil
from tests.integration.conftest import (
    StamenProcess,
    Worker,
    cluster_env,
    make_client,
    start_worker,
    wait_until,
)
from tests.integration.servers import RedisServer, start_redis

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    env: dict[str, str]
    queue: str
    worker: Worker
    client: Celery
    db: Path | str  # a SQLite file or a postgresql:// URL
    logs: Path

    def stamen(self, name: str, *extra: str) -> StamenProcess:
        args = ["-A", "tests.integration.celeryapp", "--persistent=True", f"--db={self.db}"]
        process = StamenProcess([*args, "--enable_events=False", *extra], self.env)
        process.start(self.logs / f"stamen-backfill-{name}.log")
        wait_until(
            lambda: process.get("/api/workers?status=1").json().get(self.worker.hostname),
            timeout=60,
            what=f"{self.worker.hostname} online in stamen",
        )
        return process

    def send(self, name: str, *args: Any, **options: Any) -> str:
        result = self.client.send_task(name, args=args, queue=self.queue, **options)
        return str(result.id)


def task(stamen: StamenProcess, task_id: str) -> dict[str, Any] | None:
    response = stamen.get(f"/api/task/info/{task_id}")
    return response.json() if response.status_code == 200 else None


def wait_state(stamen: StamenProcess, task_id: str, state: str, timeout: float = 30) -> dict:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (t := task(stamen, task_id)) and t["state"] == state and t,
        timeout=timeout,
        what=f"task {task_id} to reach {state}",
    )


def make_setup(tmp_path: Path, logs_dir: Path, backend: str | None) -> Iterator[Setup]:
    server: RedisServer = start_redis(tmp_path)
    broker = server.url
    backend_url = f"redis://127.0.0.1:{server.port}/1" if backend == "redis" else ""
    queue = f"itest-backfill-{uuid.uuid4().hex[:8]}"
    env = cluster_env(broker, backend_url, queue)
    hostname = f"itest-backfill-{uuid.uuid4().hex[:6]}@localhost"
    worker = start_worker(env, hostname, queue, logs_dir / f"worker-{hostname}.log")
    client = make_client(broker, backend_url or None)  # type: ignore[arg-type]
    try:
        yield Setup(env, queue, worker, client, tmp_path / "history.sqlite3", logs_dir)
    finally:
        worker.stop()
        client.close()
        server.stop()


@pytest.fixture
def with_backend(tmp_path: Path, logs_dir: Path) -> Iterator[Setup]:
    yield from make_setup(tmp_path, logs_dir, "redis")


@pytest.fixture
def without_backend(tmp_path: Path, logs_dir: Path) -> Iterator[Setup]:
    yield from make_setup(tmp_path, logs_dir, None)


def test_tasks_that_end_while_stamen_is_stopped_are_backfilled(with_backend: Setup) -> None:
    setup = with_backend
    first = setup.stamen("first")
    try:
        slow = setup.send("itest.sleep", 3.5)
        # Held by the worker until its countdown, then it fails: RECEIVED until then.
        failing = setup.send("itest.fail", "unheard", countdown=4)
        wait_state(first, slow, "STARTED")
        wait_state(first, failing, "RECEIVED")
    finally:
        first.stop()
    assert first.proc is not None and first.proc.returncode == 0

    # Both end while nobody listens; the backend has their results.
    assert setup.client.AsyncResult(slow).get(timeout=30) == 3.5
    with pytest.raises(KeyError):
        setup.client.AsyncResult(failing).get(timeout=30)

    second = setup.stamen("second", "--backfill_interval=1")
    try:
        # A result under 10 s old waits one more pass (the worker's own event may be on
        # its way), so this takes up to about 10 s after the task ended.
        ran = wait_state(second, slow, "SUCCESS", timeout=40)
        assert ran["result"] == "3.5"
        assert ran["worker"] == setup.worker.hostname
        assert ran["name"] == "itest.sleep"
        assert ran["succeeded"] is not None and ran["timestamp"] == ran["succeeded"]
        assert 3.0 < ran["runtime"] < 10
        assert ran.get("backfilled") is True, "the store marks backfilled tasks"

        failed = wait_state(second, failing, "FAILURE", timeout=40)
        assert failed["exception"] == "KeyError('unheard')"
        assert "Traceback" in failed["traceback"] and "KeyError" in failed["traceback"]
        assert failed.get("backfilled") is True

        page = second.get(f"/task/{slow}")
        assert page.status_code == 200 and 'class="badge backfilled"' in page.text

        # A task heard end to end while Stamen listens is not marked.
        heard = setup.send("itest.add", 2, 3)
        done = wait_state(second, heard, "SUCCESS")
        assert done["result"] == "5" and "backfilled" not in done
    finally:
        second.stop()
    assert "Backfill: " in second.log()
    assert "Traceback" not in second.log()


_LEADER = re.compile(r"^stamen_ingest_leader (\S+)$", re.MULTILINE)


def leading(stamen: StamenProcess) -> bool:
    found = _LEADER.search(stamen.get("/metrics").text)
    assert found is not None, "no stamen_ingest_leader gauge on /metrics"
    return float(found.group(1)) == 1.0


def test_on_postgresql_only_the_ingesting_instance_backfills(with_backend: Setup) -> None:
    with pgutil.temp_schema() as url:
        setup = replace(with_backend, db=url)
        first = setup.stamen("pg-first")
        try:
            slow = setup.send("itest.sleep", 2.5)
            wait_state(first, slow, "STARTED")
        finally:
            first.stop()
        assert setup.client.AsyncResult(slow).get(timeout=30) == 2.5

        one = setup.stamen("pg-one", "--backfill_interval=1")
        other = setup.stamen("pg-other", "--backfill_interval=1")
        try:
            ran = wait_state(other, slow, "SUCCESS", timeout=40)
            assert ran["result"] == "2.5" and ran.get("backfilled") is True
            leader, standby = (one, other) if leading(one) else (other, one)
            assert not leading(standby)
        finally:
            one.stop()
            other.stop()
        assert "Backfill: 1 task(s) filled in" in leader.log()
        assert "Backfill" not in standby.log()


def test_without_a_result_backend_backfill_stays_silent(without_backend: Setup) -> None:
    setup = without_backend
    first = setup.stamen("nobackend-first")
    try:
        slow = setup.send("itest.sleep", 1.5)
        wait_state(first, slow, "STARTED")
    finally:
        first.stop()
    worker_log = Path(setup.logs / f"worker-{setup.worker.hostname}.log")
    wait_until(
        lambda: f"Task itest.sleep[{slow}] succeeded" in worker_log.read_text(),
        what="the task to end in the worker",
    )

    second = setup.stamen("nobackend-second", "--backfill_interval=0.5")
    try:
        # Observing an absence: give backfill several intervals to (not) act.
        time.sleep(3)
        assert task(second, slow)["state"] == "STARTED"  # type: ignore[index]
    finally:
        second.stop()
    log = second.log()
    assert "backfill" not in log.lower()
    assert "WARNING" not in log and "Traceback" not in log


def test_a_pass_over_a_postgresql_history() -> None:
    """The selection queries (by state, oldest first) and the mark work on PostgreSQL too."""
    from stamen.store.postgres import PostgresReader, PostgresWriter

    app = Celery("pg-backfill", broker="memory://", backend="cache+memory://")
    at = time.time() - 300
    with pgutil.temp_schema() as url:
        writer, reader = PostgresWriter(url, max_tasks=1000), PostgresReader(url)
        try:
            ingester = Ingester(writer)
            for n, uuid_ in enumerate(("pg-ran", "pg-waits")):
                for i, kind in enumerate(("received", "started")):
                    ingester.add(
                        {
                            "type": f"task-{kind}",
                            "uuid": uuid_,
                            "hostname": "w@h",
                            "timestamp": at + n + i,
                            "local_received": at + n + i,
                            "name": "tasks.add",
                        }
                    )
            ingester.flush()
            app.backend.store_result("pg-ran", [1, 2], "SUCCESS")
            runner = Backfiller(app, reader, ingester, 60.0, clock=lambda: time.time() + 60)
            done = runner.run_pass()
            ingester.flush()
            assert (done.looked_up, done.backfilled) == (2, 1)
            ran = reader.get_task("pg-ran")
            assert ran is not None and ran["state"] == "SUCCESS" and ran["result"] == "[1, 2]"
            assert ran.get("backfilled") is True
            waits = reader.get_task("pg-waits")
            assert waits is not None and waits["state"] == "STARTED"
        finally:
            writer.close()
            reader.close()  # the schema is dropped next
