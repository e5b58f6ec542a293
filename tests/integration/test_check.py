"""``stamen check URL`` against real Stamen processes: the exit codes the deployment guide
promises (0 ok, 1 not reachable, 2 no workers, 3 auth problem) and a reason on each line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stamen.check import run_check
from tests.integration.conftest import ROOT, Cluster, StamenProcess, free_port, wait_until

pytestmark = pytest.mark.integration


def check(*argv: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_check(list(argv), environ=env or {}, out=lines.append)
    return code, lines


def line_of(lines: list[str], name: str) -> str:
    return next(line for line in lines if line.split()[1:2] == [name])


def lone_stamen(tmp_path: Path, *extra: str, **env_extra: str) -> StamenProcess:
    """A Stamen on a broker database no worker uses: it can only ever see no workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    args = ["--broker=redis://127.0.0.1:6379/13", "--inspect_timeout=200", *extra]
    return StamenProcess(args, env).start(tmp_path / "stamen.log")


@pytest.fixture
def no_workers(tmp_path: Path) -> Iterator[StamenProcess]:
    stamen = lone_stamen(tmp_path, FLOWER_UNAUTHENTICATED_API="true")
    try:
        yield stamen
    finally:
        stamen.stop()


@pytest.fixture
def with_basic_auth(tmp_path: Path) -> Iterator[StamenProcess]:
    stamen = lone_stamen(tmp_path, "--basic_auth=ops:right-password")
    try:
        yield stamen
    finally:
        stamen.stop()


def test_healthy_cluster_passes(redis_cluster: Cluster) -> None:
    task_id = redis_cluster.send("itest.add", 1, 2)
    redis_cluster.wait_state(task_id, "SUCCESS")
    # /metrics is fed by the same events; wait until it shows them rather than race it.
    wait_until(lambda: "flower_events_total" in redis_cluster.stamen.get("/metrics").text)

    code, lines = check(redis_cluster.stamen.url)

    assert code == 0, lines
    assert redis_cluster.worker.hostname in line_of(lines, "workers")
    assert line_of(lines, "history").startswith("OK")
    assert line_of(lines, "metrics").startswith("OK")
    # The session's Stamen has no authentication: a warning, not a failure...
    assert line_of(lines, "auth").startswith("WARN")
    # ...unless the caller insists on it.
    code, lines = check(redis_cluster.stamen.url, "--require-auth")
    assert code == 3
    assert "authentication is not configured" in line_of(lines, "auth")


def test_unreachable_port_is_1() -> None:
    code, lines = check(f"http://127.0.0.1:{free_port()}", "--timeout=2")
    assert code == 1
    assert lines == [lines[0]] and lines[0].startswith("FAIL  reachable not reachable")


def test_no_workers_is_2(no_workers: StamenProcess) -> None:
    code, lines = check(no_workers.url)
    assert code == 2, lines
    assert line_of(lines, "workers").startswith("FAIL")
    assert "no worker" in line_of(lines, "workers")
    assert line_of(lines, "reachable").startswith("OK")


def test_wrong_credentials_are_3(with_basic_auth: StamenProcess) -> None:
    url = with_basic_auth.url
    code, lines = check(url, "--user=ops", "--password=wrong")
    assert code == 3, lines
    assert "refused" in line_of(lines, "auth")
    assert line_of(lines, "workers").startswith("SKIP")

    code, lines = check(url)
    assert code == 3
    assert "no credentials were given" in line_of(lines, "auth")

    # Right credentials, from the URL and from the environment: auth passes, and what is
    # left is the missing worker.
    host = url.removeprefix("http://")
    code, lines = check(f"http://ops:right-password@{host}")
    assert code == 2, lines
    assert line_of(lines, "auth").startswith("OK")
    code, lines = check(url, "--user=ops", env={"STAMEN_CHECK_PASSWORD": "right-password"})
    assert code == 2, lines


def test_command_line(with_basic_auth: StamenProcess) -> None:
    """The real ``stamen check`` command: options after the URL, exit status, stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "stamen", "check", with_basic_auth.url, "--user", "ops",
         "--password=nope", "--timeout", "5"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result
    assert "FAIL  auth" in result.stdout
    assert "warning" not in result.stderr  # check's own options are not Flower's unknowns
