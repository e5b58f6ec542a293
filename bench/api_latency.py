"""``GET /api/tasks?limit=100`` latency with many tasks kept, Stamen vs Flower 2.2.0.

    python bench/api_latency.py --quick     # Stamen 10k/100k, Flower 10k; < 2 min
    python bench/api_latency.py             # Stamen 10k/100k/1M, Flower 10k/100k; ~10 min

Four queries: plain, ``&state=FAILURE`` (2% of the tasks failed), ``&search=umbrella``
(a word in the args and result of 1 task in 8) and ``&search=customer`` (in nearly every
task). Each is timed sequentially (median and p95
of N requests on one keep-alive connection) and with 16 concurrent clients (one thread and
connection each; per-request median and p95, and requests/s overall).

Stamen is filled by writing its SQLite history with its own ``Ingester`` + ``StoreWriter``
(``bench/fill.py``), then started with ``--persistent=True --db=<file>``. Flower can only
ingest through the broker (a few thousand events/s, ~7.4 KB of memory per task), so it is
filled through Redis with flow control and measured at 10k and 100k tasks: 1M tasks would
take it ~45 minutes and ~7 GB, out of reach of a bounded run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fill import RESULTS, fill_via_broker, prefill_stamen_db
from flower_env import Monitor, start_monitor
from harness import Table, exit_on_sigterm, fmt, median, percentile, ratio, sizes

QUERIES = {
    "plain": "/api/tasks?limit=100",
    "state=FAILURE": "/api/tasks?limit=100&state=FAILURE",
    "search=umbrella": "/api/tasks?limit=100&search=umbrella",
    "search=customer": "/api/tasks?limit=100&search=customer",
}


@dataclass
class Timing:
    seq: list[float] = field(default_factory=list)  # seconds
    conc: list[float] = field(default_factory=list)
    conc_wall: float = 0.0
    rows: int = -1  # tasks in the answer
    errors: int = 0


def sequential(url: str, n: int, budget: float, timing: Timing) -> None:
    deadline = time.monotonic() + budget
    with httpx.Client(timeout=120.0) as client:
        for i in range(n + 1):
            t0 = time.perf_counter()
            try:
                r = client.get(url)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            dt = time.perf_counter() - t0
            if not ok:
                timing.errors += 1
            elif i == 0:
                timing.rows = len(r.json())  # the first request warms caches: not counted
            else:
                timing.seq.append(dt)
            if time.monotonic() > deadline:
                break


def concurrent(url: str, clients: int, per_client: int, budget: float, timing: Timing) -> None:
    deadline = time.monotonic() + budget
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=120.0) as client:
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                try:
                    ok = client.get(url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        timing.conc.append(dt)
                    else:
                        timing.errors += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(budget + 130)
    timing.conc_wall = time.perf_counter() - t0


def measure(monitor: Monitor, args: argparse.Namespace) -> dict[str, Timing]:
    out: dict[str, Timing] = {}
    for name, path in QUERIES.items():
        timing = Timing()
        sequential(monitor.url + path, args.requests, args.budget, timing)
        concurrent(monitor.url + path, args.clients, args.per_client, args.budget, timing)
        out[name] = timing
        print(f"    {monitor.kind:6s} {name:16s} rows {timing.rows:3d}: "
              f"seq median {fmt(median(timing.seq) * 1e3)} ms p95 "
              f"{fmt(percentile(timing.seq, 95) * 1e3)} ms (n={len(timing.seq)}); "
              f"{args.clients} clients median {fmt(median(timing.conc) * 1e3)} ms p95 "
              f"{fmt(percentile(timing.conc, 95) * 1e3)} ms (n={len(timing.conc)}), "
              f"errors {timing.errors}", flush=True)  # fmt: skip
    return out


def stamen_run(size: int, args: argparse.Namespace) -> dict[str, Timing]:
    db = RESULTS / f"stamen-{size}.sqlite3"
    if args.reuse and db.exists():
        print(f"  stamen {size:,}: reusing {db}", flush=True)
    else:
        print(f"  stamen {size:,}: prefilling {db.name} ...", flush=True)
        seconds = prefill_stamen_db(db, size)
        print(f"    {size:,} tasks written in {seconds:.0f} s "
              f"({db.stat().st_size / 1e6:,.0f} MB)", flush=True)  # fmt: skip
    monitor = start_monitor(
        "stamen",
        args.broker,
        max_tasks=size,
        extra=["--persistent=True", f"--db={db}"],
        ready_timeout=120,
    )
    try:
        return measure(monitor, args)
    finally:
        monitor.stop()


def flower_run(size: int, args: argparse.Namespace) -> tuple[dict[str, Timing], str]:
    print(f"  flower {size:,}: filling through the broker ...", flush=True)
    monitor = start_monitor("flower", args.broker, max_tasks=size)
    try:
        fill = fill_via_broker(monitor.url, args.broker, size, timeout=args.fill_timeout)
        note = (f"{fill.tasks:,} tasks through the broker in {fill.seconds:.0f} s "
                f"({fill.events_per_s:,.0f} events/s)")  # fmt: skip
        if not fill.complete:
            note += " - INCOMPLETE (timed out)"
        print(f"    {note}", flush=True)
        return measure(monitor, args), note
    finally:
        monitor.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default="redis://127.0.0.1:6379/12")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--stamen-sizes", default=None)
    p.add_argument("--flower-sizes", default=None)
    p.add_argument("--requests", type=int, default=None, help="sequential requests per query")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-client", type=int, default=None, help="requests per concurrent client")
    p.add_argument("--budget", type=float, default=None, help="max seconds per measurement")
    p.add_argument("--fill-timeout", type=float, default=400.0)
    p.add_argument("--reuse", action="store_true", help="reuse bench/results/stamen-N.sqlite3")
    args = p.parse_args()
    q = args.quick
    args.stamen_sizes = sizes(args.stamen_sizes, "10000,100000" if q else "10000,100000,1000000")
    args.flower_sizes = sizes(args.flower_sizes, "10000" if q else "10000,100000")
    exit_on_sigterm()
    args.requests = args.requests or (20 if q else 50)
    args.per_client = args.per_client or (3 if q else 5)
    args.budget = args.budget or (20.0 if q else 60.0)

    t0 = time.monotonic()
    stamen: dict[int, dict[str, Timing]] = {}
    flower: dict[int, dict[str, Timing]] = {}
    notes: list[str] = []
    for size in args.stamen_sizes:
        try:
            stamen[size] = stamen_run(size, args)
        except Exception as exc:
            notes.append(f"stamen {size:,}: {type(exc).__name__}: {exc}")
            print(f"    ERROR {notes[-1]}", flush=True)
    for size in args.flower_sizes:
        try:
            flower[size], note = flower_run(size, args)
            notes.append(f"flower {size:,}: {note}")
        except Exception as exc:
            notes.append(f"flower {size:,}: {type(exc).__name__}: {exc}")
            print(f"    ERROR {notes[-1]}", flush=True)

    table = Table(
        f"GET /api/tasks?limit=100 latency, ms (sequential n={args.requests}; "
        f"{args.clients} concurrent clients x {args.per_client})",
        ["query @ tasks kept", "Stamen", "Flower", "ratio"],
    )
    ms = 1e3
    for size in sorted(set(stamen) | set(flower)):
        for name in QUERIES:
            s, f = stamen.get(size, {}).get(name), flower.get(size, {}).get(name)
            for label, pick in (
                ("median", lambda t: median(t.seq) * ms),
                ("p95", lambda t: percentile(t.seq, 95) * ms),
                (f"{args.clients} clients median", lambda t: median(t.conc) * ms),
                (f"{args.clients} clients p95", lambda t: percentile(t.conc, 95) * ms),
            ):
                sv = pick(s) if s else None
                fv = pick(f) if f else None
                flower_cell = fmt(fv) if f else ("out of reach" if size > 100_000 else "-")
                table.add(f"{name} @ {size:,}, {label}", fmt(sv), flower_cell,
                          ratio(sv, fv, higher_is_better=False))  # fmt: skip
            rows = f"rows: Stamen {s.rows if s else '-'}, Flower {f.rows if f else '-'}"
            errors = (s.errors if s else 0) + (f.errors if f else 0)
            table.add(f"{name} @ {size:,}, {rows}", "", "", f"err {errors}" if errors else "")
    table.notes += notes
    table.notes.append("ratio: how many times faster Stamen answers (Flower ms / Stamen ms).")
    table.notes.append("Flower at 1,000,000 tasks: out of reach in a bounded run (~45 min of "
                       "ingest through the broker and ~7 GB of memory).")  # fmt: skip
    table.print()
    print(f"\n(total {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
