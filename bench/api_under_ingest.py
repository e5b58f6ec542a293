"""``GET /api/tasks?limit=100`` latency while events pour in, Stamen vs Flower 2.2.0.

    python bench/api_under_ingest.py --quick    # 10 s of load per step, < 3 min
    python bench/api_under_ingest.py            # 20 s per step, ~5 min

DESIGN.md's rule 8: ingest and pages must not starve each other. Each monitor is started
on its own Redis database, gets a warm-up of tasks, and is then timed with sequential
requests (one keep-alive connection) three ways: idle; while ``bench/events.py``
publishes single-event messages at a rate both keep up with (``--shared-rate``, default
4,000 events/s, about Flower's sustained limit); and while it publishes at a rate only
Stamen keeps up with (``--high-rate``, default 12,000 events/s; Flower falls behind, which
is the point: that is when an operator opens the page). Requests time out after 10 s and
count as such. The publisher runs in a subprocess, bounded in events and time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_env import Monitor, running
from harness import Table, exit_on_sigterm, fmt, median, percentile

HERE = Path(__file__).resolve().parent
URL = "/api/tasks?limit=100"
REQUEST_TIMEOUT = 10.0


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    timeouts: int = 0

    def row(self) -> tuple[str, str, str, int]:
        s = sorted(self.seconds)
        if not s:
            return "-", "-", "-", self.timeouts
        return (
            fmt(median(s) * 1000),
            fmt(percentile(s, 95) * 1000),
            fmt(s[-1] * 1000),
            self.timeouts,
        )


def publish(broker: str, rate: int, seconds: float) -> subprocess.Popen[bytes]:
    tasks = int(rate * seconds / 3)
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "events.py"),
            f"--broker={broker}",
            f"--tasks={tasks}",
            f"--rate={rate}",
            f"--duration={seconds}",
            "--mode=single",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def time_requests(monitor: Monitor, until: threading.Event, budget: float) -> Latencies:
    """Sequential requests until ``until`` is set or ``budget`` seconds pass."""
    found = Latencies()
    deadline = time.monotonic() + budget
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        while not until.is_set() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                client.get(monitor.url + URL).raise_for_status()
            except httpx.TimeoutException:
                found.timeouts += 1
                continue
            found.seconds.append(time.perf_counter() - t0)
            time.sleep(0.05)
    return found


def under_load(monitor: Monitor, broker: str, rate: int, seconds: float) -> Latencies:
    done = threading.Event()
    publisher = publish(broker, rate, seconds)
    watcher = threading.Thread(target=lambda: (publisher.wait(seconds + 30), done.set()))
    watcher.start()
    try:
        return time_requests(monitor, done, seconds + 30)
    finally:
        if publisher.poll() is None:
            publisher.kill()
        watcher.join()


def measure(kind: str, broker: str, args: argparse.Namespace) -> dict[str, Latencies]:
    redis.Redis.from_url(broker).flushdb()
    results: dict[str, Latencies] = {}
    with running(kind, broker, max_tasks=100_000) as monitor:
        warm = publish(broker, 2000, 5)
        warm.wait(60)
        time.sleep(3)  # let the warm-up land before timing "idle"
        results["idle"] = time_requests(monitor, threading.Event(), args.idle_seconds)
        for label, rate in (("shared", args.shared_rate), ("high", args.high_rate)):
            results[label] = under_load(monitor, broker, rate, args.seconds)
            print(
                f"  {kind} {label} {rate}/s: median/p95/max ms {results[label].row()}", flush=True
            )
            time.sleep(args.settle)  # let the backlog drain before the next step
    return results


def main() -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    p.add_argument("--monitors", default="stamen,flower")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shared-rate", type=int, default=4000)
    p.add_argument("--high-rate", type=int, default=12000)
    p.add_argument("--seconds", type=float, default=None, help="load per step")
    p.add_argument("--idle-seconds", type=float, default=5.0)
    p.add_argument("--settle", type=float, default=15.0)
    args = p.parse_args()
    if args.seconds is None:
        args.seconds = 10.0 if args.quick else 20.0
    kinds = args.monitors.split(",")
    found = {kind: measure(kind, args.broker, args) for kind in kinds}
    table = Table(
        f"GET {URL} while ingesting (sequential, ms; single-event messages; "
        f"{args.seconds:.0f} s per step)",
        ["monitor", "load", "median", "p95", "max", "timeouts"],
    )
    loads = {
        "idle": "idle",
        "shared": f"{args.shared_rate:,} events/s",
        "high": f"{args.high_rate:,} events/s",
    }
    for kind in kinds:
        for key, label in loads.items():
            table.add(kind, label, *found[kind][key].row())
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
