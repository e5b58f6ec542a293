"""Stamen on PostgreSQL with millions of tasks kept: ingest rate, list-page latency over HTTP
and ingest takeover time (issue #6).

    python bench/pg_scale.py                    # 10M tasks: fill (10-20 min), then measure
    python bench/pg_scale.py --reuse            # measure the store filled by an earlier run
    python bench/pg_scale.py --tasks 1000000 --phases api

The store lives in its own schema (``--schema``, default ``stamen_bench``) of the server
``STAMEN_TEST_POSTGRES`` names (default: local, trust auth, database ``test``).
The fill runs on the server: ``INSERT ... SELECT generate_series`` in chunks, with the
tasks ``bench/events.py`` makes (8 task names, 4 workers, args/kwargs/results naming one
of 8 customers, 2% failures with a traceback), spread evenly over ``--span`` seconds (a
week) up to now. Stamen's own ``migrate`` makes the schema; the task table's indexes are
dropped for the bulk load and rebuilt from their own definitions, and the rollups, task
types and meta rows are made by the store's own functions, so a Stamen process started on
the schema sees the store an ingest writer would have left.

Then, each bounded in time:

* ``ingest``: new tasks through Stamen's ``Ingester`` and ``PostgresWriter`` (batches of
  5,000 events, as ``bench/fill.py``), into the full store: tasks/s and events/s.
* ``api``: a real ``python -m stamen --db=postgresql://...`` on the schema; sequential
  ``GET /api/tasks?limit=100`` plain, by state, by task name and searched (a rare term,
  terms matching ~12% and ~98% of tasks, a kwargs pair ~10% hold): median and p95.
* ``walk``: in-process, a kwargs-pair search page by the search walk and by the exact plan.
* ``takeover``: two Stamen processes on the schema; the leader (``stamen_ingest_leader``
  on ``/metrics``) is killed with SIGKILL; seconds until the other reports 1.

The schema is kept for ``--reuse`` unless ``--drop`` is given; its size is printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from events import CUSTOMERS, FAIL_EVERY, TASK_NAMES, Workload
from fill import _event

ROOT = Path(__file__).resolve().parent.parent
SERVER = os.environ.get("STAMEN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
HOSTNAMES = [f"celery@bench-worker-{i + 1}" for i in range(4)]
KWARGS = "{'priority': %s, 'source': 'api', 'retry': False}"

# One chunk of the fill, all on the server. md5(i) and md5(-i) give each task its uuid and
# its pseudo-random order number, customer, priority and runtime, so a fill is repeatable.
_FILL_SQL = """
INSERT INTO tasks (id, uuid, name, state, received, started, succeeded, failed, args,
                   kwargs, retries, worker, result, exception, timestamp, runtime,
                   traceback, clock, root_id, parent_id, seq, kwargs_pairs)
SELECT i, u, name, CASE WHEN failed THEN 'FAILURE' ELSE 'SUCCESS' END,
       ts, ts + 0.001,
       CASE WHEN failed THEN NULL ELSE ts + runtime + 0.001 END,
       CASE WHEN failed THEN ts + 0.051 END,
       format('(%%s, ''%%s-%%s'')', ord, customer, lpad(cust_no::text, 3, '0')),
       format(%(kwargs)s, priority), 0, worker,
       CASE WHEN failed THEN NULL
            ELSE format('{''order'': %%s, ''status'': ''ok'', ''customer'': ''%%s''}',
                        ord, customer) END,
       CASE WHEN failed THEN format('ValueError(''order %%s has no lines'')', ord) END,
       CASE WHEN failed THEN ts + 0.051 ELSE ts + runtime + 0.001 END,
       CASE WHEN failed THEN NULL ELSE runtime END,
       CASE WHEN failed THEN format(%(traceback)s, split_part(name, '.', 3), ord) END,
       3 * i, u, NULL, 1,
       ARRAY[format('priority=%%s', priority), 'retry=false', 'source=api']
FROM (
    SELECT i, name, worker, failed, ts, u,
           1 + ((('x' || substr(h, 1, 7))::bit(28)::int) %% 9999999) AS ord,
           (%(customers)s::text[])[1 + (('x' || substr(h, 8, 1))::bit(4)::int %% 8)]
               AS customer,
           (('x' || substr(h, 9, 3))::bit(12)::int) %% 1000 AS cust_no,
           (('x' || substr(h, 12, 2))::bit(8)::int) %% 10 AS priority,
           round((0.002 + 0.798 * (('x' || substr(h, 14, 6))::bit(24)::int) / 16777216.0)
                 ::numeric, 6)::float8 AS runtime
    FROM (
        SELECT i,
               (%(names)s::text[])[1 + i %% 8] AS name,
               (%(hostnames)s::text[])[1 + i %% 4] AS worker,
               i %% %(fail_every)s::int = 0 AS failed,
               %(start)s::float8 + i * %(step)s::float8 AS ts,
               md5((-i)::text) AS h,
               substr(m, 1, 8) || '-' || substr(m, 9, 4) || '-4' || substr(m, 14, 3) || '-'
                   || substr('89ab', 1 + (('x' || substr(m, 17, 1))::bit(4)::int & 3), 1)
                   || substr(m, 18, 3) || '-' || substr(m, 21, 12) AS u
        FROM (SELECT i, md5(i::text) AS m
              FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i) AS g
    ) AS a
) AS b
"""

_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "celery/app/trace.py", line 453, in trace_task\n'
    "    R = retval = fun(*args, **kwargs)\n"
    '  File "shop/orders.py", line 88, in %s\n'
    "    raise ValueError(...)\n"
    "ValueError: order %s has no lines\n"
)


def schema_url(schema: str) -> str:
    """``SERVER`` with ``search_path`` set to ``schema`` (as the tests point Stamen at one)."""
    joiner = "&" if "?" in SERVER else "?"
    return f"{SERVER}{joiner}options={quote(f'-csearch_path={schema}', safe='')}"


def fill(schema: str, tasks: int, span: float) -> None:
    """A fresh ``schema`` holding ``tasks`` finished tasks, as Stamen's writer leaves it."""
    from stamen.store.postgres import _build_rollups, migrate

    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.execute(f'CREATE SCHEMA "{schema}"')
    conn = psycopg.connect(schema_url(schema), autocommit=True)
    conn.execute("SET maintenance_work_mem = '1GB'")
    conn.execute("SET synchronous_commit = off")
    migrate(conn)
    # The bulk load goes in without the task table's indexes (dropped here, rebuilt below
    # from the definitions the migration made).
    constraints = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'tasks'::regclass AND contype IN ('p', 'u')"
    ).fetchall()
    indexes = conn.execute(
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid "
        "WHERE x.indrelid = 'tasks'::regclass "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.oid)"
    ).fetchall()
    for name, _ in constraints:
        conn.execute(f"ALTER TABLE tasks DROP CONSTRAINT {name}")
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    now = time.time()
    step = span / max(tasks, 1)
    t0 = time.monotonic()
    chunk = 250_000
    for lo in range(1, tasks + 1, chunk):
        hi = min(lo + chunk - 1, tasks)
        params = {
            "kwargs": KWARGS,
            "traceback": _TRACEBACK,
            "customers": list(CUSTOMERS),
            "names": list(TASK_NAMES),
            "hostnames": HOSTNAMES,
            "fail_every": FAIL_EVERY,
            "start": now - span,
            "step": step,
            "lo": lo,
            "hi": hi,
        }
        conn.execute(_FILL_SQL, params)
        print(f"    fill: {hi:,} tasks, {time.monotonic() - t0:.0f} s", flush=True)
    for name, definition in constraints:
        started = time.monotonic()
        conn.execute(f"ALTER TABLE tasks ADD CONSTRAINT {name} {definition}")
        print(f"    {name}: {time.monotonic() - started:.0f} s", flush=True)
    for name, definition in indexes:
        started = time.monotonic()
        conn.execute(definition)
        print(f"    {name}: {time.monotonic() - started:.0f} s", flush=True)
    started = time.monotonic()
    conn.execute("VACUUM ANALYZE tasks")
    print(f"    vacuum analyze: {time.monotonic() - started:.0f} s", flush=True)
    started = time.monotonic()
    with conn.transaction():
        _build_rollups(conn)
    print(f"    rollups: {time.monotonic() - started:.0f} s", flush=True)
    conn.cursor().executemany(
        "INSERT INTO task_types (name) VALUES (%s) ON CONFLICT DO NOTHING",
        [(name,) for name in TASK_NAMES],
    )
    conn.cursor().executemany(
        "INSERT INTO meta (key, value) VALUES (%s, %s) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [("seq", "1"), ("task_count", str(tasks)), ("written_at", str(time.time()))],
    )
    conn.close()
    print(f"  filled {tasks:,} tasks in {time.monotonic() - t0:.0f} s", flush=True)


def measure_ingest(url: str, tasks: int, limit_s: float) -> dict[str, float]:
    """New tasks through ``Ingester`` and ``PostgresWriter`` into the stored history, in
    batches of 5,000 events; only adding and flushing is timed, not making the events."""
    from stamen.events.ingest import Ingester
    from stamen.store.postgres import PostgresWriter

    writer = PostgresWriter(url, max_tasks=2**40)
    ingester = Ingester(writer)
    workload = Workload(workers=4, seed=int(time.time()), prefix="ingest")
    clock = done = events = 0
    spent = 0.0
    deadline = time.monotonic() + limit_s
    while done < tasks and time.monotonic() < deadline:
        batch: list[dict[str, Any]] = []
        now = time.time()
        while len(batch) < 5000 and done < tasks:
            task = workload.task()
            for j, (kind, fields) in enumerate(task.events):
                clock += 1
                at = now + (0.0, 0.001, fields.get("runtime", 0.05) + 0.001)[j]
                pid = workload.pids[task.hostname]
                batch.append(_event(task.hostname, pid, clock, kind, at, fields))
            done += 1
        started = time.monotonic()
        for event in batch:
            ingester.add(event)
        ingester.flush()
        spent += time.monotonic() - started
        events += len(batch)
    writer.close()
    return {"tasks": done, "events": events, "seconds": spent}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stamen:
    """``python -m stamen --db=postgresql://...`` on the bench schema."""

    def __init__(self, url: str, broker: str, max_tasks: int, logs: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
        cmd = [sys.executable, "-m", "stamen", f"--db={url}", f"--broker={broker}",
               f"--max_tasks={max_tasks}", f"--port={self.port}",
               "--address=127.0.0.1"]  # fmt: skip
        self.log = logs / f"stamen-{self.port}.log"
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        until(self._healthy, 120, f"stamen on {self.base} ({self.log})")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"stamen exited: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.base}/healthcheck", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    def leader(self) -> bool | None:
        """The ``stamen_ingest_leader`` gauge (``None`` when ``/metrics`` does not answer)."""
        try:
            text = httpx.get(f"{self.base}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith("stamen_ingest_leader "):
                return float(line.split()[1]) == 1.0
        return None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def quantiles(samples: list[float]) -> tuple[float, float]:
    """Median and p95 (nearest rank) of ``samples``, in ms."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return statistics.median(ordered) * 1000, p95 * 1000


def api_queries(url: str) -> list[tuple[str, str]]:
    """(label, query string) of the list pages measured; the rare term is a fragment of
    the uuid of a task in the middle of the history (one match, far from the newest)."""
    with psycopg.connect(url) as conn:
        middle = conn.execute(
            "SELECT uuid FROM tasks WHERE id >= (SELECT max(id) / 2 FROM tasks) ORDER BY id LIMIT 1"
        ).fetchone()
    rare = str(middle[0])[:13] if middle else "no-such-task"
    return [
        ("plain", "limit=100"),
        ("state=FAILURE", "limit=100&state=FAILURE"),
        ("taskname", "limit=100&taskname=shop.payments.capture_payment"),
        ("search rare (1 match)", f"limit=100&search={rare}"),
        ("search=umbrella (~12%)", "limit=100&search=umbrella"),
        ("search=customer (~98%)", "limit=100&search=customer"),
        ("search=kwargs:priority=3 (10%)", "limit=100&search=kwargs:priority%3D3"),
    ]


def measure_api(stamen: Stamen, queries: list[tuple[str, str]], rounds: int,
                limit_s: float) -> dict[str, tuple[float, float, int]]:  # fmt: skip
    """Median and p95 ms of sequential ``GET /api/tasks`` per query, after two warm-ups."""
    found: dict[str, tuple[float, float, int]] = {}
    deadline = time.monotonic() + limit_s
    with httpx.Client(base_url=stamen.base, timeout=120) as client:
        for label, query in queries:
            samples: list[float] = []
            rows = 0
            for n in range(rounds + 2):
                if samples and time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                response = client.get(f"/api/tasks?{query}")
                took = time.perf_counter() - started
                response.raise_for_status()
                rows = len(response.json())
                if n >= 2:
                    samples.append(took)
            median, p95 = quantiles(samples)
            found[label] = (median, p95, rows)
    return found


def measure_walk(url: str, rounds: int) -> dict[str, tuple[float, float]]:
    """In-process median ms of a kwargs-pair search page (10%, 100%, 1.25% of tasks) by
    the walk (``list_tasks``) and by the exact plan."""
    from stamen.search.parser import parse_query
    from stamen.store.postgres import PostgresReader
    from stamen.store.reader import TaskQuery

    reader = PostgresReader(url)
    found = {}
    for term in ("kwargs:priority=3", "kwargs:source=api", "kwargs:priority=3 umbrella"):
        label = term
        q = TaskQuery(search=parse_query(term), limit=100)
        times: dict[str, list[float]] = {"walk": [], "exact": []}
        for _ in range(rounds):
            for kind, run in (("walk", reader.list_tasks), ("exact", reader.exact_page)):
                started = time.perf_counter()
                run(q)
                times[kind].append(time.perf_counter() - started)
        found[label] = (
            statistics.median(times["walk"]) * 1000,
            statistics.median(times["exact"]) * 1000,
        )
    reader.close()
    return found


def leading(instances: list[Stamen]) -> Stamen | None:
    """The instance whose gauge says it ingests, if any."""
    return next((s for s in instances if s.leader()), None)


def measure_takeover(url: str, broker: str, max_tasks: int, logs: Path,
                     rounds: int) -> list[float]:  # fmt: skip
    """Seconds from SIGKILL of the ingesting instance until the standby's gauge is 1."""
    running = [Stamen(url, broker, max_tasks, logs), Stamen(url, broker, max_tasks, logs)]
    times = []
    try:
        for _ in range(rounds):
            leader = until(functools.partial(leading, list(running)), 120, "a leader")
            standby = next(s for s in running if s is not leader)
            if standby.leader() is not False:
                raise RuntimeError("the standby does not report stamen_ingest_leader 0")
            leader.stop(signal.SIGKILL)
            killed = time.monotonic()
            until(standby.leader, 120, "the standby to take over", every=0.02)
            times.append(time.monotonic() - killed)
            running = [standby, Stamen(url, broker, max_tasks, logs)]
    finally:
        for stamen in running:
            stamen.stop()
    return times


def schema_size(url: str) -> int:
    from stamen.store.postgres import PostgresReader

    return PostgresReader(url).size_bytes()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10_000_000, help="tasks to fill (10M)")
    p.add_argument("--schema", default="stamen_bench", help="schema of --server to use")
    p.add_argument("--span", type=float, default=7 * 86_400.0, help="seconds the tasks span")
    p.add_argument("--reuse", action="store_true", help="skip the fill: measure the schema")
    p.add_argument("--phases", default="ingest,api,walk,takeover", help="comma-separated")
    p.add_argument("--drop", action="store_true", help="drop the schema at the end")
    p.add_argument("--broker", default="redis://127.0.0.1:6379/11", help="for Stamen's receiver")
    p.add_argument("--ingest-tasks", type=int, default=100_000, help="tasks the ingest phase adds")
    p.add_argument("--rounds", type=int, default=30, help="requests per list query")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    url = schema_url(args.schema)
    if not args.reuse:
        fill(args.schema, args.tasks, args.span)
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'task_count'").fetchone()
    stored = int(row[0]) if row else 0
    print(f"schema {args.schema}: {stored:,} tasks, {schema_size(url) / 1e9:.1f} GB", flush=True)
    max_tasks = 2 * max(stored, args.tasks)
    logs = Path(tempfile.mkdtemp(prefix="stamen-pg-scale-"))
    if "ingest" in phases:
        got = measure_ingest(url, args.ingest_tasks, limit_s=300)
        secs = got["seconds"]
        print(f"ingest into {stored:,} tasks: {got['tasks']:,.0f} tasks in {secs:.1f} s = "
              f"{got['tasks'] / secs:,.0f} tasks/s, {got['events'] / secs:,.0f} events/s",
              flush=True)  # fmt: skip
    if "api" in phases:
        stamen = Stamen(url, args.broker, max_tasks, logs)
        try:
            figures = measure_api(stamen, api_queries(url), args.rounds, limit_s=600)
        finally:
            stamen.stop()
        print("GET /api/tasks (sequential)      median ms   p95 ms  rows")
        for label, (median, p95, rows) in figures.items():
            print(f"  {label:30} {median:9.1f} {p95:8.1f} {rows:5}")
    if "walk" in phases:
        print("search page in-process            walk ms  exact plan ms (median)")
        for label, (walk, exact) in measure_walk(url, rounds=5).items():
            print(f"  {label:30} {walk:8.1f} {exact:9.1f}", flush=True)
    if "takeover" in phases:
        times = measure_takeover(url, args.broker, max_tasks, logs, rounds=3)
        print(f"takeover after SIGKILL: median {statistics.median(times):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in times)})")  # fmt: skip
    print(f"logs: {logs}")
    if args.drop:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{args.schema}" CASCADE')
        print(f"dropped schema {args.schema}")
    else:
        print(f"kept schema {args.schema} ({schema_size(url) / 1e9:.1f} GB) for --reuse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
