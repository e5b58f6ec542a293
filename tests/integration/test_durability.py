"""History survives restarts and crashes; a broker that goes away is survived.

Each test starts its own Stamen (and, for the outage, its own redis-server on a free port)
so stopping or killing things never touches the shared services or the shared cluster.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import redis
from celery.result import AsyncResult

from tests.integration.conftest import (
    Cluster,
    StamenProcess,
    cluster_env,
    make_client,
    start_worker,
    wait_until,
)
from tests.integration.servers import free_port


def start_redis_on(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A throw-away redis-server on a fixed port, so it can come back where it was."""
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: redis.Redis(port=port, socket_timeout=1).ping(), what="redis-server up")
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(15)


pytestmark = pytest.mark.integration


def _persistent(cluster: Cluster, db: Path, *extra: str) -> StamenProcess:
    return StamenProcess(
        ["-A", "tests.integration.celeryapp", "--persistent=True", f"--db={db}", *extra],
        cluster.env,
    )


def _all_succeeded(stamen: StamenProcess, ids: list[str]) -> bool:
    for task_id in ids:
        response = stamen.get(f"/api/task/info/{task_id}")
        if response.status_code != 200 or response.json()["state"] != "SUCCESS":
            return False
    return True


def test_sigterm_commits_everything_received(
    redis_cluster: Cluster, tmp_path: Path, logs_dir: Path
) -> None:
    db = tmp_path / "history.sqlite3"
    # A commit interval far longer than the test: only the flush on stop can save the events.
    stamen = _persistent(redis_cluster, db, "--commit_interval=600").start(
        logs_dir / "stamen-sigterm.log"
    )
    try:
        ids = [redis_cluster.send("itest.add", i, i) for i in range(25)]
        for task_id in ids:
            AsyncResult(task_id, app=redis_cluster.client).get(timeout=30)
        # Once the shared Stamen has stored them, the events were published and ours,
        # subscribed to the same channel, has received them too.
        wait_until(lambda: _all_succeeded(redis_cluster.stamen, ids), what="events published")
    finally:
        assert stamen.stop(signal.SIGTERM) == 0
    restarted = _persistent(redis_cluster, db).start(logs_dir / "stamen-sigterm-2.log")
    try:
        # Events of the last tasks may still have been in flight at SIGTERM; everything
        # Stamen had received by then must be there, and the results were all sent first.
        assert _all_succeeded(restarted, ids), restarted.log()
        body = restarted.get("/api/tasks", params={"taskname": "itest.add", "limit": 1000}).json()
        assert set(ids) <= set(body)
    finally:
        restarted.stop()


def test_sigkill_keeps_what_was_committed(
    redis_cluster: Cluster, tmp_path: Path, logs_dir: Path
) -> None:
    db = tmp_path / "history.sqlite3"
    stamen = _persistent(redis_cluster, db).start(logs_dir / "stamen-sigkill.log")
    ids = [redis_cluster.send("itest.add", i, 1) for i in range(10)]
    wait_until(lambda: _all_succeeded(stamen, ids), what="tasks stored")  # read back = committed
    stamen.stop(signal.SIGKILL)
    restarted = _persistent(redis_cluster, db).start(logs_dir / "stamen-sigkill-2.log")
    try:
        assert _all_succeeded(restarted, ids)
        assert restarted.get("/api/task/types").json()["task-types"]
    finally:
        restarted.stop()


def test_broker_down_at_start_and_mid_run(tmp_path: Path, logs_dir: Path) -> None:
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = cluster_env(broker, broker.replace("/0", "/1"), "outage")
    stamen = StamenProcess(["-A", "tests.integration.celeryapp"], env).start(
        logs_dir / "stamen-outage.log"
    )
    server = worker = None
    try:
        health = wait_until(
            lambda: (r := stamen.get("/healthcheck")).status_code == 503 and r,
            what="healthcheck to report the broker",
        )
        assert "broker unreachable" in health.text

        server = start_redis_on(port, tmp_path)
        wait_until(
            lambda: stamen.get("/healthcheck").status_code == 200,
            timeout=45,
            what="reconnect after the broker came up",
        )
        worker = start_worker(env, "outage@localhost", "outage", logs_dir / "worker-outage.log")
        client = make_client(broker, broker.replace("/0", "/1"))
        first = client.send_task("itest.add", args=(1, 2), queue="outage").id
        wait_until(lambda: _all_succeeded(stamen, [first]), timeout=45, what="first task")

        stop_process(server)
        wait_until(
            lambda: stamen.get("/healthcheck").status_code == 503, timeout=20, what="outage noticed"
        )
        server = start_redis_on(port, tmp_path)
        wait_until(
            lambda: stamen.get("/healthcheck").status_code == 200,
            timeout=45,
            what="reconnect after the outage",
        )
        second = client.send_task("itest.add", args=(3, 4), queue="outage").id
        wait_until(lambda: _all_succeeded(stamen, [second]), timeout=60, what="second task")
        client.close()
    finally:
        if worker is not None:
            worker.stop()
        stamen.stop()
        if server is not None:
            stop_process(server)
    log = stamen.log()
    # One line per outage (two outages: at start and mid-run), not one per retry.
    assert log.count("Cannot receive events from the broker") == 2, log


def _succeeded_count(stamen: StamenProcess, hostname: str) -> int:
    """The worker's ``task-succeeded`` event counter, as ``/workers?json=1`` has it."""
    records = {w["hostname"]: w for w in stamen.get("/workers?json=1").json()["data"]}
    return int(records.get(hostname, {}).get("task-succeeded") or 0)


def test_a_second_instance_on_one_file_stands_by_and_takes_over(
    redis_cluster: Cluster, tmp_path: Path, logs_dir: Path
) -> None:
    """Two instances kept on one SQLite file: one ingests, so no event is stored twice;
    the other serves reads and takes over when the first is killed."""
    db = tmp_path / "shared.sqlite3"
    hostname = redis_cluster.worker.hostname
    first = _persistent(redis_cluster, db).start(logs_dir / "stamen-shared-1.log")
    second: StamenProcess | None = None
    try:
        wait_until(lambda: "now ingests" in first.log(), what="the first instance to ingest")
        second = _persistent(redis_cluster, db).start(logs_dir / "stamen-shared-2.log")
        wait_until(lambda: "Another instance ingests" in second.log(), what="a standby")
        wait_until(lambda: first.get("/api/workers?status=1").json().get(hostname), timeout=60)
        before = _succeeded_count(first, hostname)
        ids = [redis_cluster.send("itest.add", i, 1) for i in range(3)]
        wait_until(lambda: _all_succeeded(second, ids), what="the standby to read them")
        assert _succeeded_count(second, hostname) == before + 3  # stored once, not twice

        assert first.proc is not None
        first.proc.kill()
        wait_until(lambda: "now ingests" in second.log(), what="the standby to take over")
        # Events flow once its broker subscription is up: a task sent before could end unheard.
        wait_until(lambda: "receiving events" in second.log(), what="the new ingester subscribed")
        after = redis_cluster.send("itest.add", 5, 5)
        wait_until(lambda: _all_succeeded(second, [after]), what="the new ingester to store")
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0, second.log()
