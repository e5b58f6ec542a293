"""Inspector against a real ``celery worker`` subprocess on the shared Redis.

The worker runs ``tests/integration/inspect_app.py`` with a key prefix unique to this run, so
broadcasts reach only this worker. Counting calls to ``app.control.inspect`` (our own code
path, not the broker) is how coalescing is observed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from stamen.cluster import Inspector
from tests.integration.conftest import stop_process
from tests.integration.inspect_app import make_app
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("STAMEN_TEST_REDIS", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[2]
WORKER_START_TIMEOUT_S = 30.0
TIMEOUT_S = 1.0


@dataclass
class Worker:
    hostname: str
    queue: str
    app: Celery


def _wait_for_worker(
    app: Celery, hostname: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"worker exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        # ping returns as soon as the one destination answered; its timeout bounds each poll.
        if app.control.ping(destination=[hostname], timeout=0.5):
            return
    pytest.fail(f"worker {hostname} did not answer within {WORKER_START_TIMEOUT_S}s")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    run = uuid.uuid4().hex[:10]
    prefix, queue = f"stamen-inspect-{run}:", f"stamen-inspect-{run}"
    hostname = f"stamen-inspect-{run}@localhost"
    env = dict(os.environ)
    env.update(
        STAMEN_TEST_BROKER=REDIS_URL,
        STAMEN_TEST_QUEUE=queue,
        STAMEN_TEST_KEYPREFIX=prefix,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "tests.integration.inspect_app", "worker"]
    command += ["-E", "-P", "solo", "-Q", queue, f"--hostname={hostname}"]
    command += ["--without-gossip", "--without-mingle", "-l", "INFO"]
    app = make_app(REDIS_URL, queue, prefix)
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_worker(app, hostname, process, log)
        yield Worker(hostname, queue, app)
    finally:
        stop_process(process, timeout=15)
        app.close()
        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)


def test_global_inspect_fills_stats_queues_registered_conf(worker: Worker) -> None:
    inspector = Inspector(worker.app, TIMEOUT_S)
    try:
        asyncio.run(inspector.inspect())
        entry = inspector.workers[worker.hostname]
    finally:
        inspector.close()
    assert set(entry) == {"stats", "active_queues", "registered", "conf", "timestamp"}
    assert worker.queue in [q["name"] for q in entry["active_queues"]]
    assert "stamen_test.add" in entry["registered"]
    assert entry["stats"]["pid"] > 0
    assert "alternates" not in entry["stats"]["broker"]
    assert isinstance(entry["conf"], dict)
    assert time.time() - entry["timestamp"] < 30
    assert inspector.known(worker.hostname)


def test_single_worker_inspect_fills_all_eight(worker: Worker) -> None:
    inspector = Inspector(worker.app, TIMEOUT_S)
    started = time.monotonic()
    try:
        asyncio.run(inspector.inspect(worker.hostname))
    finally:
        inspector.close()
    # With one destination, Celery stops waiting once that worker replied.
    assert time.monotonic() - started < TIMEOUT_S
    entry = inspector.workers[worker.hostname]
    assert set(entry) == {*Inspector.WORKER_METHODS, "timestamp"}
    assert entry["active"] == [] and entry["reserved"] == [] and entry["scheduled"] == []
    assert entry["revoked"] == []


def test_unknown_worker_completes_within_timeout_without_blocking_the_loop(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    inspector = Inspector(worker.app, 0.5)
    gaps: list[float] = []

    async def scenario() -> float:
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        await inspector.inspect("nobody@nowhere")
        elapsed = time.monotonic() - started
        done.set()
        await ticking
        return elapsed

    caplog.set_level(logging.WARNING, logger="stamen.cluster.inspector")
    try:
        elapsed = asyncio.run(scenario())
    finally:
        inspector.close()
    assert elapsed < 0.5 + 1.5
    assert max(gaps) < 0.25  # the loop kept running while the threads waited for replies
    assert not inspector.known("nobody@nowhere")
    assert inspector.workers == {}
    assert "Inspect method stats failed" in caplog.messages


def test_concurrent_inspections_of_one_target_share_the_calls(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    original = worker.app.control.inspect

    def counting_inspect(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("destination"))
        return original(*args, **kwargs)

    monkeypatch.setattr(worker.app.control, "inspect", counting_inspect)
    inspector = Inspector(worker.app, 0.5)

    async def scenario() -> None:
        await asyncio.gather(inspector.inspect(), inspector.inspect())
        assert len(calls) == len(Inspector.GLOBAL_METHODS)
        calls.clear()
        await asyncio.gather(inspector.inspect(worker.hostname), inspector.inspect(worker.hostname))
        assert calls == [[worker.hostname]] * len(Inspector.WORKER_METHODS)
        calls.clear()
        # Different targets are not coalesced (a global one skips the task lists).
        await asyncio.gather(inspector.inspect(), inspector.inspect(worker.hostname))
        assert len(calls) == len(Inspector.GLOBAL_METHODS) + len(Inspector.WORKER_METHODS)

    try:
        asyncio.run(scenario())
    finally:
        inspector.close()
    assert inspector.known(worker.hostname)


def test_entries_not_refreshed_are_forgotten(worker: Worker) -> None:
    now = [time.time()]
    inspector = Inspector(worker.app, TIMEOUT_S, forget_after_s=3600, clock=lambda: now[0])
    try:
        asyncio.run(inspector.inspect(worker.hostname))
    finally:
        inspector.close()
    assert inspector.known(worker.hostname)
    now[0] += 3599
    assert worker.hostname in inspector.workers
    now[0] += 2
    assert not inspector.known(worker.hostname)
    assert worker.hostname not in inspector.workers


def _inspect_unreachable(app: Celery, caplog: pytest.LogCaptureFixture) -> Inspector:
    """One global inspection against a broker that will not serve it, logs captured."""
    inspector = Inspector(app, TIMEOUT_S)
    caplog.set_level(logging.WARNING, logger="stamen.cluster.inspector")
    try:
        asyncio.run(inspector.inspect())
    finally:
        inspector.close()
        app.close()
    return inspector


def test_dead_broker_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    app = Celery(broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    # No kombu publish retries, so the refusal surfaces at once instead of after ~6 s.
    app.conf.broker_transport_options = {"max_retries": 0}
    inspector = _inspect_unreachable(app, caplog)
    assert inspector.workers == {}
    failures = [m for m in caplog.messages if m.startswith("Inspect method stats failed: ")]
    assert failures and "Connection refused" in failures[0]


def test_a_refused_login_is_one_line_per_method(caplog: pytest.LogCaptureFixture) -> None:
    app = Celery(broker="amqp://guest:wrong-password@127.0.0.1:5672//", set_as_current=False)
    app.conf.broker_connection_max_retries = 0
    _inspect_unreachable(app, caplog)
    records = [r for r in caplog.records if r.name == "stamen.cluster.inspector"]
    assert records and all("ACCESS_REFUSED" in r.getMessage() for r in records)
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in records)
