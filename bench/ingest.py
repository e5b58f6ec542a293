"""Event ingest, Stamen vs Flower 2.2.0, against the same Redis broker.

    python bench/ingest.py --quick          # < 2 min
    python bench/ingest.py                  # about 6-9 min

For each message mode (one event per message; 24 per message, as Celery workers batch
them) and each monitor, started fresh with the same options:

(a) backlog drain: K tasks' events (3 per task) published as fast as possible; the time
    from the first message until the monitor shows the last task final, checked on a
    sample of earlier tasks too. Repeated, the median is quoted.
(b) sustained rate: the publish rate steps up (events/s, ~10 s a step); twice a second a
    marker task goes out and its lag is the time from its last event's publish until
    ``/api/task/info`` shows it final. A step passes when every marker's lag is <= 2 s and
    no task was lost. Reported: the highest passing rate, and the monitor's CPU% there.

Lost events are detected, never waited for: every wait is bounded, PUBLISH tells how many
messages no subscriber got, the monitor's pub/sub connection is watched for disconnects
(Redis drops a subscriber whose output buffer passes ``client-output-buffer-limit pubsub``,
32 MB hard / 8 MB for 60 s by default) and a sample of each phase's tasks is looked up.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

sys.path.insert(0, str(Path(__file__).resolve().parent))

from events import LoadGenerator, redis_db
from flower_env import Monitor, psutil, start_monitor
from harness import (
    FINAL,
    CpuMeter,
    OtherCpu,
    RedisWatch,
    Table,
    TaskProbe,
    exit_on_sigterm,
    fmt,
    median,
    ratio,
    wait_for_quiet,
)

SAMPLE = 150  # tasks looked up per phase for losses


@dataclass
class DrainResult:
    rates: list[float] = field(default_factory=list)  # events/s, one per repeat
    cpu: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)  # CPU% of other processes
    incomplete: int = 0  # repeats whose last task never showed up
    lost_tasks_est: int = 0
    unheard: int = 0
    disconnects: int = 0
    max_omem: int = 0


@dataclass
class Step:
    rate: int
    achieved: float
    lags: list[float]
    cpu: float | None
    other_cpu: float
    lost_tasks_est: int
    unheard: int
    disconnects: int
    max_omem: int
    passed: bool
    caught_up: bool


@dataclass
class RunResult:
    kind: str
    mode: str
    drain: DrainResult | None = None
    steps: list[Step] = field(default_factory=list)
    error: str = ""

    @property
    def best(self) -> Step | None:
        passed = [s for s in self.steps if s.passed]
        return max(passed, key=lambda s: s.rate) if passed else None


class MarkerLag:
    """Polls the oldest unseen marker until the monitor shows it final; records lags."""

    def __init__(self, base_url: str) -> None:
        self.probe = TaskProbe(base_url, timeout=5.0)
        self.pending: deque[tuple[str, float]] = deque()
        self.lags: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, uuid: str, published_at: float) -> None:
        self.pending.append((uuid, published_at))

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.pending:
                time.sleep(0.01)
                continue
            uuid, t = self.pending[0]
            if self.probe.state(uuid) in FINAL:
                self.lags.append(time.monotonic() - t)
                self.pending.popleft()
            else:
                time.sleep(0.02)

    def wait_all(self, deadline: float) -> bool:
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.pending

    def close(self) -> list[float]:
        """Lags, with +inf for markers never seen."""
        self._stop.set()
        self._thread.join(10)
        self.probe.close()
        return self.lags + [math.inf] * len(self.pending)


def warm_up(monitor: Monitor, broker: str, mode: str, watch: RedisWatch) -> None:
    """Wait for the subscription, then a few tasks end to end: the pipeline works."""
    if not watch.wait_subscribed(30):
        raise RuntimeError(f"{monitor.kind} never subscribed to the events channel")
    gen = LoadGenerator(broker, mode=mode, seed=99)
    try:
        stats = gen.run(200, rate=20_000)
    finally:
        gen.close()
    probe = TaskProbe(monitor.url)
    try:
        if probe.wait_final(stats.last_uuid, time.monotonic() + 30) is None:
            raise RuntimeError(f"{monitor.kind} did not show warm-up tasks within 30 s")
    finally:
        probe.close()


def drain_once(monitor: Monitor, broker: str, mode: str, tasks: int, timeout: float,
               watch: RedisWatch, seed: int, result: DrainResult) -> None:  # fmt: skip
    """Publish ``tasks`` tasks as fast as possible; time until the last one shows final."""
    watch.reset()
    gen = LoadGenerator(broker, mode=mode, seed=seed)
    gen._online_sent = True  # warm-up announced the workers
    probe = TaskProbe(monitor.url)
    cpu = CpuMeter(monitor).start()
    other = OtherCpu(os.getpid(), monitor.pid)
    try:
        try:
            stats = gen.run(tasks, rate=0, keep_uuids=SAMPLE)
        finally:
            gen.close()
        done = probe.wait_final(stats.last_uuid, stats.started_at + timeout)
        cpu.stop()
        result.other.append(other.stop())
        if done is None:
            result.incomplete += 1
        else:
            result.rates.append(stats.events / (done - stats.started_at))
            if cpu.percent is not None:
                result.cpu.append(cpu.percent)
            time.sleep(0.3)  # stragglers of the other workers' last batches
        missing = probe.missing(stats.uuids)
    finally:
        probe.close()
    result.lost_tasks_est += round(missing / max(len(stats.uuids), 1) * stats.tasks)
    result.unheard += stats.unheard
    result.disconnects += watch.disconnects
    result.max_omem = max(result.max_omem, watch.max_omem)


def step_once(monitor: Monitor, gen: LoadGenerator, rate: int, args: argparse.Namespace,
              watch: RedisWatch) -> Step:  # fmt: skip
    """Publish at ``rate`` events/s for ``args.step`` s with markers; wait (bounded) for the
    monitor to catch up; check a sample for losses."""
    watch.reset()
    markers = MarkerLag(monitor.url)
    probe = TaskProbe(monitor.url)
    cpu = CpuMeter(monitor).start()
    other = OtherCpu(os.getpid(), monitor.pid)
    try:
        stats = gen.run(duration=args.step, rate=rate, marker_every=0.5, on_marker=markers.add,
                        keep_uuids=SAMPLE // 3)  # fmt: skip
        cpu.stop()
        other_cpu = other.stop()
        deadline = time.monotonic() + args.catchup
        caught_up = markers.wait_all(deadline)
        lags = markers.close()
        # The tail after the last marker must arrive too before the sample is checked.
        caught_up = caught_up and probe.wait_final(stats.last_uuid, deadline) is not None
        missing = probe.missing(stats.uuids) if caught_up else len(stats.uuids)
    finally:
        probe.close()
    lost = round(missing / max(len(stats.uuids), 1) * stats.tasks)
    achieved = stats.events / stats.seconds if stats.seconds else 0.0
    passed = (
        caught_up
        and bool(lags)
        and max(lags) <= args.max_lag
        and lost == 0
        and stats.unheard == 0
        and achieved >= 0.95 * rate
    )
    step = Step(rate, achieved, lags, cpu.percent, other_cpu, lost, stats.unheard,
                watch.disconnects, watch.max_omem, passed, caught_up)  # fmt: skip
    print(f"    {monitor.kind:6s} {gen.mode:6s} {rate:>6d}/s: published {achieved:8.0f}/s, "
          f"lag median {fmt(median(lags))} s max {fmt(max(lags) if lags else None)} s, "
          f"cpu {fmt(cpu.percent)}%, others {other_cpu:.0f}%, lost~{lost}, unheard "
          f"{stats.unheard}, omem max {watch.max_omem / 1e6:.1f} MB -> "
          f"{'ok' if passed else 'FAIL'}", flush=True)  # fmt: skip
    return step


def with_db(broker: str, db: int) -> str:
    u = urlparse(broker)
    return urlunparse(u._replace(path=f"/{db}"))


@dataclass
class Side:
    kind: str
    broker: str
    monitor: Monitor
    watch: RedisWatch
    result: RunResult
    gen: LoadGenerator | None = None
    active: bool = True
    failures: int = 0


def run_mode(mode: str, kinds: list[str], args: argparse.Namespace, seed: int) -> list[RunResult]:
    """Both monitors run at once, each on its own Redis db (pub/sub channels are per db), and
    their measurements alternate, so a burst of noise on the machine hits both alike."""
    base = redis_db(args.broker)
    sides: list[Side] = []
    try:
        for j, kind in enumerate(kinds):
            broker = with_db(args.broker, base + j)
            result = RunResult(kind, mode)
            print(f"  {kind} / {mode}: starting on {broker}", flush=True)
            try:
                monitor = start_monitor(kind, broker, max_tasks=args.max_tasks)
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                print(f"    {kind}: ERROR {result.error}", flush=True)
                continue
            watch = RedisWatch(broker, base + j).start()
            side = Side(kind, broker, monitor, watch, result)
            sides.append(side)
            try:
                warm_up(monitor, broker, mode, watch)
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                side.active = False
        k = args.drain_tasks_single if mode == "single" else args.drain_tasks_batch
        for i in range(args.drain_repeat):
            for side in sides:
                if not side.active:
                    continue
                wait_for_quiet(args.quiet_limit, args.quiet_wait)
                d = side.result.drain = side.result.drain or DrainResult()
                before = len(d.rates)
                drain_once(side.monitor, side.broker, mode, k, args.drain_timeout, side.watch,
                           seed + 100 * i + 7 * len(side.kind), d)  # fmt: skip
                last = f"{d.rates[-1]:,.0f} events/s" if len(d.rates) > before else "INCOMPLETE"
                print(f"    {side.kind:6s} {mode:6s} drain {i + 1}/{args.drain_repeat} of "
                      f"{k:,} tasks: {last}, others {d.other[-1]:.0f}% cpu, lost~"
                      f"{d.lost_tasks_est} tasks, unheard {d.unheard}, disconnects "
                      f"{d.disconnects}, omem max {d.max_omem / 1e6:.1f} MB",
                      flush=True)  # fmt: skip
                time.sleep(0.5)
        for j, side in enumerate(sides):
            side.gen = LoadGenerator(side.broker, mode=mode, seed=seed + 1000 + j)
            side.gen._online_sent = True
        for rate in args.rates:
            for side in sides:
                if not side.active:
                    continue
                wait_for_quiet(args.quiet_limit, args.quiet_wait)
                step = step_once(side.monitor, side.gen, rate, args, side.watch)
                side.result.steps.append(step)
                if not step.passed:
                    side.failures += 1
                    if side.failures > args.extra_steps or not step.caught_up:
                        side.active = False
                    else:
                        time.sleep(min(args.catchup, 5))
            if not any(s.active for s in sides):
                break
        for side in sides:
            if not side.monitor.alive():
                side.result.error = f"{side.kind} died: {side.monitor.log_tail(5)}"
    finally:
        for side in sides:
            if side.gen is not None:
                side.gen.close()
            side.watch.stop()
            side.monitor.stop()
    done = {s.kind for s in sides}
    return [s.result for s in sides] + [RunResult(k, mode, error="did not start")
                                        for k in kinds if k not in done]  # fmt: skip


def report(results: list[RunResult], args: argparse.Namespace) -> None:
    by = {(r.kind, r.mode): r for r in results}
    steps = Table("Sustained-rate steps (lag = marker's last event published -> shown final)",
                  ["monitor/mode", "target/s", "sent/s", "lag med s", "lag max s", "CPU %",
                   "others %", "lost~", "omem MB", "ok"])  # fmt: skip
    for r in results:
        for s in r.steps:
            steps.add(f"{r.kind}/{r.mode}", s.rate, s.achieved, median(s.lags),
                      max(s.lags) if s.lags else None, s.cpu, s.other_cpu, s.lost_tasks_est,
                      s.max_omem / 1e6, "yes" if s.passed else "NO")  # fmt: skip
    steps.print()

    summary = Table(f"Ingest, Stamen vs Flower 2.2.0 (broker {args.broker}, "
                    f"max_tasks={args.max_tasks})",
                    ["figure", "Stamen", "Flower", "ratio"])  # fmt: skip
    for mode in args.modes:
        s, f = by.get(("stamen", mode)), by.get(("flower", mode))
        label = "1 event/msg" if mode == "single" else "24 events/msg"

        def drained(r: RunResult | None) -> float | None:
            return median(r.drain.rates) if r and r.drain and r.drain.rates else None

        k = args.drain_tasks_single if mode == "single" else args.drain_tasks_batch
        sd, fd = drained(s), drained(f)
        summary.add(f"backlog drain, {label}, {3 * k:,} events (events/s, median)",
                    fmt(sd), fmt(fd), ratio(sd, fd))  # fmt: skip
        sc = median(s.drain.cpu) if s and s.drain else None
        fc = median(f.drain.cpu) if f and f.drain else None
        summary.add(f"  monitor CPU % while draining, {label}", fmt(sc), fmt(fc), "-")

        def best(r: RunResult | None) -> tuple[str, float | None, float | None]:
            if r is None or not r.steps:
                return "-", None, None
            b = r.best
            if b is None:
                return f"< {r.steps[0].rate:,}", None, None
            top = b is r.steps[-1] and b.rate == args.rates[-1]
            return (f">= {b.rate:,}" if top else f"{b.rate:,}"), float(b.rate), b.cpu

        sl, sv, sc = best(s)
        fl, fv, fc = best(f)
        summary.add(f"sustained, lag <= {args.max_lag:g} s, {label} (events/s)", sl, fl,
                    ratio(sv, fv))  # fmt: skip
        summary.add(f"  monitor CPU % at that rate, {label}", fmt(sc), fmt(fc), "-")
        if sv and fv and sc and fc:
            summary.add(f"  events per CPU-second, {label}", sv / sc * 100, fv / fc * 100,
                        ratio(sv / sc, fv / fc))  # fmt: skip

        def lost(r: RunResult | None) -> str:
            if r is None:
                return "-"
            n = (r.drain.lost_tasks_est if r.drain else 0) + sum(x.lost_tasks_est for x in r.steps)
            disc = (r.drain.disconnects if r.drain else 0) + sum(x.disconnects for x in r.steps)
            return f"{3 * n:,} ({disc} disc.)"

        summary.add(f"events lost (est., all phases), {label}", lost(s), lost(f), "-")
        for r in (s, f):
            if r and r.error:
                summary.notes.append(f"{r.kind}/{r.mode}: {r.error}")
    others = [x for r in results if r.drain for x in r.drain.other]
    others += [st.other_cpu for r in results for st in r.steps]
    if others:
        summary.notes.append(f"CPU used by other processes during the measurements: median "
                             f"{median(others):.0f}%, max {max(others):.0f}% (200% = both "
                             "cores)")  # fmt: skip
    if psutil is None:
        summary.notes.append("psutil is not installed: no CPU figures")
    summary.notes.append("ratio: Stamen / Flower (higher is better for Stamen). 2 cores: the "
                         "publisher and Redis share them with the monitor.")  # fmt: skip
    summary.print()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default="redis://127.0.0.1:6379/10")
    p.add_argument("--monitors", default="stamen,flower")
    p.add_argument("--modes", default="single,batch")
    p.add_argument("--quick", action="store_true", help="small sizes, < 2 minutes")
    p.add_argument("--max-tasks", type=int, default=100_000, help="--max_tasks of both")
    p.add_argument("--drain-tasks-single", type=int, default=None)
    p.add_argument("--drain-tasks-batch", type=int, default=None)
    p.add_argument("--drain-repeat", type=int, default=None)
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--rates", default=None, help="events/s steps, comma separated")
    p.add_argument("--step", type=float, default=None, help="seconds per rate step")
    p.add_argument("--catchup", type=float, default=None, help="max wait after a step")
    p.add_argument("--max-lag", type=float, default=2.0)
    p.add_argument(
        "--quiet-limit",
        type=float,
        default=40.0,
        help="before each measurement wait while other processes use more CPU %%",
    )
    p.add_argument("--quiet-wait", type=float, default=None, help="... but at most this long")
    p.add_argument("--extra-steps", type=int, default=0,
                   help="steps to try after the first failing one")  # fmt: skip
    args = p.parse_args()
    quick = args.quick
    defaults = {
        # Single messages are ~0.6 KB on the wire, batches ~9 KB for 24 events: the full
        # sizes stay well under Redis's 32 MB pub/sub buffer even if all of it waits there.
        "drain_tasks_single": 3000 if quick else 8000,
        "drain_tasks_batch": 5000 if quick else 15000,
        "drain_repeat": 1 if quick else 3,
        "rates": "2000,8000,32000" if quick else "2000,4000,8000,16000,32000,48000",
        "step": 3.0 if quick else 10.0,
        "catchup": 6.0 if quick else 15.0,
        "quiet_wait": 0.0 if quick else 10.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.rates = [int(r) for r in str(args.rates).split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    kinds = [k.strip() for k in args.monitors.split(",")]
    exit_on_sigterm()
    t0 = time.monotonic()
    results: list[RunResult] = []
    for i, mode in enumerate(args.modes):
        results += run_mode(mode, kinds, args, seed=1 + 10_000 * i)
    report(results, args)
    print(f"\n(total {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
