"""Flower 2.2.0 in a virtualenv of its own, and starting/stopping the monitors we compare.

    python bench/flower_env.py            # create bench/.flower-venv if missing, print versions
    python bench/flower_env.py --start    # start Stamen and Flower once each, check, stop

The benchmark scripts import :func:`start_monitor`. Both monitors get the same command-line
options and ``FLOWER_UNAUTHENTICATED_API=true``; readiness is ``GET /healthcheck`` polled
with a deadline. Each monitor runs in a new session so a stop reaches its whole tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
FLOWER_VENV = BENCH / ".flower-venv"
FLOWER_VERSION = "2.2.0"
# kombu 5.7's Redis transport imports packaging without declaring it (see DESIGN.md).
FLOWER_REQUIREMENTS = (f"flower=={FLOWER_VERSION}", "redis", "packaging")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

try:
    import psutil
except ImportError:  # CPU and memory figures are skipped without it
    psutil = None


def flower_celery() -> Path:
    return FLOWER_VENV / "bin" / "celery"


def ensure_flower_venv(quiet: bool = False) -> Path:
    """Create ``bench/.flower-venv`` with Flower 2.2.0 when it is missing; returns celery."""
    celery = flower_celery()
    python = FLOWER_VENV / "bin" / "python"
    if celery.exists():
        probe = subprocess.run(
            [str(python), "-c", "import flower, packaging, redis; print(flower.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode == 0 and probe.stdout.strip() == FLOWER_VERSION:
            return celery
    if not quiet:
        print(f"creating {FLOWER_VENV} with {' '.join(FLOWER_REQUIREMENTS)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *FLOWER_REQUIREMENTS],
        check=True,
        timeout=900,
    )
    return celery


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Monitor:
    """A running Stamen or Flower process that this script started."""

    kind: str  # "stamen" or "flower"
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    db_path: Path | None = None
    started_at: float = field(default_factory=time.monotonic)
    _ps: object | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def ps(self):  # a psutil.Process, or None
        if psutil is None:
            return None
        if self._ps is None:
            self._ps = psutil.Process(self.pid)
        return self._ps

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the monitor process (all its threads)."""
        ps = self.ps()
        if ps is None or not self.alive():
            return None
        t = ps.cpu_times()
        return t.user + t.system

    def memory(self) -> dict[str, float] | None:
        """MB of the whole process tree: RSS, and its anonymous part (RSS less file-backed
        pages: heap, not SQLite's memory-mapped database file, which the kernel can drop)."""
        if psutil is None or not self.alive():
            return None
        procs = [self.ps()]
        with contextlib.suppress(psutil.Error):
            procs += self.ps().children(recursive=True)
        rss = anon = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                info = proc.memory_info()
                rss += info.rss
                anon += info.rss - info.shared
        return {"rss": rss / 1e6, "anon": anon / 1e6}

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.kind} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.url}/healthcheck", timeout=2.0)
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} not ready after {timeout:.0f} s ({last}):\n"
                           f"{self.log_tail()}")  # fmt: skip

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> float:
        """SIGTERM, then SIGKILL after ``timeout``; returns how long the stop took."""
        t0 = time.monotonic()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return time.monotonic() - t0


def monitor_command(kind: str, broker: str, port: int, max_tasks: int,
                    extra: list[str] | None = None) -> list[str]:  # fmt: skip
    common = [f"--port={port}", "--address=127.0.0.1", f"--max_tasks={max_tasks}"]
    if kind == "flower":
        return [str(flower_celery()), f"--broker={broker}", "flower", *common, *(extra or [])]
    if kind == "stamen":
        return [sys.executable, "-m", "stamen", f"--broker={broker}", *common, *(extra or [])]
    raise ValueError(kind)


def start_monitor(
    kind: str,
    broker: str,
    *,
    max_tasks: int = 100_000,
    extra: list[str] | None = None,
    log_dir: Path | None = None,
    db_path: Path | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> Monitor:
    """Start ``kind`` on a free loopback port and wait until ``/healthcheck`` answers 200."""
    if kind == "flower":
        ensure_flower_venv()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLOWER_UNAUTHENTICATED_API="true")
    env.pop("CELERY_BROKER_URL", None)
    last_error: Exception | None = None
    for _ in range(3):  # a free port can be taken between the probe and the bind
        port = free_port()
        log_path = log_dir / f"{kind}-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                monitor_command(kind, broker, port, max_tasks, extra),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(log_dir),  # Flower's shelve / Stamen's default db land here
                start_new_session=True,
            )
        monitor = Monitor(kind, process, port, log_path, db_path)
        try:
            monitor.wait_ready(ready_timeout)
            return monitor
        except RuntimeError as exc:
            last_error = exc
            monitor.stop()
            if "address already in use" not in str(exc).lower():
                raise
    raise RuntimeError(f"could not start {kind}: {last_error}")


@contextlib.contextmanager
def running(kind: str, broker: str, **kwargs) -> Iterator[Monitor]:
    monitor = start_monitor(kind, broker, **kwargs)
    try:
        yield monitor
    finally:
        monitor.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", action="store_true", help="start and stop both monitors")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/10")
    args = parser.parse_args()
    celery = ensure_flower_venv()
    out = subprocess.run([str(celery), "--version"], capture_output=True, text=True, timeout=60)
    print(f"flower venv: {FLOWER_VENV} (celery {out.stdout.strip()}, flower {FLOWER_VERSION})")
    if args.start:
        for kind in ("stamen", "flower"):
            t0 = time.monotonic()
            with running(kind, args.broker) as mon:
                ready = time.monotonic() - t0
                tasks = httpx.get(f"{mon.url}/api/tasks?limit=1", timeout=10)
                print(f"{kind:7s} ready in {ready:5.2f} s on {mon.url}, "
                      f"/api/tasks -> {tasks.status_code}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
