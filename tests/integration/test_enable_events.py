"""A worker started without ``-E`` is switched on by Stamen's periodic ``enable_events``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import Cluster, start_worker, wait_until

pytestmark = pytest.mark.integration


def test_worker_without_events_gets_them_enabled(redis_cluster: Cluster, logs_dir: Path) -> None:
    queue = f"quiet-{uuid.uuid4().hex[:6]}"
    env = dict(redis_cluster.env)
    env["STAMEN_TEST_QUEUE"] = queue
    # Celery's config would otherwise turn events on for the worker from the start.
    env["STAMEN_TEST_NO_EVENTS"] = "1"
    worker = start_worker(
        env, f"quiet-{os.getpid()}@localhost", queue, logs_dir / "worker-quiet.log", events=False
    )
    sent: list[str] = []

    def a_task_is_seen() -> dict[str, object] | None:
        # Tasks run before events are switched on leave no trace; keep sending until one
        # run after Stamen's broadcast shows up.
        sent.append(redis_cluster.client.send_task("itest.add", args=(5, 5), queue=queue).id)
        for task_id in sent:
            task = redis_cluster.task(task_id)
            if task and task["state"] == "SUCCESS":
                return task
        return None

    try:
        task = wait_until(a_task_is_seen, timeout=45, interval=1.0, what="events enabled")
        assert task["worker"] == worker.hostname
    finally:
        worker.stop()
