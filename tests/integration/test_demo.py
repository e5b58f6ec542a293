"""``stamen demo``, the README's first command: a cluster that needs nothing else."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.integration.conftest import StamenProcess, wait_until


def test_the_demo_runs_a_worker_and_shows_its_tasks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CELERY_"))}
    demo = StamenProcess(["demo"], env).start(tmp_path / "demo.log")
    try:
        states: set[str] = set()
        tasks: dict[str, dict[str, str]] = {}

        def varied() -> bool:
            tasks.update(demo.get("/api/tasks", params={"limit": 200}).json())
            states.update(t["state"] for t in tasks.values())
            return {"SUCCESS", "FAILURE"} <= states

        wait_until(varied, timeout=60, what=f"succeeded and failed demo tasks (saw {states})")
        assert demo.get("/healthcheck").text == "OK"
        workers = demo.get("/workers", params={"json": 1}).json()["data"]
        assert [w["hostname"] for w in workers] == ["demo-worker@stamen"]
        assert "demo.add" in demo.get("/api/task/types").json()["task-types"]
        assert demo.get("/tasks").status_code == 200
        # The result backend answers, waiting included (the worker shares this process).
        done = next(t for t in tasks.values() if t["state"] == "SUCCESS")
        answer = demo.get(f"/api/task/result/{done['uuid']}", params={"timeout": 1})
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == "SUCCESS" and "result" in answer.json()
    finally:
        started = time.monotonic()
        assert demo.stop() == 0
    # A clean stop waits for the worker's running tasks, the longest of which takes 8 s.
    assert time.monotonic() - started < 15
    # Nothing alarming in the first thing a new user reads.
    log = demo.log()
    assert "Traceback" not in log and "WARNING" not in log, log
