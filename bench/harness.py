"""Pieces the benchmark scripts share: asking a monitor about tasks, watching the monitor's
Redis subscription, flow-controlled filling, statistics and the printed tables."""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis

FINAL = ("SUCCESS", "FAILURE")


class TaskProbe:
    """``GET /api/task/info/<uuid>`` on one monitor, through one keep-alive connection."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout)

    def state(self, uuid: str) -> str | None:
        """The task's state, or None while the monitor does not know it (or is too busy)."""
        try:
            r = self.client.get(f"/api/task/info/{uuid}")
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        return r.json().get("state")

    def wait_final(self, uuid: str, deadline: float, interval: float = 0.02) -> float | None:
        """``time.monotonic()`` when the task showed a final state, None at the deadline."""
        while time.monotonic() < deadline:
            if self.state(uuid) in FINAL:
                return time.monotonic()
            time.sleep(interval)
        return None

    def missing(self, uuids: Sequence[str]) -> int:
        """How many of ``uuids`` the monitor does not show in a final state."""
        return sum(1 for u in uuids if self.state(u) not in FINAL)

    def close(self) -> None:
        self.client.close()


class RedisWatch:
    """Samples the monitor's pub/sub connection in Redis (``CLIENT LIST TYPE pubsub``).

    ``omem`` is what Redis holds for the monitor and has not yet written to it (the backlog
    beyond the socket buffers); when it passes ``client-output-buffer-limit pubsub`` Redis
    drops the connection and every event in it. A subscriber id that goes away while the
    monitor runs is such a disconnect (or a reconnect after an error): both are counted.
    """

    def __init__(self, broker: str, db: int, interval: float = 0.1) -> None:
        self.client = redis.Redis.from_url(broker)
        self.db = str(db)
        self.interval = interval
        self.max_omem = 0
        self.disconnects = 0
        self._ids: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def subscribers(self) -> list[dict[str, Any]]:
        return [
            c
            for c in self.client.client_list(_type="pubsub")
            if c.get("db") == self.db and (int(c.get("psub", 0)) or int(c.get("sub", 0)))
        ]

    def omem(self) -> int:
        return sum(int(c.get("omem", 0)) for c in self.subscribers())

    def wait_subscribed(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            subs = self.subscribers()
            if subs:
                self._ids = {c["id"] for c in subs}
                return True
            time.sleep(0.05)
        return False

    def reset(self) -> None:
        self.max_omem = 0
        self.disconnects = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                subs = self.subscribers()
            except redis.RedisError:
                continue
            ids = {c["id"] for c in subs}
            self.disconnects += len(self._ids - ids)
            self._ids = ids
            self.max_omem = max(self.max_omem, sum(int(c.get("omem", 0)) for c in subs))

    def start(self) -> RedisWatch:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.client.close()


def throttle_on_omem(watch: RedisWatch, limit: int = 4_000_000, timeout: float = 600.0):
    """A ``LoadGenerator.run(throttle=...)`` hook: wait while the monitor's backlog in Redis
    is above ``limit`` bytes, so a fill runs as fast as the monitor ingests and loses
    nothing to the pub/sub output buffer limit."""
    state = {"n": 0}

    def throttle() -> None:
        state["n"] += 1
        if state["n"] % 8:
            return
        deadline = time.monotonic() + timeout
        while watch.omem() > limit and time.monotonic() < deadline:
            time.sleep(0.02)

    return throttle


@dataclass
class CpuMeter:
    """CPU% of one process between ``start`` and ``stop`` (100% = one core)."""

    monitor: Any
    cpu0: float | None = None
    t0: float = 0.0
    percent: float | None = None

    def start(self) -> CpuMeter:
        self.cpu0 = self.monitor.cpu_seconds()
        self.t0 = time.monotonic()
        return self

    def stop(self) -> float | None:
        cpu1 = self.monitor.cpu_seconds()
        if self.cpu0 is None or cpu1 is None:
            return None
        self.percent = 100.0 * (cpu1 - self.cpu0) / max(time.monotonic() - self.t0, 1e-9)
        return self.percent


def sizes(value: str | None, default: str) -> list[int]:
    """``"10000,100000"`` -> [10000, 100000]; None takes ``default``; "" or "0" means none."""
    text = default if value is None else value
    return [int(x) for x in text.split(",") if x.strip() and int(x) > 0]


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks stop the monitors we started."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class OtherCpu:
    """CPU% (100 = one core) used on the machine by everything except the given processes
    (this script, the monitor) and Redis: how noisy the machine was during a measurement."""

    def __init__(self, *pids: int) -> None:
        import psutil

        self.psutil = psutil
        self.procs = [psutil.Process(p) for p in pids]
        # Redis serves the load we make: its CPU is part of the benchmark, not noise.
        self.procs += [p for p in psutil.process_iter(["name"])
                       if p.info["name"] == "redis-server"]  # fmt: skip
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = self._own()

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _own(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                c = p.cpu_times()
                total += c.user + c.system
            except self.psutil.Error:
                pass
        return total

    def stop(self) -> float:
        wall = max(time.monotonic() - self.t0, 1e-9)
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, 100.0 * other / wall)


def wait_for_quiet(limit: float = 40.0, max_wait: float = 60.0) -> float:
    """Wait (bounded) until other processes use less than ``limit``% CPU over 2 s."""
    import os

    if max_wait <= 0:
        return 0.0
    deadline = time.monotonic() + max_wait
    while True:
        meter = OtherCpu(os.getpid())
        time.sleep(2.0)
        other = meter.stop()
        if other < limit or time.monotonic() > deadline:
            return other


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratio(a: float | None, b: float | None, higher_is_better: bool = True) -> str:
    """``a`` (Stamen) against ``b`` (Flower) as "N.Nx better"/"worse"."""
    if a is None or b is None or not (a == a and b == b) or a <= 0 or b <= 0:
        return "-"
    r = a / b if higher_is_better else b / a
    return f"{r:.1f}x" if r >= 1 else f"{r:.2f}x"


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "never"
        if abs(value) >= 100:
            return f"{value:,.0f}{unit}"
        return f"{value:.2f}{unit}" if abs(value) < 10 else f"{value:.1f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


@dataclass
class Table:
    title: str
    header: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])

    def render(self) -> str:
        widths = [len(h) for h in self.header]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
        lines = [self.title, "-" * len(self.title)]
        for row in [self.header, *self.rows]:
            cells = [c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths, strict=False))]  # fmt: skip
            lines.append("  ".join(cells))
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)

    def print(self) -> None:
        print()
        print(self.render(), flush=True)
