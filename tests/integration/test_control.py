"""Flower's control and execution API against real workers, checked by its effects.

Pool changes, revoke with terminate, time and rate limits and shutdown run on prefork
workers of this module's own (the shared session worker uses threads and must survive for
other tests); task execution and plain revoke use the session worker. Every wait polls with a
deadline.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Cluster, Worker, start_worker, wait_until

pytestmark = pytest.mark.integration


@dataclass
class OwnWorker:
    worker: Worker
    queue: str

    @property
    def name(self) -> str:
        return self.worker.hostname


def _post(cluster: Cluster, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{cluster.stamen.url}{path}", timeout=30, **kwargs)


def _send(cluster: Cluster, queue: str, name: str, *args: Any) -> str:
    return str(cluster.client.send_task(name, args=args, queue=queue).id)


def _stats(cluster: Cluster, host: str) -> dict[str, Any]:
    reply = cluster.client.control.inspect(destination=[host], timeout=1.0).stats() or {}
    return reply.get(host) or {}


def _processes(cluster: Cluster, host: str) -> list[int]:
    return list(_stats(cluster, host).get("pool", {}).get("processes") or [])


def _start(cluster: Cluster, logs: Path, label: str, *args: str, **env: str) -> OwnWorker:
    run = uuid.uuid4().hex[:8]
    queue = f"{cluster.queue}-{label}-{run}"
    worker = start_worker(
        {**cluster.env, **env},
        f"itest-{label}-{run}@localhost",
        queue,
        logs / f"worker-{label}-{run}.log",
        *args,
    )
    return OwnWorker(worker, queue)


@pytest.fixture(scope="module")
def prefork(redis_cluster: Cluster, logs_dir: Path) -> Iterator[tuple[OwnWorker, OwnWorker]]:
    """Two prefork workers: one with pool restarts enabled, one autoscaling."""
    pool = _start(
        redis_cluster, logs_dir, "pool", "-P", "prefork", "-c", "1", STAMEN_TEST_POOL_RESTARTS="1"
    )
    scaled = _start(redis_cluster, logs_dir, "scaled", "-P", "prefork", "--autoscale=2,1")
    try:
        for own in (pool, scaled):
            wait_until(
                lambda own=own: redis_cluster.client.control.ping(
                    destination=[own.name], timeout=0.5
                ),
                timeout=60,
                what=f"{own.name} to answer",
            )
        yield pool, scaled
    finally:
        pool.worker.stop()
        scaled.worker.stop()


def test_pool_grow_shrink_and_restart(
    redis_cluster: Cluster, prefork: tuple[OwnWorker, OwnWorker]
) -> None:
    pool, _ = prefork
    c, w = redis_cluster, pool.name
    assert len(wait_until(lambda: _processes(c, w), what="pool stats")) == 1

    grown = _post(c, f"/api/worker/pool/grow/{w}", data={"n": "1"})
    assert grown.status_code == 200, grown.text
    assert grown.json() == {"message": f"Growing '{w}' worker's pool by 1"}
    wait_until(lambda: len(_processes(c, w)) == 2, what="pool to grow")

    shrunk = _post(c, f"/api/worker/pool/shrink/{w}")
    assert shrunk.json() == {"message": f"Shrinking '{w}' worker's pool by 1"}
    wait_until(lambda: len(_processes(c, w)) == 1, what="pool to shrink")

    before = set(_processes(c, w))
    restarted = _post(c, f"/api/worker/pool/restart/{w}")
    assert restarted.json() == {"message": f"Restarting '{w}' worker's pool"}
    wait_until(
        lambda: (now := set(_processes(c, w))) and not now & before, what="new pool processes"
    )


def test_revoke_with_terminate_ends_a_running_task(
    redis_cluster: Cluster, prefork: tuple[OwnWorker, OwnWorker]
) -> None:
    pool, _ = prefork
    c = redis_cluster
    task_id = _send(c, pool.queue, "itest.sleep", 60)
    c.wait_state(task_id, "STARTED")
    revoked = _post(c, f"/api/task/revoke/{task_id}", params={"terminate": "true"})
    assert revoked.json() == {"message": f"Revoked '{task_id}'"}
    c.wait_state(task_id, "REVOKED", timeout=15)

    def idle() -> bool:
        active = c.client.control.inspect(destination=[pool.name], timeout=1.0).active() or {}
        return pool.name in active and not active[pool.name]

    wait_until(idle, timeout=15, what="the sleeping task to end")


def test_time_limit_applies(redis_cluster: Cluster, prefork: tuple[OwnWorker, OwnWorker]) -> None:
    pool, _ = prefork
    c, w = redis_cluster, pool.name
    answer = _post(c, "/api/task/timeout/itest.sleep", data={"workername": w, "hard": "1"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"message": "time limits set successfully"}
    # Celery's worker reads time limits when it builds its task strategies, which a pool
    # restart does again: without one the new limit would only reach new workers.
    before = set(_processes(c, w))
    assert _post(c, f"/api/worker/pool/restart/{w}").status_code == 200
    wait_until(lambda: (now := set(_processes(c, w))) and not now & before, what="new pool")
    task_id = _send(c, pool.queue, "itest.sleep", 30)
    # A 30 s task that fails well before 30 s: the hard limit killed it.
    failed = c.wait_state(task_id, "FAILURE", timeout=20)
    assert failed["timestamp"] - failed["received"] < 20


def test_rate_limit_applies(redis_cluster: Cluster, prefork: tuple[OwnWorker, OwnWorker]) -> None:
    pool, _ = prefork
    c, w = redis_cluster, pool.name
    bad = _post(c, "/api/task/rate-limit/itest.add", params={"workername": w, "ratelimit": "fast"})
    assert bad.status_code == 403
    assert bad.text.startswith("Failed to set rate limit: 'Invalid rate limit string")

    answer = _post(c, "/api/task/rate-limit/itest.add", data={"workername": w, "ratelimit": "30/m"})
    assert answer.json() == {"message": "new rate limit set successfully"}
    ids = [_send(c, pool.queue, "itest.add", i, i) for i in range(4)]
    started = sorted(c.wait_state(i, "SUCCESS", timeout=30)["started"] for i in ids)
    # 30/m is a token every 2 s (Celery may let two through at once at the start): four
    # tasks that would otherwise all start within a second take at least 4 s.
    assert started[-1] - started[0] >= 3.5, started


def test_autoscale_and_refusals(
    redis_cluster: Cluster, prefork: tuple[OwnWorker, OwnWorker]
) -> None:
    pool, scaled = prefork
    c = redis_cluster
    answer = _post(c, f"/api/worker/pool/autoscale/{scaled.name}", data={"min": "1", "max": "3"})
    assert answer.json() == {"message": f"Autoscaling '{scaled.name}' worker (min=1, max=3)"}
    wait_until(
        lambda: _stats(c, scaled.name).get("autoscaler", {}).get("max") == 3,
        what="autoscaler max to change",
    )
    # Refusals carry the worker's reason, as Flower's 403s do.
    refused = _post(c, f"/api/worker/pool/autoscale/{pool.name}", params={"min": 1, "max": 2})
    assert refused.status_code == 403
    assert refused.text == (
        f"Failed to autoscale '{pool.name}' worker: ValueError('Autoscale not enabled')"
    )
    no_restart = _post(c, f"/api/worker/pool/restart/{scaled.name}")
    assert no_restart.status_code == 403
    assert no_restart.text == (
        f"Failed to restart the '{scaled.name}' pool: ValueError('Pool restarts not enabled')"
    )
    no_grow = _post(c, f"/api/worker/pool/grow/{scaled.name}")
    assert no_grow.status_code == 403
    assert no_grow.text.startswith(f"Failed to grow '{scaled.name}' worker's pool: pool_grow")


def test_shutdown_stops_the_worker(
    redis_cluster: Cluster, prefork: tuple[OwnWorker, OwnWorker]
) -> None:
    _, scaled = prefork
    answer = _post(redis_cluster, f"/api/worker/shutdown/{scaled.name}")
    assert answer.json() == {"message": "Shutting down!"}
    wait_until(lambda: scaled.worker.proc.poll() is not None, timeout=30, what="worker exit")
    audit = redis_cluster.stamen.get(f"/api/audit?target={scaled.name}").json()["entries"]
    assert audit[0]["action"] == "worker.shutdown"
    assert audit[0]["outcome"] == "ok"


def test_unknown_worker_is_404(redis_cluster: Cluster) -> None:
    answer = _post(redis_cluster, "/api/worker/pool/grow/nobody@nowhere")
    assert (answer.status_code, answer.text) == (404, "Unknown worker 'nobody@nowhere'")


# --- execution on the shared worker -----------------------------------------------------------


def test_apply_waits_for_the_result(redis_cluster: Cluster) -> None:
    answer = _post(redis_cluster, "/api/task/apply/itest.add", json={"args": [2, 3]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["state"], body["result"]) == ("SUCCESS", 5)
    failed = _post(redis_cluster, "/api/task/apply/itest.fail", json={"args": ["boom"]}).json()
    assert failed["state"] == "FAILURE"
    assert "KeyError" in failed["traceback"]
    quick = _post(redis_cluster, "/api/task/apply/itest.sleep", json={"args": [5], "timeout": 0.2})
    assert set(quick.json()) == {"task-id", "state"}


def test_async_apply_and_send_task_publish(redis_cluster: Cluster) -> None:
    c = redis_cluster
    sent = _post(c, "/api/task/async-apply/itest.add", json={"args": [1, 1], "countdown": "0"})
    # The state as the backend has it when the answer is made: a quick worker may be done.
    assert sent.json()["state"] in {"PENDING", "STARTED", "SUCCESS"}
    c.wait_state(sent.json()["task-id"], "SUCCESS")
    by_name = _post(c, "/api/task/send-task/itest.echo", json={"args": ["abcd"]})
    assert set(by_name.json()) == {"task-id", "state"}
    assert c.wait_state(by_name.json()["task-id"], "SUCCESS")["result"] == "4"
    unknown = _post(c, "/api/task/async-apply/itest.nope", json={})
    assert (unknown.status_code, unknown.text) == (404, "Unknown task 'itest.nope'")


def test_abort_and_revoke(redis_cluster: Cluster) -> None:
    c = redis_cluster
    running = _post(c, "/api/task/async-apply/itest.abortable", json={"args": [30]}).json()
    task_id = running["task-id"]
    c.wait_state(task_id, "STARTED")
    aborted = _post(c, f"/api/task/abort/{task_id}")
    assert aborted.json() == {"message": f"Aborted '{task_id}'"}
    assert c.wait_state(task_id, "SUCCESS", timeout=15)["result"] == "'aborted'"

    # Revoked before it is delivered: the worker discards it on arrival.
    ahead = str(uuid.uuid4())
    assert _post(c, f"/api/task/revoke/{ahead}").json() == {"message": f"Revoked '{ahead}'"}
    c.client.send_task("itest.add", args=(1, 2), queue=c.queue, task_id=ahead)
    c.wait_state(ahead, "REVOKED")
