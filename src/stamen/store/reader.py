"""Read side of the store: indexed queries for the API, pages and metrics.

Each thread gets its own query-only connection (SQLite connections are cheap and WAL lets
them read while ingest writes). Every query here is served by an index (DESIGN rule 3):
filters, the received-time window, sorting and paging never scan the whole history,
and search terms go through the FTS5 trigram index.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from stamen.model import CELERY_STATES, WORKER_FIELDS
from stamen.search.parser import Node
from stamen.search.sql import compile_query, fts_not_driving, uses_fts
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
        return int(
            self.conn.execute(f"SELECT count(*) FROM tasks WHERE {where}", params).fetchone()[0]
        )

    def get_task(self, uuid: str) -> dict[str, Any] | None:
        row = self.conn.execute(f"SELECT {_SELECT} FROM tasks WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            return None
        task = task_from_row(row)
        self._fill_children([task])
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
