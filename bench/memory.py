"""Memory of the monitor process with N tasks kept, Stamen vs Flower 2.2.0.

    python bench/memory.py --quick      # Stamen 10k/100k, Flower 10k; < 2 min
    python bench/memory.py              # Stamen 10k/100k/1M, Flower 10k/100k; ~8 min

Each monitor starts fresh with ``--max_tasks=N`` and ingests N tasks through the broker
(24 events a message, as workers send them, with flow control so nothing is lost); RSS is
read once the last task shows up and 16 concurrent clients were served ``/api/tasks?limit=100``
pages (plain, ``state=FAILURE``, two search terms) 12 times each.
``anon`` is RSS less file-backed pages (shared libraries; earlier Stamen versions also
memory-mapped the SQLite file).

Stamen at 1M tasks: by default its database is prefilled with 1M tasks by its own ingest
code (``bench/fill.py``), Stamen starts on it, and then ingests 20k more tasks through the
broker before it is measured (``--stamen-1m-broker`` ingests all 1M through the broker
instead: ~3M events, several minutes). Flower at 1M would need ~45 min and ~7 GB.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fill import RESULTS, fill_via_broker, prefill_stamen_db
from flower_env import Monitor, psutil, start_monitor
from harness import Table, exit_on_sigterm, fmt, ratio, sizes

TOP_UP = 20_000  # tasks ingested through the broker on top of a prefilled database


#: What the concurrent clients ask for: every kind of list page the latency bench times.
QUERIES = (
    "/api/tasks?limit=100",
    "/api/tasks?limit=100&state=FAILURE",
    "/api/tasks?limit=100&search=umbrella",
    "/api/tasks?limit=100&search=customer",
)
CLIENTS = 16  # concurrent clients: the web server runs each on a thread (and connection)


def settle(monitor: Monitor) -> dict[str, float] | None:
    """Serve list requests from ``CLIENTS`` concurrent clients (each reader thread opens its
    own database connection, so this is where memory per thread shows), wait a moment,
    read memory."""

    def client_run(i: int) -> None:
        with httpx.Client(base_url=monitor.url, timeout=120.0) as client:
            for n in range(3 * len(QUERIES)):
                client.get(QUERIES[(i + n) % len(QUERIES)])

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client_run, range(CLIENTS)))
    time.sleep(1.0)
    return monitor.memory()


def measure(kind: str, size: int, args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"size": size}
    extra: list[str] = []
    prefilled = kind == "stamen" and size > 100_000 and not args.stamen_1m_broker
    if prefilled:
        db = RESULTS / f"stamen-{size}.sqlite3"
        if not (args.reuse and db.exists()):
            print(f"  stamen {size:,}: prefilling {db.name} ...", flush=True)
            prefill_stamen_db(db, size)
        extra = ["--persistent=True", f"--db={db}"]
    monitor = start_monitor(kind, args.broker, max_tasks=size, extra=extra, ready_timeout=120)
    try:
        out["idle"] = monitor.memory()
        n = TOP_UP if prefilled else size
        print(f"  {kind} {size:,}: ingesting {n:,} tasks through the broker ...", flush=True)
        fill = fill_via_broker(monitor.url, args.broker, n, timeout=args.fill_timeout,
                               seed=size + (1 if kind == "flower" else 2))  # fmt: skip
        out["fill"] = fill
        out["mem"] = settle(monitor)
        how = f"prefilled + {n:,} via broker" if prefilled else f"{n:,} via broker"
        out["how"] = how
        mem = out["mem"] or {}
        print(f"    {kind} {size:,} ({how}): {fill.events_per_s:,.0f} events/s"
              f"{'' if fill.complete else ' INCOMPLETE'}; RSS {fmt(mem.get('rss'))} MB, "
              f"anon {fmt(mem.get('anon'))} MB", flush=True)  # fmt: skip
    finally:
        monitor.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default="redis://127.0.0.1:6379/13")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--stamen-sizes", default=None)
    p.add_argument("--flower-sizes", default=None)
    p.add_argument("--stamen-1m-broker", action="store_true",
                   help="ingest Stamen's 1M tasks through the broker too")  # fmt: skip
    p.add_argument("--fill-timeout", type=float, default=400.0)
    p.add_argument("--reuse", action="store_true", help="reuse bench/results/stamen-N.sqlite3")
    args = p.parse_args()
    q = args.quick
    stamen_sizes = sizes(args.stamen_sizes, "10000,100000" if q else "10000,100000,1000000")
    flower_sizes = sizes(args.flower_sizes, "10000" if q else "10000,100000")
    exit_on_sigterm()
    if psutil is None:
        print("psutil is required: pip install psutil")
        return 2
    t0 = time.monotonic()
    results: dict[tuple[str, int], dict[str, object]] = {}
    notes: list[str] = []
    for kind, kind_sizes in (("stamen", stamen_sizes), ("flower", flower_sizes)):
        for size in kind_sizes:
            try:
                results[(kind, size)] = measure(kind, size, args)
            except Exception as exc:
                notes.append(f"{kind} {size:,}: {type(exc).__name__}: {exc}")
                print(f"    ERROR {notes[-1]}", flush=True)

    table = Table("Monitor memory after ingest, MB (process tree)",
                  ["figure", "Stamen", "Flower", "ratio"])  # fmt: skip

    def get(kind: str, size: int, key: str, part: str) -> float | None:
        r = results.get((kind, size))
        mem = r.get(key) if r else None
        return mem.get(part) if isinstance(mem, dict) else None

    all_sizes = sorted(set(stamen_sizes) | set(flower_sizes))
    for part in ("rss", "anon"):
        s = get("stamen", min(stamen_sizes, default=0), "idle", part)
        f = get("flower", min(flower_sizes, default=0), "idle", part)
        table.add(f"{part.upper() if part == 'rss' else part} at start (0 tasks)", fmt(s),
                  fmt(f), ratio(s, f, higher_is_better=False))  # fmt: skip
    for size in all_sizes:
        for part in ("rss", "anon"):
            s, f = get("stamen", size, "mem", part), get("flower", size, "mem", part)
            fcell = fmt(f) if f is not None else ("out of reach" if size > 100_000 else "-")
            table.add(f"{part.upper() if part == 'rss' else part} with {size:,} tasks", fmt(s),
                      fcell, ratio(s, f, higher_is_better=False))  # fmt: skip
        s_rss = get("stamen", size, "mem", "rss")
        f_rss = get("flower", size, "mem", "rss")
        s0, f0 = get("stamen", size, "idle", "rss"), get("flower", size, "idle", "rss")
        kb = [(m - z) * 1e3 / size if m is not None and z is not None else None
              for m, z in ((s_rss, s0), (f_rss, f0))]  # fmt: skip
        if "prefilled" in str(results.get(("stamen", size), {}).get("how")):
            kb[0] = None  # it started with the tasks already kept: growth means nothing
        table.add(f"  KB per task kept (RSS growth), {size:,}", fmt(kb[0]), fmt(kb[1]),
                  ratio(kb[0], kb[1], higher_is_better=False))  # fmt: skip
        fills = [results.get((k, size), {}).get("fill") for k in ("stamen", "flower")]
        rates = [x.events_per_s if x is not None else None for x in fills]
        table.add(f"  ingest while filling to {size:,} (events/s)", fmt(rates[0]), fmt(rates[1]),
                  ratio(rates[0], rates[1]))  # fmt: skip
    for (kind, size), r in sorted(results.items()):
        fill = r.get("fill")
        if fill is not None and not fill.complete:
            notes.append(f"{kind} {size:,}: fill INCOMPLETE after {fill.seconds:.0f} s")
        if kind == "stamen" and "prefilled" in str(r.get("how")):
            notes.append(f"stamen {size:,}: {r['how']}; its ingest rate is over those only")
    table.notes += notes
    table.notes.append(
        "ratio: how many times less memory Stamen uses (Flower / Stamen); ingest "
        "ratio: Stamen / Flower. Fills use flow control on the pub/sub backlog."
    )
    table.print()
    print(f"\n(total {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
