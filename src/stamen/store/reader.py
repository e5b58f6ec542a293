"""Read side of the store: indexed queries for the API, pages and metrics.

Each thread gets its own query-only connection (SQLite connections are cheap and WAL lets
them read while ingest writes). Every query here is served by an index (DESIGN rule 3):
filters, the received-time window, sorting and paging never scan the whole history,
and search terms go through the FTS5 trigram index.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from stamen.model import CELERY_STATES, WORKER_FIELDS
from stamen.search.parser import Node
from stamen.search.sql import (
    compile_query,
    counts_as_fts,
    fts_not_driving,
    fts_slots,
    is_lookup,
    uses_fts,
    with_id_sets,
)
from stamen.store.schema import TASK_COLUMNS
from stamen.store.sqlite import connect

#: Columns a sort may use. Flower's API allows four; the datatable any task attribute.
SORTABLE = frozenset(TASK_COLUMNS)
#: The largest integer SQLite (and PostgreSQL's BIGINT) can bind.
SQL_MAX_INT = 2**63 - 1
_WORKER_COLUMNS = (*WORKER_FIELDS, "timestamp")
_SELECT = ", ".join(f"tasks.{c}" for c in TASK_COLUMNS)
_TEXT_SORT = frozenset(
    c
    for c in TASK_COLUMNS
    if c
    not in (
        "received",
        "started",
        "runtime",
        "timestamp",
        "sent",
        "succeeded",
        "failed",
        "retried",
        "revoked",
        "rejected",
        "clock",
        "retries",
    )
)


#: From this many matches on, walking the sort index beats fetching and sorting them all.
BROAD_MATCHES = 5000
#: Sorts a search page may walk in order (either way): each has an index on (column, uuid).
WALK_SORTS = frozenset({None, "timestamp", "received", "started"})
#: Rows of the sort order the first step of a walk looks at at least (four times the rows
#: the page needs if more); each step doubles it...
WALK_FIRST = 1000
#: ...up to this many.
WALK_STEP_MAX = 16_000
#: Rows a walk may look at; it hands over to the exact plan as soon as the matches seen
#: so far say it would need more (a term that rare is cheap to fetch whole).
WALK_BUDGET = 100_000
#: Task ids closer than this share one search-index probe (``rowid BETWEEN``).
ID_GAP = 256
#: Columns of the tasks ``workflow_rows`` returns.
WORKFLOW_COLUMNS = ("uuid", "name", "state", "parent_id", "root_id", "received", "runtime")
#: (bucket, name, state, count, histogram text) of ``task_rollups``.
RollupRow = tuple[float, str, str, int, str]
#: (bucket, exception type, name, count, first seen, last seen, sample uuid).
FailureRow = tuple[float, str, str, int, float | None, float | None, str | None]


_JSON_IDS = "SELECT value FROM json_each(?)"


def _id_ranges(ids: list[int]) -> list[tuple[int, int]]:
    """``ids`` as few ``(low, high)`` ranges, splitting where consecutive ids are far apart."""
    ordered = sorted(ids)
    ranges: list[tuple[int, int]] = []
    low = high = ordered[0]
    for i in ordered[1:]:
        if i - high > ID_GAP:
            ranges.append((low, high))
            low = i
        high = i
    ranges.append((low, high))
    return ranges


@dataclass(frozen=True)
class TaskQuery:
    """A filtered, sorted page of tasks; ``None`` means "no constraint"."""

    workername: str | None = None
    taskname: str | None = None
    state: str | None = None
    received_start: float | None = None
    received_end: float | None = None
    started_start: float | None = None
    started_end: float | None = None
    search: Node | None = None
    sort_by: str | None = None
    descending: bool = False
    offset: int = 0
    limit: int | None = None


def task_from_row(row: Iterable[Any]) -> dict[str, Any]:
    """A stored row as Celery's ``Task.as_dict()`` (children filled in by the caller)."""
    task = dict(zip(TASK_COLUMNS, row, strict=True))
    return {
        "uuid": task["uuid"],
        "name": task["name"],
        "state": task["state"],
        "received": task["received"],
        "sent": task["sent"],
        "started": task["started"],
        "rejected": task["rejected"],
        "succeeded": task["succeeded"],
        "failed": task["failed"],
        "retried": task["retried"],
        "revoked": task["revoked"],
        "args": task["args"],
        "kwargs": task["kwargs"],
        "eta": task["eta"],
        "expires": task["expires"],
        "retries": task["retries"],
        "worker": task["worker"],
        "result": task["result"],
        "exception": task["exception"],
        "timestamp": task["timestamp"],
        "runtime": task["runtime"],
        "traceback": task["traceback"],
        "exchange": task["exchange"],
        "routing_key": task["routing_key"],
        "clock": task["clock"],
        "client": task["client"],
        "root": task["root_id"],
        "root_id": task["root_id"],
        "parent": task["parent_id"],
        "parent_id": task["parent_id"],
        "children": [],
    }


class StoreReader:
    """Queries over the history; safe to call from any thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self._local = threading.local()

    @property
    def conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path, readonly=True)
        return conn

    def close(self) -> None:
        """Nothing to release: each thread's connection to the file closes with its thread."""

    def _meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def seq(self) -> int:
        return int(self._meta("seq", 0))

    def task_count(self) -> int:
        return int(self._meta("task_count", 0))

    def states(self) -> list[str]:
        custom = self._meta("custom_states")
        return [*CELERY_STATES, *(orjson.loads(custom) if custom else ())]

    def _where(self, q: TaskQuery) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("worker", q.workername),
            ("name", q.taskname),
            ("state", q.state),
        ):
            if value is not None:
                clauses.append(f"tasks.{column} = ? COLLATE NOCASE")
                params.append(value)
        for column, start, end in (
            ("received", q.received_start, q.received_end),
            ("started", q.started_start, q.started_end),
        ):
            if start is not None:
                clauses.append(f"(tasks.{column} IS NULL OR tasks.{column} >= ?)")
                params.append(start)
            if end is not None:
                clauses.append(f"(tasks.{column} IS NULL OR tasks.{column} <= ?)")
                params.append(end)
        if q.search is not None:
            expr, search_params = compile_query(q.search, self.states())
            clauses.append(f"({expr})")
            params.extend(search_params)
        return (" AND ".join(clauses) or "1"), params

    def _order(self, q: TaskQuery) -> str:
        direction = "DESC" if q.descending else "ASC"
        if q.sort_by is None or q.sort_by not in SORTABLE:
            return "tasks.timestamp DESC, tasks.uuid DESC"
        collate = " COLLATE NOCASE" if q.sort_by in _TEXT_SORT else ""
        return f"tasks.{q.sort_by}{collate} {direction}, tasks.uuid {direction}"

    def list_tasks(self, q: TaskQuery) -> list[dict[str, Any]]:
        """One page of tasks in order, each as Celery's ``as_dict()`` with children."""
        if q.limit is not None and q.limit <= 0:
            return []
        where, params = self._where(q)
        if uses_fts(where) and q.limit is not None and q.sort_by in WALK_SORTS:
            page = self._walk(q, where, params)
            if page is not None:
                return page
        if uses_fts(where) and self._matches_many(where, params):
            # A broad term: a page in tens of ms instead of sorting every match (about a
            # second for 80k matches in 1M tasks).
            where = fts_not_driving(where)
        sql = f"SELECT {_SELECT} FROM tasks WHERE {where} ORDER BY {self._order(q)}"
        sql += " LIMIT ? OFFSET ?"
        # SQLite binds 64-bit integers only; no store holds more rows than that, so a larger
        # limit means "all" and a larger offset "none", as Flower's list slicing does.
        limit = -1 if q.limit is None else min(q.limit, SQL_MAX_INT)
        params += [limit, min(max(q.offset, 0), SQL_MAX_INT)]
        tasks = [task_from_row(row) for row in self.conn.execute(sql, params)]
        self._fill_children(tasks)
        return tasks

    def _walk(self, q: TaskQuery, where: str, params: list[Any]) -> list[dict[str, Any]] | None:
        """A search page found by walking the sort order in growing steps.

        Each step asks the search index only about the step's rows (by rowid ranges), so a
        term matching most of a big history costs about as much as a plain page. The rows
        and their order are those of the exact plan: the walk keeps the sort order's rows
        that satisfy the whole condition, in one read snapshot. ``None`` when the matches
        seen so far say the page lies beyond ``WALK_BUDGET`` rows: the exact plan is cheap
        for so rare a term.
        """
        assert q.limit is not None
        need = max(q.offset, 0) + q.limit
        if need > WALK_BUDGET:
            return None
        base, base_params = self._where(replace(q, search=None))
        walk_sql = (
            f"SELECT tasks.id FROM tasks WHERE {base} ORDER BY {self._order(q)} LIMIT ? OFFSET ?"
        )
        slots = fts_slots(where)
        # A lone lookup needs no check beyond the index's answer.
        check_sql = (
            None
            if is_lookup(where)
            else f"SELECT tasks.id FROM tasks WHERE tasks.id IN ({_JSON_IDS}) "
            f"AND {with_id_sets(where)}"
        )
        conn = self.conn
        found: list[int] = []
        walked, step = 0, min(max(WALK_FIRST, 4 * need), WALK_STEP_MAX)
        conn.execute("BEGIN")
        try:
            while len(found) < need:
                ids = [r[0] for r in conn.execute(walk_sql, [*base_params, step, walked])]
                walked += len(ids)
                found += self._matching(ids, check_sql, params, slots)
                if len(ids) < step:
                    break
                # Rows still to walk at the density seen so far (one match if none yet).
                ahead = (need - len(found)) * walked / max(len(found), 1)
                if len(found) < need and walked + ahead > WALK_BUDGET:
                    return None
                step = min(step * 2, WALK_STEP_MAX)
            page = found[max(q.offset, 0) : need]
            rows = conn.execute(
                f"SELECT {_SELECT}, tasks.id FROM tasks WHERE tasks.id IN ({_JSON_IDS})",
                [orjson.dumps(page).decode()],
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        by_id = {row[-1]: row[:-1] for row in rows}
        tasks = [task_from_row(by_id[i]) for i in page]
        self._fill_children(tasks)
        return tasks

    def _matching(
        self, ids: list[int], check_sql: str | None, params: list[Any], slots: list[int]
    ) -> list[int]:
        """Those of ``ids`` (in their order) that satisfy the condition ``check_sql`` was
        made from; its search-index lookups are asked about these ids' ranges only."""
        if not ids:
            return []
        ranges = _id_ranges(ids)
        values = list(params)
        for slot in slots:
            hits: list[int] = []
            for low, high in ranges:
                hits += [
                    r[0]
                    for r in self.conn.execute(
                        "SELECT rowid FROM tasks_fts WHERE tasks_fts MATCH ? "
                        "AND rowid BETWEEN ? AND ?",
                        (params[slot], low, high),
                    )
                ]
            if check_sql is None:
                ok = set(hits)
                return [i for i in ids if i in ok]
            values[slot] = orjson.dumps(hits).decode()
        assert check_sql is not None
        ok = {r[0] for r in self.conn.execute(check_sql, [orjson.dumps(ids).decode(), *values])}
        return [i for i in ids if i in ok]

    def _matches_many(self, where: str, params: list[Any]) -> bool:
        """Whether at least ``BROAD_MATCHES`` tasks match (stops counting there: cheap)."""
        found = self.conn.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM tasks WHERE {where} LIMIT ?)",
            [*params, BROAD_MATCHES],
        ).fetchone()[0]
        return int(found) >= BROAD_MATCHES

    def count_tasks(self, q: TaskQuery) -> int:
        where, params = self._where(q)
        if where == "1":
            return self.task_count()
        sql = counts_as_fts(where) or f"SELECT count(*) FROM tasks WHERE {where}"
        return int(self.conn.execute(sql, params).fetchone()[0])

    def get_task(self, uuid: str) -> dict[str, Any] | None:
        row = self.conn.execute(f"SELECT {_SELECT} FROM tasks WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            return None
        task = task_from_row(row)
        self._fill_children([task])
        if self.conn.execute("SELECT 1 FROM backfilled WHERE uuid = ?", (uuid,)).fetchone():
            task["backfilled"] = True
        return task

    def _fill_children(self, tasks: list[dict[str, Any]]) -> None:
        if not tasks:
            return
        by_id = {t["uuid"]: t for t in tasks}
        ids = list(by_id)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for parent_id, uuid in self.conn.execute(
                f"SELECT parent_id, uuid FROM tasks WHERE parent_id IN ({marks}) "
                "ORDER BY received, uuid",
                chunk,
            ):
                by_id[parent_id]["children"].append(uuid)

    def task_types(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM task_types ORDER BY name")]

    def workers(self) -> dict[str, dict[str, Any]]:
        """Every known worker's Celery fields plus ``timestamp`` (its last event)."""
        cols = ", ".join(_WORKER_COLUMNS)
        found: dict[str, dict[str, Any]] = {}
        for row in self.conn.execute(f"SELECT {cols} FROM workers ORDER BY hostname"):
            worker = dict(zip(_WORKER_COLUMNS, row, strict=True))
            for key in ("heartbeats", "loadavg"):
                if isinstance(worker[key], str):
                    worker[key] = orjson.loads(worker[key])
            worker["heartbeats"] = worker["heartbeats"] or []
            found[worker["hostname"]] = worker
        return found

    def counters(self) -> dict[str, dict[str, int]]:
        """Per-hostname event counts, hosts and types in the order they were first seen."""
        found: dict[str, dict[str, int]] = {}
        for host, kind, count in self.conn.execute(
            "SELECT hostname, type, count FROM worker_counters ORDER BY first_seen, rowid"
        ):
            found.setdefault(host, {})[kind] = count
        return found

    # Rollups and workflows (stamen.web.stats).

    def task_rollups(self, width: int, start: float) -> list[RollupRow]:
        """Task rollup rows of bucket width ``width`` from the bucket starting at ``start``:
        (bucket, name, state, count, encoded histogram)."""
        return self.conn.execute(
            "SELECT bucket, name, state, count, hist FROM task_rollups "
            "WHERE width = ? AND bucket >= ?",
            (width, start),
        ).fetchall()

    def failure_rollups(self, width: int, start: float) -> list[FailureRow]:
        """Failure group rows of bucket width ``width`` from the bucket starting at ``start``:
        (bucket, exception type, name, count, first seen, last seen, sample uuid)."""
        return self.conn.execute(
            "SELECT bucket, exception_type, name, count, first_seen, last_seen, sample_uuid "
            "FROM failure_rollups WHERE width = ? AND bucket >= ?",
            (width, start),
        ).fetchall()

    def task_exceptions(self, uuids: Iterable[str]) -> dict[str, tuple[Any, Any]]:
        """(exception, traceback) of those of ``uuids`` still stored."""
        found: dict[str, tuple[Any, Any]] = {}
        ids = list(uuids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for uuid, exception, traceback in self.conn.execute(
                f"SELECT uuid, exception, traceback FROM tasks WHERE uuid IN ({marks})", chunk
            ):
                found[uuid] = (exception, traceback)
        return found

    def workflow_rows(self, taskid: str, limit: int) -> tuple[str, list[dict[str, Any]]] | None:
        """The root id of ``taskid``'s workflow and up to ``limit`` of its tasks (the root's
        own row included), each with ``WORKFLOW_COLUMNS``; ``None`` if the task is unknown."""
        row = self.conn.execute("SELECT root_id FROM tasks WHERE uuid = ?", (taskid,)).fetchone()
        if row is None:
            return None
        root_id = row[0] or taskid
        cols = ", ".join(WORKFLOW_COLUMNS)
        rows = self.conn.execute(
            f"SELECT {cols} FROM tasks WHERE root_id = ? "
            f"UNION SELECT {cols} FROM tasks WHERE uuid = ? LIMIT ?",
            (root_id, root_id, limit),
        ).fetchall()
        return root_id, [dict(zip(WORKFLOW_COLUMNS, r, strict=True)) for r in rows]

    # What ``/metrics`` computes at scrape time.

    def sent_times(self, uuids: Iterable[str]) -> dict[str, float]:
        """``task-sent`` time of those of ``uuids`` stored with one."""
        found: dict[str, float] = {}
        ids = list(uuids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for uuid, sent in self.conn.execute(
                f"SELECT uuid, sent FROM tasks WHERE uuid IN ({marks}) AND sent IS NOT NULL",
                chunk,
            ):
                found[uuid] = float(sent)
        return found

    def time_span(self) -> tuple[float | None, float | None]:
        """Timestamps of the oldest and newest task kept (``None`` when empty); two queries,
        as SQLite reads a lone ``min``/``max`` off the index but scans for both at once."""
        oldest = self.conn.execute("SELECT min(timestamp) FROM tasks").fetchone()[0]
        newest = self.conn.execute("SELECT max(timestamp) FROM tasks").fetchone()[0]
        return oldest, newest

    def state_counts(self) -> list[tuple[str, int]]:
        """Tasks per state (states differing in case count as one), in state order; an
        index-only scan of ``tasks_by_state``, no table rows read."""
        return [
            (str(state), int(n))
            for state, n in self.conn.execute(
                "SELECT state, count(*) FROM tasks INDEXED BY tasks_by_state "
                "GROUP BY state COLLATE NOCASE ORDER BY state COLLATE NOCASE"
            )
            if state is not None
        ]

    def size_bytes(self) -> int:
        """Bytes the history takes on disk: the database file and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(f"{self.path}{suffix}")
        return total

    def changed_tasks(self, since: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """The newest ``limit`` tasks written after change number ``since`` (the live pages'
        patch: :data:`LIVE_TASK_COLUMNS` only), and how many of them there are, counted up
        to ``limit + 1`` so that a burst costs no more than one page; ``tasks_by_seq``
        serves it."""
        cols = ", ".join(LIVE_TASK_COLUMNS)
        rows = self.conn.execute(
            f"SELECT {cols} FROM tasks WHERE seq > ? ORDER BY seq DESC LIMIT ?", (since, limit + 1)
        ).fetchall()
        tasks = [dict(zip(LIVE_TASK_COLUMNS, r, strict=True)) for r in rows[:limit]]
        return tasks, len(rows)


#: Columns :meth:`StoreReader.changed_tasks` returns: what a task-list row or a task page
#: needs to patch itself.
LIVE_TASK_COLUMNS = (
    "uuid", "name", "state", "received", "started", "runtime", "worker", "timestamp",
    "retries", "root_id", "parent_id",
)  # fmt: skip
