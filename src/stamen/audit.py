"""What the web process writes to the store: the audit log, retry links and paused queues.

Place in the pipeline: beside the store. Ingest owns the store's one long-lived writer
(DESIGN rule 4); control actions are rare, so they are written here, outside ingest. Every
call is blocking: web handlers run them in a thread.

Two backends keep the same tables behind ``ActionStore``: ``SqliteActionStore`` (below,
next to the SQLite history) and ``stamen.audit_pg.PostgresActionStore`` (``--db=
postgresql://...``), so that every instance sharing a PostgreSQL database sees the audit
entries, retry links and paused queues made on any of them. ``open_action_store`` picks one.

The audit log answers "who did what to which target, when, and how did it go" for every
control and task action, including refused ones (read-only mode, bad input, unknown worker).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from stamen.store.reader import SQL_MAX_INT
from stamen.store.schema import ACTION_DDL, SCHEMA_VERSION
from stamen.store.sqlite import connect

log = logging.getLogger(__name__)

#: Longest message kept per audit row; error texts from workers can be long reprs.
MAX_MESSAGE = 2000
#: Longest parameter JSON kept per row (execution bodies can carry large arguments); a
#: truncated value is returned as the raw string.
MAX_PARAMS = 10000
AUDIT_COLUMNS = ("id", "at", "user", "action", "target", "params", "status", "outcome", "message")


class ActionStore(Protocol):
    """The action tables, whichever database holds them."""

    def record(
        self,
        *,
        user: str,
        action: str,
        target: str | None,
        params: dict[str, Any] | None,
        status: int,
        message: str = "",
    ) -> int: ...
    def entries(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        action: str | None = None,
        target: str | None = None,
        user: str | None = None,
    ) -> list[dict[str, Any]]: ...
    def link_retry(self, task_id: str, retry_of: str) -> None: ...
    def retry_links(self, task_id: str) -> dict[str, Any]: ...
    def pause(self, name: str, user: str, workers: Sequence[str]) -> None: ...
    def add_paused_worker(self, name: str, worker: str) -> None: ...
    def resume(self, name: str) -> list[str] | None: ...
    def paused(self) -> dict[str, dict[str, Any]]: ...
    def close(self) -> None: ...


def open_action_store(db_url: str | None, path: str | Path) -> ActionStore:
    """The action store beside the history: in PostgreSQL when ``db_url`` names it (shared
    by every instance on that database), else in the SQLite file at ``path``."""
    if db_url is not None:
        from stamen.audit_pg import PostgresActionStore

        return PostgresActionStore(db_url)
    return SqliteActionStore(path)


# -- what both backends store alike ---------------------------------------------------------


def outcome_of(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "error"


def params_text(params: dict[str, Any] | None) -> str:
    return json.dumps(params or {}, default=str, sort_keys=True)[:MAX_PARAMS]


def message_text(message: str | None) -> str:
    return (message or "")[:MAX_MESSAGE]


def audit_entries(rows: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """Rows of ``AUDIT_COLUMNS`` as dicts, ``params`` decoded unless it was truncated."""
    entries = []
    for row in rows:
        entry = dict(zip(AUDIT_COLUMNS, row, strict=True))
        with contextlib.suppress(ValueError):
            entry["params"] = json.loads(entry["params"] or "{}")
        entries.append(entry)
    return entries


def audit_filter(mark: str, user_column: str, **exact: str | None) -> tuple[str, list[Any]]:
    """The WHERE clause and parameters of an audit page filtered by exact column values
    (``None`` leaves a column out); ``mark`` is the driver's placeholder and
    ``user_column`` the quoted name PostgreSQL needs for ``user``."""
    clauses, params = [], []
    for column, value in exact.items():
        if value is not None:
            clauses.append(f"{user_column if column == 'user' else column} = {mark}")
            params.append(value)
    return " AND ".join(clauses) or "1 = 1", params


def merged_workers(stored: str | None, workers: Iterable[str]) -> str:
    """The JSON worker list of a paused queue with ``workers`` added, sorted."""
    known = json.loads(stored) if stored else []
    return json.dumps(sorted({*known, *workers}))


def paused_map(rows: Iterable[Sequence[Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {"paused_at": at, "paused_by": by, "workers": json.loads(workers)}
        for name, at, by, workers in rows
    }


class SqliteActionStore:
    """The action tables in the SQLite history file.

    Each write opens its own short-lived connection under a process-wide lock instead of
    going through ingest: SQLite's WAL mode lets it commit between ingest's transactions
    (``busy_timeout`` covers the overlap), and readers never block.
    """

    def __init__(self, path: str | Path, *, clock: Any = time.time) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._clock = clock
        self._ready = False

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction on a fresh connection; serialised within this process."""
        with self._lock:
            conn = connect(self.path)
            try:
                self._ensure(conn)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            finally:
                conn.close()

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own connection."""

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = connect(self.path, readonly=True)
        try:
            yield conn
        finally:
            conn.close()

    def _ensure(self, conn: sqlite3.Connection) -> None:
        """Create the action tables in a store made before they existed (schema v1 only)."""
        if self._ready:
            return
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            for statement in ACTION_DDL:
                conn.execute(statement)
            self._ready = True

    def _has_table(self, conn: sqlite3.Connection, name: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return row is not None

    # -- audit log --------------------------------------------------------------------------

    def record(
        self,
        *,
        user: str,
        action: str,
        target: str | None,
        params: dict[str, Any] | None,
        status: int,
        message: str = "",
    ) -> int:
        """Append one audit row; returns its id."""
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO audit_log (at, user, action, target, params, status, outcome, "
                "message) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self._clock(),
                    user,
                    action,
                    target,
                    params_text(params),
                    status,
                    outcome_of(status),
                    message_text(message),
                ),
            )
            return int(cursor.lastrowid or 0)

    def entries(
        self,
        *,
        limit: int = 100,
        offset: int = 0,
        action: str | None = None,
        target: str | None = None,
        user: str | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first, optionally filtered by exact action, target or user."""
        where, params = audit_filter("?", "user", action=action, target=target, user=user)
        with self._read() as conn:
            if not self._has_table(conn, "audit_log"):
                return []
            rows = conn.execute(
                f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_log WHERE {where} "
                "ORDER BY id DESC LIMIT ? OFFSET ?",
                [*params, min(limit, SQL_MAX_INT), min(max(offset, 0), SQL_MAX_INT)],
            ).fetchall()
        return audit_entries(rows)

    # -- retries ------------------------------------------------------------------------------

    def link_retry(self, task_id: str, retry_of: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO task_retries (task_id, retry_of, at) VALUES (?, ?, ?)",
                (task_id, retry_of, self._clock()),
            )

    def retry_links(self, task_id: str) -> dict[str, Any]:
        """``{"retry_of": <id or None>, "retried_as": [<ids>, oldest first]}``."""
        with self._read() as conn:
            if not self._has_table(conn, "task_retries"):
                return {"retry_of": None, "retried_as": []}
            row = conn.execute(
                "SELECT retry_of FROM task_retries WHERE task_id = ?", (task_id,)
            ).fetchone()
            children = [
                r[0]
                for r in conn.execute(
                    "SELECT task_id FROM task_retries WHERE retry_of = ? ORDER BY at, task_id",
                    (task_id,),
                )
            ]
        return {"retry_of": row[0] if row else None, "retried_as": children}

    # -- paused queues ------------------------------------------------------------------------

    def pause(self, name: str, user: str, workers: Sequence[str]) -> None:
        """Remember ``name`` as paused; ``workers`` are the ones to resume it on later."""
        with self._write() as conn:
            row = conn.execute("SELECT workers FROM paused_queues WHERE name = ?", (name,))
            found = row.fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO paused_queues (name, paused_at, paused_by, workers) "
                "VALUES (?, ?, ?, ?)",
                (name, self._clock(), user, merged_workers(found[0] if found else None, workers)),
            )

    def add_paused_worker(self, name: str, worker: str) -> None:
        """A worker that came online consuming a paused queue was told to stop."""
        with self._write() as conn:
            found = conn.execute(
                "SELECT workers FROM paused_queues WHERE name = ?", (name,)
            ).fetchone()
            if found is None:
                return
            conn.execute(
                "UPDATE paused_queues SET workers = ? WHERE name = ?",
                (merged_workers(found[0], [worker]), name),
            )

    def resume(self, name: str) -> list[str] | None:
        """Forget the pause; returns the workers to add the consumer back on (None: not paused)."""
        with self._write() as conn:
            found = conn.execute(
                "DELETE FROM paused_queues WHERE name = ? RETURNING workers", (name,)
            ).fetchone()
        return None if found is None else list(json.loads(found[0]))

    def paused(self) -> dict[str, dict[str, Any]]:
        """``{queue: {"paused_at", "paused_by", "workers"}}`` for every paused queue."""
        with self._read() as conn:
            if not self._has_table(conn, "paused_queues"):
                return {}
            rows = conn.execute(
                "SELECT name, paused_at, paused_by, workers FROM paused_queues ORDER BY name"
            ).fetchall()
        return paused_map(rows)
