"""Real services, real workers, real Stamen processes for the integration tests.

One Stamen and one worker per broker are shared by the whole session (starting them is
the slow part). Everything waits by polling with a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from celery import Celery

from tests.integration.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:
            last_error = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}: {last_error}"
    )


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20
) -> int:
    """Stop a child the way its user would (``sig``), killing it if it will not stop within
    ``timeout``: a hung child must not outlive its test holding a port or a queue."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class StamenProcess:
    """A ``stamen`` command running as a user would start it."""

    args: list[str]
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_path: Path) -> StamenProcess:
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "stamen",
            *self.args,
            f"--port={self.port}",
            "--address=127.0.0.1",
        ]
        self.proc = subprocess.Popen(
            cmd, env=self.env, cwd=ROOT, stdout=log_path.open("ab"), stderr=subprocess.STDOUT
        )
        wait_until(self._healthy, timeout=30, what=f"stamen on {self.url} ({log_path})")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"stamen exited: {self.log()}")
        try:
            return httpx.get(f"{self.url}/healthcheck", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        return stop_process(self.proc, sig, timeout)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10, **kwargs)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    hostname: str

    def stop(self) -> None:
        stop_process(self.proc)


def start_worker(
    env: dict[str, str],
    hostname: str,
    queue: str,
    log_path: Path,
    *extra_args: str,
    events: bool = True,
) -> Worker:
    cmd = [
        sys.executable, "-m", "celery", "-A", "tests.integration.celeryapp", "worker",
        "-P", "threads", "-c", "4", "-Q", queue, f"--hostname={hostname}",
        "--without-mingle", "--without-gossip", "-l", "info", *extra_args,
    ]  # fmt: skip
    if events:
        cmd.append("-E")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=log_path.open("ab"), stderr=subprocess.STDOUT
    )
    return Worker(proc, hostname)


@dataclass
class Cluster:
    """A broker, a worker consuming a queue of its own, and a Stamen watching it."""

    name: str
    broker: str
    backend: str
    queue: str
    env: dict[str, str]
    stamen: StamenProcess
    worker: Worker
    client: Celery

    def send(self, name: str, *args: Any, **kwargs: Any) -> str:
        options = kwargs.pop("options", {})
        result = self.client.send_task(name, args=args, kwargs=kwargs, queue=self.queue, **options)
        return str(result.id)

    def task(self, task_id: str) -> dict[str, Any] | None:
        response = self.stamen.get(f"/api/task/info/{task_id}")
        return response.json() if response.status_code == 200 else None

    def wait_state(self, task_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
        return wait_until(
            lambda: (t := self.task(task_id)) and t["state"] == state and t,
            timeout=timeout,
            what=f"task {task_id} to reach {state}",
        )


def cluster_env(broker: str, backend: str, queue: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        STAMEN_TEST_BROKER=broker,
        STAMEN_TEST_BACKEND=backend,
        STAMEN_TEST_QUEUE=queue,
        FLOWER_UNAUTHENTICATED_API="true",
        PYTHONPATH=str(ROOT),
    )
    return env


def make_client(broker: str, backend: str) -> Celery:
    client = Celery("itest-client", broker=broker, backend=backend)
    client.conf.task_send_sent_event = True
    return client


def start_cluster(name: str, broker: str, backend: str, logs_dir: Path) -> Iterator[Cluster]:
    queue = f"itest-{name}-{uuid.uuid4().hex[:8]}"
    env = cluster_env(broker, backend, queue)
    stamen = StamenProcess(["-A", "tests.integration.celeryapp"], env).start(
        logs_dir / f"stamen-{name}.log"
    )
    worker = start_worker(env, f"itest-{name}@localhost", queue, logs_dir / f"worker-{name}.log")
    cluster = Cluster(
        name, broker, backend, queue, env, stamen, worker, make_client(broker, backend)
    )
    try:
        wait_until(
            lambda: stamen.get("/api/workers?status=1").json().get(worker.hostname),
            timeout=120,
            what=f"{worker.hostname} online in stamen",
        )
        yield cluster
    finally:
        worker.stop()
        stamen.stop()
        cluster.client.close()
