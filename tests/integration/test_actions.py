"""Stamen's own actions against the shared Redis cluster, checked by their effects.

Retry, bulk revoke/retry, purge and pause/resume, plus Flower's add/cancel-consumer, which
they lean on. Every queue here is new and unique, so the shared session worker only ever
consumes them for the length of one test and gives them up again at the end.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.integration.conftest import Cluster, start_worker, wait_until

pytestmark = pytest.mark.integration


def _post(cluster: Cluster, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{cluster.stamen.url}{path}", timeout=30, **kwargs)


def _matching(cluster: Cluster, search: str) -> dict[str, Any]:
    return cluster.stamen.get("/api/tasks", params={"search": search}).json()


def _consumes(cluster: Cluster, worker: str, queue: str) -> bool | None:
    """Whether ``worker`` consumes ``queue``; None when it did not answer."""
    reply = cluster.client.control.inspect(destination=[worker], timeout=1.0).active_queues()
    if not reply or worker not in reply:
        return None
    return any(q.get("name") == queue for q in reply[worker])


def _unique(cluster: Cluster, label: str) -> str:
    return f"{cluster.queue}-{label}-{uuid.uuid4().hex[:8]}"


def test_retry_sends_the_same_call_and_links_back(redis_cluster: Cluster) -> None:
    c = redis_cluster
    old = c.send("itest.fail", "retry-me")
    original = c.wait_state(old, "FAILURE")
    answer = _post(c, f"/api/task/retry/{old}")
    assert answer.status_code == 200, answer.text
    new = answer.json()["task-id"]
    assert answer.json()["retry-of"] == old
    again = c.wait_state(new, "FAILURE")
    for field in ("name", "args", "kwargs", "routing_key"):
        assert again[field] == original[field], field
    assert "retry-me" in again["exception"]
    assert c.stamen.get(f"/api/task/retries/{old}").json()["retried_as"] == [new]
    assert c.stamen.get(f"/api/task/retries/{new}").json()["retry_of"] == old


def test_retry_refuses_arguments_the_events_cut_short(redis_cluster: Cluster) -> None:
    """Celery keeps 1,024 characters of a call's repr in its events: such a task is refused
    (400), never re-sent with the shortened text or answered with a 500."""
    c = redis_cluster
    long_string = c.send("itest.echo", "m" * 3000)
    c.wait_state(long_string, "SUCCESS")
    past_the_cut = str(c.client.send_task("itest.echo", args=("x" * 5000, "y"), queue=c.queue).id)
    c.wait_state(past_the_cut, "FAILURE")  # echo takes one positional argument
    for task_id in (long_string, past_the_cut):
        answer = _post(c, f"/api/task/retry/{task_id}")
        assert answer.status_code == 400, answer.text
        assert "shortened in its events" in answer.text
    bulk = _post(c, "/api/tasks/bulk/retry", data={"search": long_string}).json()
    assert bulk["retried"] == {} and "shortened" in bulk["failed"][long_string]


def test_retry_takes_the_whole_call_from_an_extended_result_backend(
    redis_cluster: Cluster, logs_dir: Path
) -> None:
    c = redis_cluster
    queue = _unique(c, "extended")
    env = c.env | {"STAMEN_TEST_RESULT_EXTENDED": "1", "STAMEN_TEST_QUEUE": queue}
    worker = start_worker(env, f"extended-{queue}@localhost", queue, logs_dir / f"{queue}.log")
    try:
        old = str(c.client.send_task("itest.echo", args=("m" * 3000,), queue=queue).id)
        c.wait_state(old, "SUCCESS")
        answer = _post(c, f"/api/task/retry/{old}")
        assert answer.status_code == 200, answer.text
        new = answer.json()["task-id"]
        # echo returns the length of what it got: the whole string, not the events' repr.
        assert c.client.AsyncResult(new).get(timeout=30) == 3000
    finally:
        worker.stop()


def test_bulk_retry_dry_run_then_capped(redis_cluster: Cluster) -> None:
    c = redis_cluster
    marker = f"bulk{uuid.uuid4().hex[:10]}"
    ids = [c.send("itest.echo", "x", marker=marker) for _ in range(3)]
    for task_id in ids:
        c.wait_state(task_id, "SUCCESS")

    dry = _post(c, "/api/tasks/bulk/retry", data={"search": marker, "dry_run": "1"}).json()
    assert (dry["dry_run"], dry["matched"], dry["count"]) == (True, 3, 3)
    assert sorted(t["uuid"] for t in dry["sample"]) == sorted(ids)

    done = _post(c, "/api/tasks/bulk/retry", data={"search": marker, "limit": "2"}).json()
    assert (done["matched"], done["count"], done["failed"]) == (3, 2, {})
    assert set(done["retried"]) <= set(ids)

    def all_done() -> bool:
        tasks = _matching(c, marker)
        return len(tasks) == 5 and all(t["state"] == "SUCCESS" for t in tasks.values())

    wait_until(all_done, what="the retried tasks to run")
    # The capped request retried two, not three: the dry run sent nothing.
    assert len(_matching(c, marker)) == 5


def test_bulk_revoke_and_consumers(redis_cluster: Cluster) -> None:
    c, worker = redis_cluster, redis_cluster.worker.hostname
    queue = _unique(c, "revoke")
    marker = f"revoke{uuid.uuid4().hex[:10]}"
    ids = [
        str(
            c.client.send_task("itest.echo", args=("y",), kwargs={"marker": marker}, queue=queue).id
        )
        for _ in range(2)
    ]
    wait_until(lambda: len(_matching(c, marker)) == 2, what="the sent tasks to be known")
    dry = _post(c, "/api/tasks/bulk/revoke", params={"search": marker, "dry_run": "yes"}).json()
    assert dry["matched"] == 2
    revoked = _post(c, "/api/tasks/bulk/revoke", params={"search": marker}).json()
    assert sorted(revoked["task_ids"]) == sorted(ids)

    added = _post(c, f"/api/worker/queue/add-consumer/{worker}", data={"queue": queue})
    assert added.json() == {"message": f"add consumer {queue}"}
    try:
        # The worker now takes the queue's messages, and discards them as revoked.
        for task_id in ids:
            c.wait_state(task_id, "REVOKED")
    finally:
        cancelled = _post(c, f"/api/worker/queue/cancel-consumer/{worker}", data={"queue": queue})
    assert cancelled.json() == {"message": f"no longer consuming from {queue}"}
    wait_until(lambda: _consumes(c, worker, queue) is False, what="the consumer to go")


def test_purge_empties_the_queue(redis_cluster: Cluster) -> None:
    c = redis_cluster
    queue = _unique(c, "purge")
    for _ in range(3):
        c.client.send_task("itest.add", args=(1, 1), queue=queue)
    broker = redis.Redis.from_url(c.broker)
    try:
        wait_until(lambda: broker.llen(queue) == 3, what="messages in the queue")
        answer = _post(c, f"/api/queue/purge/{queue}")
        assert answer.json() == {"message": f"Purged 3 messages from '{queue}'", "purged": 3}
        assert broker.llen(queue) == 0
    finally:
        broker.delete(queue)
        broker.close()


def test_pause_applies_to_late_workers_and_resume_restores(
    redis_cluster: Cluster, logs_dir: Path
) -> None:
    c, worker = redis_cluster, redis_cluster.worker.hostname
    queue = _unique(c, "pause")
    assert _post(c, f"/api/worker/queue/add-consumer/{worker}", data={"queue": queue}).is_success
    late = None
    try:
        wait_until(lambda: _consumes(c, worker, queue), what="the worker to consume")
        paused = _post(c, f"/api/queue/pause/{queue}")
        assert paused.status_code == 200, paused.text
        assert paused.json()["workers"] == [worker]
        wait_until(lambda: _consumes(c, worker, queue) is False, what="the consumer to stop")

        # A worker that starts later, consuming the paused queue, is paused too.
        late_name = f"itest-late-{uuid.uuid4().hex[:8]}@localhost"
        late = start_worker(c.env, late_name, queue, logs_dir / f"worker-{late_name}.log")

        def late_paused() -> bool:
            info = c.stamen.get("/api/queues/paused").json()["paused"].get(queue, {})
            return late_name in info.get("workers", [])

        wait_until(late_paused, timeout=60, what="the late worker to be paused")
        wait_until(lambda: _consumes(c, late.hostname, queue) is False, what="late consumer off")

        task_id = str(c.client.send_task("itest.add", args=(2, 2), queue=queue).id)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # nobody takes it while paused
            assert (c.task(task_id) or {}).get("state") in (None, "PENDING")
            time.sleep(0.2)

        resumed = _post(c, f"/api/queue/resume/{queue}")
        assert sorted(resumed.json()["workers"]) == sorted([worker, late_name])
        c.wait_state(task_id, "SUCCESS")
        assert queue not in c.stamen.get("/api/queues/paused").json()["paused"]
        again = _post(c, f"/api/queue/resume/{queue}")
        assert (again.status_code, again.text) == (404, f"Queue '{queue}' is not paused")

        audit = c.stamen.get("/api/audit", params={"target": queue}).json()["entries"]
        assert [e["action"] for e in audit][:2] == ["queue.resume", "queue.resume"]
        assert "queue.pause" in [e["action"] for e in audit]
    finally:
        _post(c, f"/api/worker/queue/cancel-consumer/{worker}", data={"queue": queue})
        if late is not None:
            late.stop()


def test_purge_on_rabbitmq(rabbitmq_cluster: Cluster) -> None:
    c = rabbitmq_cluster
    queue = _unique(c, "purge")
    for _ in range(2):
        c.client.send_task("itest.add", args=(1, 1), queue=queue)

    def waiting() -> int:
        with c.client.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)

    try:
        wait_until(lambda: waiting() == 2, what="messages in the queue")
        answer = _post(c, f"/api/queue/purge/{queue}")
        assert answer.json() == {"message": f"Purged 2 messages from '{queue}'", "purged": 2}
        assert waiting() == 0
    finally:
        with c.client.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    missing = _post(c, f"/api/queue/purge/{queue}")
    assert (missing.status_code, missing.text) == (404, f"Unknown queue '{queue}'")
