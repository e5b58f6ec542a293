"""How long a ``/metrics`` scrape takes with N tasks kept (default one million).

    python bench/metrics_scrape.py --tasks 1000000 [--reuse] [--scrapes 50]

The history is prefilled with Stamen's own ``Ingester``/``StoreWriter`` (``fill.py``), then
one :class:`stamen.metrics.Metrics` renders the exposition text repeatedly, in process (no
HTTP, so the figure is the metrics work itself). Printed: the first scrape (the only one
that waits for the tasks-by-state GROUP BY), scrapes as Prometheus sees them (the counts
refreshed in the background), scrapes while a refresh runs all the time (the worst case
for GIL contention), and the GROUP BY alone, the only part that grows with the history.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fill import RESULTS, prefill_stamen_db


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(label: str, seconds: list[float]) -> None:
    ms = [s * 1000 for s in seconds]
    print(
        f"{label:<28} n={len(ms):<4} median={statistics.median(ms):8.2f} ms  "
        f"p95={percentile(ms, 0.95):8.2f} ms  max={max(ms):8.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=None, help="default bench/results/...")
    parser.add_argument("--reuse", action="store_true", help="keep an existing database")
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between scrapes")
    args = parser.parse_args()

    import stamen.metrics as metrics_module
    from celery import Celery
    from stamen.config import Settings
    from stamen.metrics import Metrics
    from stamen.services import Services

    db = args.db or RESULTS / f"metrics-{args.tasks}.sqlite3"
    if not (args.reuse and db.exists()):
        took = prefill_stamen_db(db, args.tasks)
        print(f"prefilled {args.tasks} tasks in {took:.0f} s -> {db}")
    settings = dataclasses.replace(
        Settings(), persistent=True, db=str(db), max_tasks=args.tasks, enable_events=False
    )
    services = Services(settings, Celery("bench", broker="memory://"), ingest=False)
    try:
        metrics = Metrics(services)
        print(f"tasks kept: {services.reader.task_count()}")
        t0 = time.perf_counter()
        text = metrics.render()
        first = time.perf_counter() - t0
        lines = text.count(b"\n")
        print(f"exposition: {len(text)} bytes, {lines} lines")
        print(f"first scrape (waits for the state counts): {first * 1000:.1f} ms")

        def series(label: str) -> None:
            times = []
            for _ in range(args.scrapes):
                t0 = time.perf_counter()
                metrics.render()
                times.append(time.perf_counter() - t0)
                time.sleep(args.interval)
            report(label, times)

        series("scrape, default")
        collector = metrics.collector
        print(f"state counts refreshed every {collector._states_ttl:.1f} s")
        # Worst case: a state refresh starts at every scrape and competes for the GIL.
        metrics_module.STATE_CACHE_SECONDS = 0.0
        metrics_module.STATE_COST_FACTOR = 0.0
        collector._states_ttl = 0.0
        series("scrape, refresh always busy")

        conn = services.reader.conn
        group_by = []
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            conn.execute(
                "SELECT state, count(*) FROM tasks INDEXED BY tasks_by_state "
                "GROUP BY state COLLATE NOCASE"
            ).fetchall()
            group_by.append(time.perf_counter() - t0)
        report("tasks-by-state GROUP BY", group_by)
    finally:
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
