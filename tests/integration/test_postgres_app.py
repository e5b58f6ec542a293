"""The whole app on PostgreSQL: ``stamen --db=postgresql://...`` records a real task.

Uses the session's Redis worker (its events reach every receiver on the broker) and a Stamen
of its own whose history lives in a fresh PostgreSQL schema; ``stamen db upgrade`` is run
against another fresh schema.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration import pgutil
from tests.integration.conftest import ROOT, Cluster, StamenProcess, wait_until

pytestmark = pytest.mark.integration


def test_a_task_is_recorded_and_searchable_in_postgres(
    redis_cluster: Cluster, logs_dir: Path
) -> None:
    with pgutil.temp_schema() as url:
        stamen = StamenProcess(
            ["-A", "tests.integration.celeryapp", f"--db={url}"], redis_cluster.env
        )
        stamen.start(logs_dir / "stamen-postgres.log")
        try:
            wait_until(
                lambda: (
                    stamen.get("/api/workers?status=1").json().get(redis_cluster.worker.hostname)
                ),
                timeout=60,
                what="worker online in the PostgreSQL-backed stamen",
            )
            task_id = redis_cluster.send("itest.echo", "pg-needle-e2e", colour="mauve")

            def found() -> dict[str, Any] | None:
                response = stamen.get("/api/tasks", params={"search": "pg-needle"})
                assert response.status_code == 200, response.text
                task = response.json().get(task_id)
                return task if task and task["state"] == "SUCCESS" else None

            task = wait_until(found, timeout=60, what=f"{task_id} SUCCESS in /api/tasks?search=")
            assert task["name"] == "itest.echo"
            by_kwargs = stamen.get("/api/tasks", params={"search": "kwargs:colour=mauve"}).json()
            assert task_id in by_kwargs
            info = stamen.get(f"/api/task/info/{task_id}").json()
            assert info["state"] == "SUCCESS" and info["worker"] == redis_cluster.worker.hostname
            failed = redis_cluster.send("itest.fail", "pg-broken")
            wait_until(
                lambda: (
                    (stamen.get(f"/api/task/info/{failed}").json() or {}).get("state") == "FAILURE"
                ),
                timeout=60,
                what=f"{failed} FAILURE",
            )
            assert "pg-broken" in stamen.get("/failures").text
            assert stamen.get("/charts/data", params={"range": "1h"}).json()["finished"] >= 2
            assert "itest.echo" in stamen.get("/api/task/types").json()["task-types"]
            hostname = redis_cluster.worker.hostname
            # Every page that reads the store renders from PostgreSQL.
            for path in (
                "/", "/tasks", "/workers", f"/worker/{hostname}", f"/task/{task_id}",
                f"/workflow/{task_id}", "/charts", "/metrics", "/api/workers",
            ):  # fmt: skip
                response = stamen.get(path)
                assert response.status_code == 200, (path, response.text[:500])
            assert "flower_store_tasks" in stamen.get("/metrics").text
        finally:
            assert stamen.stop() == 0, stamen.log()
        # The history outlives the process: it is in PostgreSQL, not a temporary file.
        from stamen.store.postgres import PostgresReader

        assert PostgresReader(url).get_task(task_id) is not None


def test_db_upgrade_command(tmp_path: Path) -> None:
    with pgutil.temp_schema() as url:

        def upgrade(db: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "stamen", "db", "upgrade", f"--db={db}"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        first = upgrade(url)
        assert first.returncode == 0, first.stderr
        assert "schema version 0 -> 2" in first.stdout
        again = upgrade(url)
        assert again.returncode == 0 and "up to date" in again.stdout
        sqlite = upgrade(str(tmp_path / "h.sqlite3"))
        assert sqlite.returncode == 0 and "schema version 0 -> 2" in sqlite.stdout, sqlite.stderr
        # A schema named in the URL that does not exist: one line saying so, no traceback.
        missing = pgutil.schema_url(f"stamen_missing_{uuid.uuid4().hex[:8]}")
        for command in (["db", "upgrade", f"--db={missing}"], [f"--db={missing}", "--port=0"]):
            answer = subprocess.run(
                [sys.executable, "-m", "stamen", *command],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert answer.returncode == 1, answer.stderr
            assert "no schema of the search path" in answer.stderr
            assert "Traceback" not in answer.stderr, answer.stderr
