"""The action tables (audit log, retry links, paused queues) in PostgreSQL.

With ``--db=postgresql://...`` several instances share one database behind a load
balancer, so an action taken through one of them (a pause, a revoke, a retry) must show on
all: the tables live in the history's schema, next to the tasks. They are created here,
idempotently, on first use rather than by the history's schema migrations: they are
independent of the history tables and never migrated with them, and a database made before
they existed gets them without a schema version of its own. Creation and every write take
a transaction-scoped advisory lock, so instances starting or pausing together do not race
(a paused queue's worker list is read, merged and written back).

One connection, used under a lock: actions are rare and each is a statement or two. A
connection the server dropped is replaced and the call tried once more.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg

from stamen.audit import (
    AUDIT_COLUMNS,
    audit_entries,
    audit_filter,
    merged_workers,
    message_text,
    outcome_of,
    params_text,
    paused_map,
)
from stamen.store.postgres import _lock_key, connect
from stamen.store.reader import SQL_MAX_INT

T = TypeVar("T")

#: ``user`` is a reserved word in PostgreSQL: the column is always quoted.
_COLUMNS = ", ".join('"user"' if c == "user" else c for c in AUDIT_COLUMNS)

DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS audit_log (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL,
        "user" text NOT NULL,
        action text NOT NULL,
        target text,
        params text,
        status integer NOT NULL,
        outcome text NOT NULL,
        message text
    )
    """,
    "CREATE INDEX IF NOT EXISTS audit_by_action ON audit_log (action, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_target ON audit_log (target, id)",
    """
    CREATE TABLE IF NOT EXISTS task_retries (
        task_id text PRIMARY KEY,
        retry_of text NOT NULL,
        at double precision NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS task_retries_by_origin ON task_retries (retry_of)",
    """
    CREATE TABLE IF NOT EXISTS paused_queues (
        name text PRIMARY KEY,
        paused_at double precision NOT NULL,
        paused_by text NOT NULL,
        workers text NOT NULL DEFAULT '[]'
    )
    """,
)


class PostgresActionStore:
    """``stamen.audit.ActionStore`` on the PostgreSQL database (and schema) of ``url``."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._key = 0

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, or a new one; the first creates the tables if missing."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = connect(self.url)
            self._key = _lock_key(conn, "actions")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._key,))
                if conn.execute("SELECT to_regclass('paused_queues')").fetchone() == (None,):
                    for statement in DDL:
                        conn.execute(statement)
            self._conn = conn
        return conn

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``work(conn)`` under the lock, once more on a new connection if the old one had
        been dropped (a database restart or failover since the last action)."""
        with self._lock:
            conn = self._connection()
            try:
                return work(conn)
            except psycopg.OperationalError:
                if not conn.broken:
                    raise
            return work(self._connection())

    @contextlib.contextmanager
    def _locked(self, conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
        """A transaction holding the actions lock of this schema, across instances."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._key,))
            yield conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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
        values = (
            self._clock(),
            user,
            action,
            target,
            params_text(params),
            status,
            outcome_of(status),
            message_text(message),
        )

        def insert(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                'INSERT INTO audit_log (at, "user", action, target, params, status, outcome, '
                "message) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                values,
            ).fetchone()
            return int(row[0]) if row else 0

        return self._run(insert)

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
        where, params = audit_filter("%s", '"user"', action=action, target=target, user=user)
        sql = f"SELECT {_COLUMNS} FROM audit_log WHERE {where} ORDER BY id DESC LIMIT %s OFFSET %s"
        params += [min(limit, SQL_MAX_INT), min(max(offset, 0), SQL_MAX_INT)]
        rows = self._run(lambda conn: conn.execute(sql, params).fetchall())
        return audit_entries(rows)

    # -- retries ------------------------------------------------------------------------------

    def link_retry(self, task_id: str, retry_of: str) -> None:
        values = (task_id, retry_of, self._clock())
        self._run(
            lambda conn: conn.execute(
                "INSERT INTO task_retries (task_id, retry_of, at) VALUES (%s, %s, %s) "
                "ON CONFLICT (task_id) DO UPDATE SET retry_of = EXCLUDED.retry_of, "
                "at = EXCLUDED.at",
                values,
            )
        )

    def retry_links(self, task_id: str) -> dict[str, Any]:
        """``{"retry_of": <id or None>, "retried_as": [<ids>, oldest first]}``."""

        def read(conn: psycopg.Connection[Any]) -> dict[str, Any]:
            row = conn.execute(
                "SELECT retry_of FROM task_retries WHERE task_id = %s", (task_id,)
            ).fetchone()
            children = conn.execute(
                "SELECT task_id FROM task_retries WHERE retry_of = %s "
                'ORDER BY at, task_id COLLATE "C"',
                (task_id,),
            ).fetchall()
            return {"retry_of": row[0] if row else None, "retried_as": [c[0] for c in children]}

        return self._run(read)

    # -- paused queues ------------------------------------------------------------------------

    def pause(self, name: str, user: str, workers: Sequence[str]) -> None:
        """Remember ``name`` as paused; ``workers`` are the ones to resume it on later."""
        at = self._clock()

        def write(conn: psycopg.Connection[Any]) -> None:
            with self._locked(conn):
                found = conn.execute(
                    "SELECT workers FROM paused_queues WHERE name = %s", (name,)
                ).fetchone()
                conn.execute(
                    "INSERT INTO paused_queues (name, paused_at, paused_by, workers) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                    "paused_at = EXCLUDED.paused_at, paused_by = EXCLUDED.paused_by, "
                    "workers = EXCLUDED.workers",
                    (name, at, user, merged_workers(found[0] if found else None, workers)),
                )

        self._run(write)

    def add_paused_worker(self, name: str, worker: str) -> None:
        """A worker that came online consuming a paused queue was told to stop."""

        def write(conn: psycopg.Connection[Any]) -> None:
            with self._locked(conn):
                found = conn.execute(
                    "SELECT workers FROM paused_queues WHERE name = %s", (name,)
                ).fetchone()
                if found is None:
                    return
                conn.execute(
                    "UPDATE paused_queues SET workers = %s WHERE name = %s",
                    (merged_workers(found[0], [worker]), name),
                )

        self._run(write)

    def resume(self, name: str) -> list[str] | None:
        """Forget the pause; returns the workers to add the consumer back on (None: not paused)."""
        found = self._run(
            lambda conn: conn.execute(
                "DELETE FROM paused_queues WHERE name = %s RETURNING workers", (name,)
            ).fetchone()
        )
        return None if found is None else list(json.loads(found[0]))

    def paused(self) -> dict[str, dict[str, Any]]:
        """``{queue: {"paused_at", "paused_by", "workers"}}`` for every paused queue."""
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT name, paused_at, paused_by, workers FROM paused_queues "
                'ORDER BY name COLLATE "C"'
            ).fetchall()
        )
        return paused_map(rows)
