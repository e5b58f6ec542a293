"""Server time of every page and API endpoint with a large history (issue 4, issue 2).

    python bench/pages.py                          # 1M tasks, 200 workers (fills once, ~6+ min)
    python bench/pages.py --tasks 20000 --requests 10        # a quick look
    python bench/pages.py --db bench/results/pages-1000000-200.sqlite3 --requests 50

The history is written by Stamen's own ingest (``Ingester`` merging, ``StoreWriter``
writing, FTS index and all) from Celery-shaped event dicts, as ``tests/factories.py`` and
``bench/fill.py`` make them, but richer: ~30 task types, 200 worker hostnames with
heartbeats, SUCCESS/FAILURE/RETRY/REVOKED outcomes (tracebacks on failures and retries),
a few tasks still running, and chains of 2-5 tasks with parent/root ids. The file is cached
under ``bench/results/`` (git-ignored) and reused while it exists (``--rebuild`` refills).

Stamen then runs on it (``--persistent=True --db=...``, unauthenticated API, a Redis broker
nobody publishes to, so nothing is written while measuring) and each endpoint is requested
``--requests`` times in a row over one keep-alive loopback connection, after ``--warmup``
unmeasured requests. Client-side wall time is the server time plus loopback. The bar is
300 ms for pages and 20 ms for ``/api/tasks?limit=100`` (median); RSS after all requests
is compared with 200 MB.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fill import _event
from flower_env import free_port
from harness import OtherCpu, Table, exit_on_sigterm, median, percentile

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE_BAR_MS = 300.0
API_BAR_MS = 20.0
RSS_BAR_MB = 200.0
SEARCH_TERM = "umbrella"

MODULES = ("orders", "billing", "mail", "reports", "images", "search", "sync", "users")
VERBS = ("process", "refresh", "send", "render", "import", "export", "index", "notify")
TASK_TYPES = [f"shop.{m}.{v}" for m in MODULES for v in VERBS][:30]
CUSTOMERS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell",
             "cyberdyne", "soylent", "vandelay", "wonka")  # fmt: skip
EXCEPTIONS = (
    ("ValueError", "order {o} has no lines"),
    ("KeyError", "'customer'"),
    ("TimeoutError", "upstream took longer than 30s"),
    ("ConnectionError", "db-{o}: connection reset by peer"),
    ("PermissionError", "user {o} may not do that"),
)
SW = {"sw_ident": "py-celery", "sw_ver": "5.4.0", "sw_sys": "Linux"}


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _traceback(name: str, exc: str, msg: str) -> str:
    func = name.rsplit(".", 1)[1]
    return (
        "Traceback (most recent call last):\n"
        '  File "/app/.venv/lib/python3.12/site-packages/celery/app/trace.py", line 453, '
        "in trace_task\n"
        "    R = retval = fun(*args, **kwargs)\n"
        '  File "/app/.venv/lib/python3.12/site-packages/celery/app/trace.py", line 736, '
        "in __protected_call__\n"
        "    return self.run(*args, **kwargs)\n"
        f'  File "/app/shop/{name.split(".")[1]}.py", line {80 + len(func)}, in {func}\n'
        f"    raise {exc}(...)\n"
        f"{exc}: {msg}\n"
    )


class History:
    """Celery-shaped events of ``tasks`` tasks on ``workers`` hosts over ``span_s`` seconds."""

    def __init__(self, tasks: int, workers: int, span_s: float, seed: int = 4) -> None:
        self.rng = random.Random(seed)
        self.tasks = tasks
        self.hostnames = [f"celery@worker-{i + 1:03d}.prod.internal" for i in range(workers)]
        self.pids = {h: 20_000 + i for i, h in enumerate(self.hostnames)}
        self.span_s = span_s
        self.now = time.time()
        self.clock = 0
        self.roots: list[str] = []  # roots of chains, to measure /workflow
        self.sample: list[str] = []  # some uuids, to measure /task and /api/task/info

    def _ev(self, host: str, kind: str, ts: float, fields: dict[str, Any]) -> dict[str, Any]:
        self.clock += 1
        return _event(host, self.pids[host], self.clock, kind, ts, fields)

    def events(self) -> Iterator[dict[str, Any]]:
        rng = self.rng
        start = self.now - self.span_s
        step = self.span_s / max(self.tasks, 1)
        for h in self.hostnames:
            yield self._ev(h, "worker-online", start,
                           {"freq": 2.0, "active": 0, "processed": 0,
                            "loadavg": [0.1, 0.1, 0.1], **SW})  # fmt: skip
        i = 0
        chain: list[str] = []  # [root, parent] while a chain is being made
        chain_left = 0
        while i < self.tasks:
            ts = start + i * step
            uuid = _uuid(rng)
            if chain_left == 0 and rng.random() < 0.05:
                chain_left = rng.randint(2, 5)
                chain = []
            root_id, parent_id = uuid, None
            if chain_left:
                if chain:
                    root_id, parent_id = chain[0], chain[-1]
                else:
                    self.roots.append(uuid)
                chain.append(uuid)
                chain_left -= 1
            if i % 997 == 0:
                self.sample.append(uuid)
            name = TASK_TYPES[min(int(rng.expovariate(1 / 6)), len(TASK_TYPES) - 1)]
            host = self.hostnames[rng.randrange(len(self.hostnames))]
            customer = rng.choice(CUSTOMERS)
            order = rng.randrange(1, 10_000_000)
            runtime = round(rng.lognormvariate(-2.5, 1.2), 6)
            args = f"({order}, '{customer}-{rng.randrange(1000):03d}', {rng.random() < 0.5})"
            source = rng.choice(("api", "cron", "web", "admin"))
            kwargs = f"{{'priority': {rng.randrange(10)}, 'source': '{source}', 'dry_run': False}}"
            yield self._ev(host, "task-received", ts,
                           {"uuid": uuid, "name": name, "args": args, "kwargs": kwargs,
                            "root_id": root_id, "parent_id": parent_id, "retries": 0,
                            "eta": None, "expires": None})  # fmt: skip
            roll = rng.random()
            late = i >= self.tasks - 50
            if late and roll < 0.5:  # the newest few are still queued or running
                if roll < 0.25:
                    yield self._ev(host, "task-started", ts + 0.001, {"uuid": uuid})
                i += 1
                continue
            if roll < 0.01:  # revoked before it started
                yield self._ev(host, "task-revoked", ts + 0.01,
                               {"uuid": uuid, "terminated": False, "signum": None,
                                "expired": False})  # fmt: skip
                i += 1
                continue
            yield self._ev(host, "task-started", ts + 0.001, {"uuid": uuid})
            end = ts + 0.001 + runtime
            if roll < 0.05:  # failed (4%)
                exc, msg = EXCEPTIONS[rng.randrange(len(EXCEPTIONS))]
                msg = msg.format(o=order)
                yield self._ev(host, "task-failed", end,
                               {"uuid": uuid, "exception": f"{exc}({msg!r})",
                                "traceback": _traceback(name, exc, msg)})  # fmt: skip
            elif roll < 0.07:  # retried, the retry not yet back (2%)
                exc, msg = EXCEPTIONS[2]
                yield self._ev(host, "task-retried", end,
                               {"uuid": uuid, "exception": f"Retry in 60s: {exc}({msg!r})",
                                "traceback": _traceback(name, exc, msg)})  # fmt: skip
            else:
                result = (f"{{'order': {order}, 'status': 'ok', 'customer': '{customer}', "
                          f"'lines': {rng.randrange(1, 40)}}}")  # fmt: skip
                yield self._ev(host, "task-succeeded", end,
                               {"uuid": uuid, "result": result, "runtime": runtime})  # fmt: skip
            i += 1
        # 20 heartbeats per worker over the last 40 s (Celery keeps the last 20).
        for k in range(20):
            for n, h in enumerate(self.hostnames):
                yield self._ev(h, "worker-heartbeat", self.now - 40 + 2 * k,
                               {"freq": 2.0, "active": rng.randrange(4),
                                "processed": self.tasks // len(self.hostnames) + n + k,
                                "loadavg": [0.42, 0.37, 0.31], **SW})  # fmt: skip


def build(path: Path, tasks: int, workers: int, span_s: float) -> dict[str, Any]:
    """Fill ``path`` with Stamen's own ingest; returns what the measurement needs."""
    from stamen.events.ingest import Ingester
    from stamen.store.writer import StoreWriter

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    writer = StoreWriter(path, max_tasks=max(tasks, 1), max_workers=max(workers, 1) + 10)
    ingester = Ingester(writer)
    history = History(tasks, workers, span_s)
    events = 0
    for event in history.events():
        ingester.add(event)
        events += 1
        if len(ingester.pending) >= 5000:
            ingester.flush()
            if events % 500_000 < 5000:
                print(f"    fill: {events:,} events, {time.monotonic() - t0:.0f} s", flush=True)
    ingester.flush()
    writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.close()
    seconds = time.monotonic() - t0
    print(f"filled {tasks:,} tasks / {workers} workers ({events:,} events) in {seconds:.0f} s "
          f"({events / seconds:,.0f} events/s), {path.stat().st_size / 1e6:,.0f} MB",
          flush=True)  # fmt: skip
    return {"seconds": seconds, "events": events}


def pick_ids(path: Path) -> dict[str, str]:
    """A mid-history task, a failure and a chain root with its children, from the file."""
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (n,) = conn.execute("SELECT count(*) FROM tasks").fetchone()
        (mid,) = conn.execute("SELECT uuid FROM tasks WHERE id = ?",
                              (conn.execute("SELECT max(id) FROM tasks").fetchone()[0] // 2,)
                              ).fetchone()  # fmt: skip
        (failed,) = conn.execute(
            "SELECT uuid FROM tasks WHERE state = 'FAILURE' ORDER BY timestamp DESC LIMIT 1"
        ).fetchone()
        row = conn.execute(
            "SELECT root_id, count(*) FROM tasks WHERE parent_id IS NOT NULL "
            "AND id > (SELECT max(id) FROM tasks) / 2 GROUP BY root_id LIMIT 1"
        ).fetchone()
        root = row[0] if row else mid
        (w,) = conn.execute("SELECT count(*) FROM workers").fetchone()
    finally:
        conn.close()
    return {"task": mid, "failed": failed, "root": root, "count": str(n), "workers": str(w)}


def rss_mb(pid: int) -> tuple[float, float]:
    """(RSS, RSS less file-backed pages) in MB, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("RssAnon", 0.0)


def endpoints(ids: dict[str, str]) -> list[tuple[str, str, float]]:
    """(label, path, bar in ms) of everything measured."""

    def dt(search: str = "", **extra: Any) -> str:
        params = {
            "draw": 1, "start": 0, "length": 15, "order[0][column]": 3, "order[0][dir]": "desc",
            "search[value]": search,
            **{f"columns[{i}][data]": c for i, c in enumerate(
                ("name", "uuid", "state", "received", "args", "kwargs", "result", "started",
                 "runtime", "worker"))},
            **extra,
        }  # fmt: skip
        return "/tasks/datatable?" + urlencode(params)

    out: list[tuple[str, str, float]] = [
        ("/", "/", PAGE_BAR_MS),
        ("/workers", "/workers", PAGE_BAR_MS),
        ("/workers?json=1", "/workers?json=1", PAGE_BAR_MS),
        ("/tasks", "/tasks", PAGE_BAR_MS),
        ("/tasks/datatable (received desc)", dt(), PAGE_BAR_MS),
        (f"/tasks/datatable search={SEARCH_TERM}", dt(SEARCH_TERM), PAGE_BAR_MS),
        ("/tasks/datatable search=state:FAILURE", dt("state:FAILURE"), PAGE_BAR_MS),
        ("/tasks/datatable page 1000", dt(start=15_000), PAGE_BAR_MS),
        ("/task/<id>", f"/task/{ids['task']}", PAGE_BAR_MS),
        ("/task/<failed id>", f"/task/{ids['failed']}", PAGE_BAR_MS),
        ("/broker", "/broker", PAGE_BAR_MS),
        ("/charts", "/charts", PAGE_BAR_MS),
    ]
    out += [(f"/charts/data?range={r}", f"/charts/data?range={r}", PAGE_BAR_MS)
            for r in ("15m", "1h", "1d", "1w")]  # fmt: skip
    out += [
        ("/failures (1d)", "/failures", PAGE_BAR_MS),
        ("/failures?range=1w", "/failures?range=1w", PAGE_BAR_MS),
        ("/workflow/<root id>", f"/workflow/{ids['root']}", PAGE_BAR_MS),
        ("/api/tasks?limit=100", "/api/tasks?limit=100", API_BAR_MS),
        ("/api/tasks?limit=100&state=FAILURE", "/api/tasks?limit=100&state=FAILURE", API_BAR_MS),
        (f"/api/tasks?limit=100&search={SEARCH_TERM}",
         f"/api/tasks?limit=100&search={SEARCH_TERM}", API_BAR_MS),
        ("/api/tasks?limit=100&sort_by=-received", "/api/tasks?limit=100&sort_by=-received",
         API_BAR_MS),
        ("/api/tasks?limit=100&offset=500000", "/api/tasks?limit=100&offset=500000",
         PAGE_BAR_MS),
        ("/api/task/info/<id>", f"/api/task/info/{ids['task']}", PAGE_BAR_MS),
        ("/api/workers?refresh=0", "/api/workers", PAGE_BAR_MS),
        ("/metrics", "/metrics", PAGE_BAR_MS),
    ]  # fmt: skip
    return out


def start_stamen(db: Path, port: int, broker: str, max_tasks: int) -> subprocess.Popen:
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    cmd = [sys.executable, "-m", "stamen", "--persistent=True", f"--db={db}",
           f"--port={port}", "--address=127.0.0.1", f"--broker={broker}",
           f"--max_tasks={max_tasks}", "--logging=warning"]  # fmt: skip
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"stamen exited with {proc.returncode}:\n{err[-3000:]}")
        try:
            if httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("stamen did not become ready")


def measure(base: str, eps: list[tuple[str, str, float]], n: int, warmup: int,
            only: str | None) -> list[tuple[str, list[float], float, int, int]]:  # fmt: skip
    import httpx

    results = []
    with httpx.Client(base_url=base, timeout=120.0) as client:
        for label, path, bar in eps:
            if only and only not in label:
                continue
            status = 0
            size = 0
            for _ in range(warmup):
                client.get(path)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                r = client.get(path)
                times.append((time.perf_counter() - t) * 1000)
                status, size = r.status_code, len(r.content)
            results.append((label, times, bar, status, size))
            med, p95 = median(times), percentile(times, 95)
            print(f"  {label:<46} median {med:8.1f} ms  p95 {p95:8.1f} ms  [{status}, {size:,} B]",
                  flush=True)  # fmt: skip
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=200)
    p.add_argument(
        "--span",
        type=float,
        default=86_400.0,
        help="seconds the history covers, ending now (default a day)",
    )
    p.add_argument("--db", type=Path, help="history file (default bench/results/"
                   "pages-<tasks>-<workers>.sqlite3); reused when it exists")  # fmt: skip
    p.add_argument("--rebuild", action="store_true", help="refill the history file")
    p.add_argument("--fill-only", action="store_true")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", help="measure only endpoints whose label contains this")
    p.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    args = p.parse_args()
    exit_on_sigterm()

    db = args.db or RESULTS / f"pages-{args.tasks}-{args.workers}.sqlite3"
    if args.rebuild or not db.exists():
        build(db, args.tasks, args.workers, args.span)
    if args.fill_only:
        return 0
    ids = pick_ids(db)
    print(f"history {db}: {int(ids['count']):,} tasks, {ids['workers']} workers, "
          f"{db.stat().st_size / 1e6:,.0f} MB", flush=True)  # fmt: skip

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_stamen(db, port, args.broker, max(int(ids["count"]), args.tasks) + 1000)
    try:
        wait_ready(base, proc)
        rss0, anon0 = rss_mb(proc.pid)
        noise = OtherCpu(os.getpid(), proc.pid)
        results = measure(base, endpoints(ids), args.requests, args.warmup, args.only)
        other = noise.stop()
        rss1, anon1 = rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()

    table = Table(
        f"Server time with {int(ids['count']):,} tasks / {ids['workers']} workers "
        f"({args.requests} sequential requests each, keep-alive loopback)",
        ["endpoint", "median ms", "p95 ms", "bar ms", "result"],
    )
    failed = 0
    for label, times, bar, status, _size in results:
        ok = status == 200 and median(times) < bar and percentile(times, 95) < PAGE_BAR_MS
        failed += not ok
        verdict = ("pass" if ok else "FAIL") + ("" if status == 200 else f" ({status})")
        table.add(label, median(times), percentile(times, 95), bar, verdict)
    table.add("RSS after the requests (MB)", rss1, "", RSS_BAR_MB,
              "pass" if rss1 < RSS_BAR_MB else "FAIL")  # fmt: skip
    table.notes += [
        f"RSS at start {rss0:.0f} MB (anon {anon0:.0f}); after {rss1:.0f} MB "
        f"(anon {anon1:.0f}, the rest is mapped SQLite pages)",
        "pass: status 200, median under the bar and p95 under 300 ms",
        f"other processes used {other:.0f}% CPU (100 = one core of 2) while measuring",
    ]
    table.print()
    return 1 if failed or rss1 >= RSS_BAR_MB else 0


if __name__ == "__main__":
    sys.exit(main())
