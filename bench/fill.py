"""Filling a monitor with N kept tasks: Stamen's SQLite file directly, or any monitor through
the broker at the speed it ingests.

    python bench/fill.py --db bench/results/stamen-100000.sqlite3 --tasks 100000

``prefill_stamen_db`` runs Stamen's own ingest path (``Ingester`` merging, ``StoreWriter``
writing, FTS triggers and all) on the same synthetic event dicts a Celery receiver hands
Stamen, minus the broker; Stamen then starts on the file with ``--persistent=True``.
``fill_via_broker`` publishes through Redis with flow control on the monitor's pub/sub
backlog, so nothing is lost to the output buffer limit, and waits for the last task.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from events import LoadGenerator, Workload, redis_db
from harness import RedisWatch, TaskProbe, throttle_on_omem

RESULTS = Path(__file__).resolve().parent / "results"


def _event(hostname: str, pid: int, clock: int, kind: str, ts: float,
           fields: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """What Celery's EventReceiver hands a handler: the event plus ``local_received``."""
    return {"hostname": hostname, "utcoffset": 0, "pid": pid, "clock": clock, **fields,
            "timestamp": ts, "type": kind, "local_received": ts + 0.002}  # fmt: skip


def prefill_stamen_db(path: Path, tasks: int, *, span_s: float = 86_400.0, seed: int = 5,
                      batch_events: int = 5000, quiet: bool = False) -> float:  # fmt: skip
    """Write ``tasks`` finished tasks into a fresh Stamen database; returns seconds taken.

    Task times are spread evenly over the last ``span_s`` seconds, the newest ending now.
    """
    from stamen.events.ingest import Ingester
    from stamen.store.writer import StoreWriter

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    writer = StoreWriter(path, max_tasks=max(tasks, 1))
    ingester = Ingester(writer)
    workload = Workload(workers=4, seed=seed)
    now = time.time()
    step = span_s / max(tasks, 1)
    clock = 0
    for h in workload.hostnames:
        clock += 1
        kind, fields = workload.online()
        ingester.add(_event(h, workload.pids[h], clock, kind, now - span_s, fields))
    for i in range(tasks):
        task = workload.task()
        ts = now - span_s + i * step
        for j, (kind, fields) in enumerate(task.events):
            clock += 1
            at = ts + (0.0, 0.001, fields.get("runtime", 0.05) + 0.001)[j]
            ingester.add(_event(task.hostname, workload.pids[task.hostname], clock, kind, at,
                                fields))  # fmt: skip
        if len(ingester.pending) >= batch_events:
            ingester.flush()
        if not quiet and i and i % 100_000 == 0:
            print(f"    prefill: {i:,} tasks, {time.monotonic() - t0:.0f} s", flush=True)
    for h in workload.hostnames:
        clock += 1
        kind, fields = workload.heartbeat(h, tasks)
        ingester.add(_event(h, workload.pids[h], clock, kind, now, fields))
    ingester.flush()
    writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.close()
    return time.monotonic() - t0


@dataclass
class FillResult:
    tasks: int
    events: int
    seconds: float  # first publish until the last task showed final
    complete: bool
    last_uuid: str | None
    sample: list[str]

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def fill_via_broker(base_url: str, broker: str, tasks: int, *, mode: str = "batch",
                    seed: int = 11, timeout: float = 600.0, omem_limit: int = 4_000_000,
                    rate_cap: float = 0.0) -> FillResult:  # fmt: skip
    """Publish ``tasks`` tasks as fast as the monitor takes them; wait for the last one."""
    if tasks <= 0:
        raise ValueError("fill at least one task")
    watch = RedisWatch(broker, redis_db(broker))
    if not watch.wait_subscribed(30):
        raise RuntimeError("the monitor never subscribed to the events channel")
    gen = LoadGenerator(broker, mode=mode, seed=seed)
    try:
        stats = gen.run(
            tasks,
            rate=rate_cap,
            duration=timeout,
            keep_uuids=100,
            throttle=throttle_on_omem(watch, omem_limit, timeout),
        )
    finally:
        gen.close()
    probe = TaskProbe(base_url, timeout=60.0)
    try:
        done = probe.wait_final(stats.last_uuid, stats.started_at + timeout + 60, interval=0.1)
    finally:
        probe.close()
        watch.stop()
    end = done if done is not None else time.monotonic()
    return FillResult(stats.tasks, stats.events, end - stats.started_at, done is not None,
                      stats.last_uuid, stats.uuids)  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description="Prefill a Stamen database with synthetic tasks.")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--tasks", type=int, default=100_000)
    args = p.parse_args()
    seconds = prefill_stamen_db(args.db, args.tasks)
    size = args.db.stat().st_size / 1e6
    print(f"{args.tasks:,} tasks in {seconds:.1f} s ({3 * args.tasks / seconds:,.0f} events/s "
          f"through Ingester+StoreWriter), {size:,.0f} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
