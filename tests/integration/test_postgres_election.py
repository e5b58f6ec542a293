"""One ingester among several instances sharing a PostgreSQL database (advisory lock).

Writer-level: only one writer leads; the next takes over as soon as the leader's session
ends, resuming its sequence numbers and ids. Process-level: two ``stamen`` processes on
one schema; killing the ingesting one hands ingestion to the other within seconds, and
both serve the same history all along.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stamen.store.writer import Batch
from tests.integration import pgutil
from tests.integration.conftest import Cluster, StamenProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pgutil.temp_schema() as url:
        yield url


def one_task(uuid: str, ts: float) -> Batch:
    return Batch(tasks={uuid: {"uuid": uuid, "name": "tasks.x", "timestamp": ts}}, new_tasks=1)


def test_one_writer_leads_and_the_next_resumes(pg_url: str) -> None:
    from stamen.store.postgres import PostgresReader, PostgresWriter

    a = PostgresWriter(pg_url, max_tasks=100)
    b = PostgresWriter(pg_url, max_tasks=100)
    try:
        assert a.try_lead()
        assert not b.try_lead()
        assert a.try_lead()  # re-entrant for the holder
        a.write(one_task("t1", 1.0))
        a.write(one_task("t2", 2.0))
        a.close()  # the leader's session ends: the lock goes with it (a moment later)
        wait_until(b.try_lead, timeout=10, what="b to win the lock after a closed")
        assert (b.seq, b.task_count) == (2, 2)
        b.write(one_task("t3", 3.0))
        reader = PostgresReader(pg_url)
        assert reader.seq() == 3
        assert reader.task_count() == 3
        assert reader.get_task("t3") is not None
    finally:
        a.close()
        b.close()


def test_a_killed_session_loses_the_lead_and_can_win_it_back(pg_url: str) -> None:
    import psycopg

    from stamen.store.postgres import PostgresWriter

    a = PostgresWriter(pg_url, max_tasks=100)
    b = PostgresWriter(pg_url, max_tasks=100)
    try:
        assert a.try_lead()
        pid = a.conn.info.backend_pid
        with psycopg.connect(pgutil.SERVER, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            a.write(one_task("lost", 1.0))
        assert not a.still_leading()
        assert a.seq == 0  # the failed batch did not take a sequence number
        # The server releases a terminated session's lock a moment after it ends.
        wait_until(b.try_lead, timeout=10, what="b to win the lock a's dead session held")
        b.write(one_task("b1", 2.0))
        assert not a.try_lead()  # reconnects, but b holds the lock now
        b.close()
        wait_until(a.try_lead, timeout=10, what="a to win the lock back after b closed")
        assert a.seq == 1
        a.write(one_task("a1", 3.0))
        assert a.seq == 2
    finally:
        a.close()
        b.close()


def test_a_standby_process_takes_over_when_the_ingester_dies(
    redis_cluster: Cluster, logs_dir: Path, pg_url: str
) -> None:
    args = ["-A", "tests.integration.celeryapp", f"--db={pg_url}"]
    first = StamenProcess(args, redis_cluster.env).start(logs_dir / "stamen-pg-first.log")
    second: StamenProcess | None = None
    try:
        wait_until(lambda: "now ingests" in first.log(), timeout=30, what="first to lead")
        second = StamenProcess(args, redis_cluster.env).start(logs_dir / "stamen-pg-second.log")
        hostname = redis_cluster.worker.hostname

        def state_in(stamen: StamenProcess, task_id: str) -> str | None:
            task: dict[str, Any] = stamen.get(f"/api/task/info/{task_id}").json() or {}
            return task.get("state")

        wait_until(lambda: first.get("/api/workers?status=1").json().get(hostname), timeout=60)
        before = redis_cluster.send("itest.add", 20, 22)
        # The standby serves what the leader stored.
        wait_until(lambda: state_in(second, before) == "SUCCESS", timeout=60, what="standby read")
        assert "now ingests" not in second.log()

        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: "now ingests" in second.log(), timeout=30, what="takeover")
        takeover = time.monotonic() - killed
        # Leading is holding the lock; events flow once the broker subscription is up (a
        # task sent before that could end before anyone listens, and nobody would know it).
        wait_until(lambda: "receiving events" in second.log(), timeout=30, what="subscribed")
        after = redis_cluster.send("itest.add", 1, 1)
        wait_until(lambda: state_in(second, after) == "SUCCESS", timeout=60, what="new leader")
        assert takeover < 10, takeover
        print(f"takeover after SIGKILL: {takeover:.2f}s")  # noqa: T201 - the figure
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0, second.log()
