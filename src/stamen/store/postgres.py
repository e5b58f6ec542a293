"""The history store on PostgreSQL (psycopg 3): ``--db=postgresql://...``.

Same public interface and behaviour as the SQLite store (``StoreWriter``/``StoreReader``;
``stamen.store.HistoryWriter``/``HistoryReader`` name it), so ingest, the API and the pages
do not know which one they use; one contract suite (tests/integration/test_store_contract.py)
runs against both.

Where SQLite semantics had to be spelt out:

* ``COLLATE NOCASE`` (filters, text sorts) is ``nocase(col)`` (ASCII folding) and text order
  is ``COLLATE "C"`` (code point order, as SQLite's ``memcmp``), whatever the database's
  collation; expression indexes are built on exactly those expressions.
* SQLite sorts NULL first ascending and last descending: every ``ORDER BY`` says
  ``NULLS FIRST``/``NULLS LAST`` to match, and indexes are ``NULLS FIRST`` so both directions
  scan them.
* SQLite keeps whatever type a value has; here columns are typed. Numbers arriving as text
  are parsed (else stored as NULL), non-text values in text columns are stored as their text
  (JSON for containers, as SQLite does), and NUL characters (which PostgreSQL text cannot
  hold) become U+FFFD.

The schema is versioned in ``stamen_schema_version`` and migrated on start by
``migrate`` (and ``stamen db upgrade``) under a transaction-scoped advisory lock, so
instances starting together do not race. Search uses ``pg_trgm`` GIN indexes; if the
extension cannot be created, the store works and search scans (a warning says so).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from stamen.model import CELERY_STATES, WORKER_FIELDS
from stamen.search.pg import SEARCH_TEXT, ascii_lower, compile_query, has_kwargs_pair, nocase_c
from stamen.search.sql import _cached_pairs
from stamen.store.reader import (
    LIVE_TASK_COLUMNS,
    SORTABLE,
    SQL_MAX_INT,
    WALK_FIRST,
    WALK_SORTS,
    WORKFLOW_COLUMNS,
    FailureRow,
    RollupRow,
    TaskQuery,
    task_from_row,
)
from stamen.store.rollup import KEEP_SECONDS, delta_of
from stamen.store.rollup_sql import apply_rollups, prune_rollups
from stamen.store.schema import TASK_COLUMNS
from stamen.store.sqlite import StoreError
from stamen.store.writer import PRUNE_EVERY, Batch, Trimmed

log = logging.getLogger(__name__)

URL_SCHEMES = ("postgresql://", "postgres://")

#: The newest schema version this Stamen knows.
SCHEMA_VERSION = 2

_FLOAT_COLUMNS = frozenset(
    {"received", "sent", "started", "rejected", "succeeded", "failed", "retried", "revoked"}
    | {"timestamp", "runtime"}
)
_INT_COLUMNS = frozenset({"retries", "clock"})
_WORKER_COLUMNS: tuple[str, ...] = (*WORKER_FIELDS, "timestamp")
_WORKER_FLOATS = frozenset({"freq", "timestamp"})
_WORKER_INTS = frozenset({"pid", "clock", "active", "processed"})
_SORT_TEXT = frozenset(c for c in TASK_COLUMNS if c not in _FLOAT_COLUMNS | _INT_COLUMNS)
_SELECT = ", ".join(f"tasks.{c}" for c in TASK_COLUMNS)
_INT64 = (-(2**63), 2**63 - 1)
#: Rows a search walk may test. Each costs a few microseconds here (the search is evaluated
#: on the row, not looked up in an index as SQLite's walk does), so the bound is lower than
#: SQLite's: a walk never costs much more than ~100 ms before handing over.
PG_WALK_BUDGET = 20_000


def is_postgres_url(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database rather than a SQLite file."""
    return db.startswith(URL_SCHEMES)


def _named(url: str) -> dict[str, str]:
    """``application_name=stamen``, unless the URL names the application itself (so an
    operator can tell instances apart in ``pg_stat_activity``)."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        given = {}
    return {} if given.get("application_name") else {"application_name": "stamen"}


def one_line(exc: BaseException) -> str:
    """libpq's message on one line (it puts its hint on a second, tab-indented one)."""
    return " ".join(str(exc).split())


def connect(url: str, *, readonly: bool = False, writer: bool = False) -> psycopg.Connection[Any]:
    """An autocommit connection (transactions are explicit, reads see the latest commit).

    A ``writer`` connection has keepalives, so a dead peer shows within seconds on both
    sides: the server ends the session of a vanished leader (releasing its ingest lock) and
    the leader notices a vanished server, so a takeover does not wait for TCP's two-hour
    default. It also commits without waiting for the WAL flush (``synchronous_commit=off``):
    a server crash loses at most the last moments of history, never consistency, which is
    the durability DESIGN.md promises for SQLite too, and a commit costs no fsync wait.
    """
    extra: dict[str, Any] = {}
    if writer:
        extra = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2}
        extra["keepalives_count"] = 2
    try:
        conn = psycopg.connect(url, autocommit=True, **_named(url), **extra)
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {one_line(exc)}") from exc
    if readonly:
        conn.execute("SET default_transaction_read_only = on")
    if writer:
        _writer_session(conn)
    return conn


def _writer_session(conn: psycopg.Connection[Any]) -> None:
    """Session settings of the writer (user-settable, so no server configuration needed)."""
    conn.execute("SET synchronous_commit = off")
    conn.execute("SET tcp_keepalives_idle = 5")
    conn.execute("SET tcp_keepalives_interval = 2")
    conn.execute("SET tcp_keepalives_count = 2")


# --- schema and migrations ----------------------------------------------------------------


def _float_cols(names: Iterable[str]) -> str:
    return ", ".join(f"{c} double precision" for c in names)


def _task_column_ddl() -> str:
    kinds = []
    for column in TASK_COLUMNS[1:]:
        kind = (
            "double precision"
            if column in _FLOAT_COLUMNS
            else "bigint"
            if column in _INT_COLUMNS
            else "text"
        )
        kinds.append(f"{column} {kind}")
    return ",\n        ".join(kinds)


def _v1(trgm: str | None) -> list[str]:
    """Version 1: the tables and B-tree indexes of the SQLite schema, plus ``kwargs_pairs``."""
    statements = [
        "CREATE TABLE meta (key text PRIMARY KEY, value text)",
        f"""
        CREATE TABLE tasks (
            id bigint PRIMARY KEY,
            uuid text NOT NULL UNIQUE,
            {_task_column_ddl()},
            seq bigint NOT NULL DEFAULT 0,
            kwargs_pairs text[] NOT NULL DEFAULT '{{}}'
        )
        """,
        'CREATE INDEX tasks_by_time ON tasks (timestamp NULLS FIRST, uuid COLLATE "C")',
        "CREATE INDEX tasks_by_seq ON tasks (seq)",
        'CREATE INDEX tasks_by_received ON tasks (received NULLS FIRST, uuid COLLATE "C")',
        'CREATE INDEX tasks_by_started ON tasks (started NULLS FIRST, uuid COLLATE "C")',
        "CREATE INDEX tasks_by_parent ON tasks (parent_id)",
        "CREATE INDEX tasks_by_root ON tasks (root_id)",
        "CREATE INDEX tasks_by_kwargs_pairs ON tasks USING gin (kwargs_pairs)",
        "CREATE TABLE task_types (name text PRIMARY KEY)",
        f"""
        CREATE TABLE workers (
            hostname text PRIMARY KEY,
            pid bigint, freq double precision, heartbeats text, clock bigint, active bigint,
            processed bigint, loadavg text, sw_ident text, sw_ver text, sw_sys text,
            {_float_cols(["timestamp"])},
            seq bigint NOT NULL DEFAULT 0
        )
        """,
        """
        CREATE TABLE worker_counters (
            id bigserial,
            hostname text NOT NULL,
            type text NOT NULL,
            count bigint NOT NULL,
            first_seen bigint NOT NULL,
            PRIMARY KEY (hostname, type)
        )
        """,
    ]
    for column in ("name", "state", "worker"):
        statements.append(
            f"CREATE INDEX tasks_by_{column} ON tasks "
            f"({nocase_c(column)} NULLS FIRST, timestamp NULLS FIRST)"
        )
    return statements


def _v2(trgm: str | None) -> list[str]:
    """Version 2: the rollups of the charts and failures pages (built from the stored tasks
    by ``_build_rollups`` after this runs), the index for a state filter sorted by received
    time, and the marks of backfilled tasks."""
    return [
        """
        CREATE TABLE task_rollups (
            width integer NOT NULL,
            bucket double precision NOT NULL,
            name text NOT NULL,
            state text NOT NULL,
            count bigint NOT NULL,
            hist text NOT NULL,
            PRIMARY KEY (width, bucket, name, state)
        )
        """,
        """
        CREATE TABLE failure_rollups (
            width integer NOT NULL,
            bucket double precision NOT NULL,
            exception_type text NOT NULL,
            name text NOT NULL,
            count bigint NOT NULL,
            first_seen double precision,
            last_seen double precision,
            sample_uuid text,
            PRIMARY KEY (width, bucket, exception_type, name)
        )
        """,
        "CREATE TABLE backfilled (uuid text PRIMARY KEY, at double precision NOT NULL)",
        f"CREATE INDEX tasks_by_state_received ON tasks ({nocase_c('state')} NULLS FIRST, "
        'received NULLS FIRST, uuid COLLATE "C")',
    ]


#: ``(version, statements(trgm_opclass_or_None))`` in order; append, never edit, so that a
#: database made by any older Stamen upgrades in place.
MIGRATIONS: list[tuple[int, Callable[[str | None], list[str]]]] = [(1, _v1), (2, _v2)]


def _build_rollups(conn: psycopg.Connection[Any]) -> None:
    """Compute the rollups from the stored finished tasks (upgrading to version 2)."""
    cols = ("uuid", "name", "state", "timestamp", "runtime", "exception")
    # A server-side cursor: the tasks stream through in chunks rather than all at once.
    with conn.cursor(name="stamen_build_rollups") as rows:
        rows.execute(f"SELECT {', '.join(cols)} FROM tasks WHERE state IN ('SUCCESS', 'FAILURE')")
        delta = delta_of(dict(zip(cols, r, strict=True)) for r in rows)
    apply_rollups(conn.cursor(), delta, "%s")


def _search_indexes(trgm: str) -> list[str]:
    """Trigram indexes for substring search; idempotent, so ensured on every start (the
    extension may have become available after the database was created)."""
    return [f"CREATE INDEX IF NOT EXISTS tasks_trgm ON tasks USING gin ({SEARCH_TEXT} {trgm})"]


def _lock_key(conn: psycopg.Connection[Any], purpose: str) -> int:
    """An advisory lock key for ``purpose`` in this database *and schema*, so instances
    sharing a database through different schemas do not contend."""
    schema = conn.execute("SELECT current_schema()").fetchone()
    text = f"stamen:{purpose}:{schema[0] if schema else ''}"
    return zlib.crc32(text.encode()) - 2**31


def _trgm_opclass(conn: psycopg.Connection[Any]) -> str | None:
    """``schema.gin_trgm_ops`` once ``pg_trgm`` exists (created if allowed), else ``None``.

    The extension goes into ``public`` when it can, not into Stamen's own schema: a
    database holds one copy of an extension, and one created in a Stamen schema would take
    every other schema's search index with it when that schema is dropped.
    """
    for statement in (
        "CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public",
        "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    ):
        try:
            with conn.transaction():
                conn.execute(statement)
            break
        except psycopg.Error as exc:
            failure = exc
    else:
        log.warning("pg_trgm is not available (%s): task search will scan the table", failure)
    row = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pg_trgm'"
    ).fetchone()
    return None if row is None else f'"{row[0]}".gin_trgm_ops'


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The schema version of the database (0 when Stamen never created it)."""
    if conn.execute("SELECT to_regclass('stamen_schema_version')").fetchone()[0] is None:  # type: ignore[index]
        return 0
    row = conn.execute("SELECT max(version) FROM stamen_schema_version").fetchone()
    return int(row[0] or 0) if row else 0


#: Every table Stamen makes in its schema (the history's, and the action store's in
#: ``stamen.audit_pg``): in a schema without Stamen's version table, any of them is someone
#: else's, and creating the others beside it would end in errors later.
STAMEN_TABLES = (
    "tasks", "workers", "worker_counters", "task_types", "meta", "task_rollups",
    "failure_rollups", "backfilled", "audit_log", "task_retries", "paused_queues",
)  # fmt: skip


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Create or upgrade the schema in the current schema (``search_path``); returns the
    version. Refuses a database newer than this Stamen, or one holding foreign tables."""
    found = conn.execute("SELECT current_schema()").fetchone()
    if found is None or found[0] is None:
        path = conn.execute("SHOW search_path").fetchone()
        raise StoreError(
            f"no schema of the search path ({path[0] if path else ''}) exists in this "
            "database: create it (CREATE SCHEMA <name>) or name another in the URL "
            "(?options=-csearch_path%3D<name>)"
        )
    trgm = _trgm_opclass(conn)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(conn, "migrate"),))
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the database has schema version {version}, newer than this Stamen "
                f"understands ({SCHEMA_VERSION}); upgrade Stamen"
            )
        if version == 0:
            foreign = [
                row[0]
                for row in conn.execute(
                    "SELECT c.relname FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = current_schema() AND c.relname = ANY(%s)"
                    " ORDER BY c.relname",
                    (list(STAMEN_TABLES),),
                )
            ]
            if foreign:
                raise StoreError(
                    "the database schema holds tables that are not Stamen's "
                    f"({', '.join(foreign)}): give Stamen a schema of its own"
                )
            conn.execute(
                "CREATE TABLE stamen_schema_version ("
                " version integer PRIMARY KEY, applied_at double precision NOT NULL)"
            )
        for target, statements in MIGRATIONS:
            if target <= version:
                continue
            for statement in statements(trgm):
                conn.execute(statement)
            if target == 2:
                _build_rollups(conn)
            conn.execute(
                "INSERT INTO stamen_schema_version (version, applied_at) VALUES (%s, %s)",
                (target, time.time()),
            )
            log.info("PostgreSQL store migrated to schema version %d", target)
            version = target
        # Checked first: CREATE INDEX takes a share lock on tasks even when the index exists,
        # which would stall the ingesting instance's writes whenever another one starts.
        if trgm is not None:
            found = conn.execute("SELECT to_regclass('tasks_trgm')").fetchone()
            if found is None or found[0] is None:
                for statement in _search_indexes(trgm):
                    conn.execute(statement)
    return version


# --- value conversion ---------------------------------------------------------------------

_SCALARS = (str, int, float, type(None))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text: str
    if isinstance(value, str):
        text = value
    elif isinstance(value, _SCALARS):
        text = str(value)
    else:
        text = orjson.dumps(value, default=repr).decode()
    return text.replace("\0", "\ufffd") if "\0" in text else text


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        number = int(value) if not isinstance(value, str) else int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return number if _INT64[0] <= number <= _INT64[1] else None


def _converter(column: str, floats: frozenset[str], ints: frozenset[str]) -> Callable[[Any], Any]:
    return _float if column in floats else _int if column in ints else _text


_TASK_CONVERT = [_converter(c, _FLOAT_COLUMNS, _INT_COLUMNS) for c in TASK_COLUMNS]
_WORKER_CONVERT = [_converter(c, _WORKER_FLOATS, _WORKER_INTS) for c in _WORKER_COLUMNS]


def _kwargs_pairs(value: Any) -> list[str]:
    """Flower's normalised kwargs pairs, from the kwargs text as SQLite would store it."""
    if value is not None and not isinstance(value, _SCALARS):
        value = orjson.dumps(value, default=repr).decode()
    if value is None:
        return []
    return sorted(pair.replace("\0", "\ufffd") for pair in _cached_pairs(value))


def _decode_worker(row: Sequence[Any]) -> dict[str, Any]:
    worker = dict(zip(_WORKER_COLUMNS, row, strict=True))
    for key in ("heartbeats", "loadavg"):
        if isinstance(worker[key], str):
            worker[key] = orjson.loads(worker[key])
    worker["heartbeats"] = worker["heartbeats"] or []
    return worker


# --- the writer ---------------------------------------------------------------------------

_TASK_INSERT = (
    f"INSERT INTO tasks (id, {', '.join(TASK_COLUMNS)}, seq, kwargs_pairs) "
    f"VALUES ({', '.join(['%s'] * (len(TASK_COLUMNS) + 3))}) "
    "ON CONFLICT (uuid) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in (*TASK_COLUMNS[1:], "seq", "kwargs_pairs"))
)
_WORKER_INSERT = (
    f"INSERT INTO workers ({', '.join(_WORKER_COLUMNS)}, seq) "
    f"VALUES ({', '.join(['%s'] * (len(_WORKER_COLUMNS) + 1))}) "
    "ON CONFLICT (hostname) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in (*_WORKER_COLUMNS[1:], "seq"))
)
_COUNTER_INSERT = (
    "INSERT INTO worker_counters (hostname, type, count, first_seen) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (hostname, type) DO UPDATE SET count = worker_counters.count + excluded.count"
)
_META_UPSERT = (
    "INSERT INTO meta (key, value) VALUES (%s, %s) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class PostgresWriter:
    """Writes batches and trims history. Not thread-safe: one ingest thread owns it."""

    def __init__(
        self,
        url: str,
        *,
        max_tasks: int,
        max_task_age: float | None = None,
        max_workers: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.conn = connect(url, writer=True)
        migrate(self.conn)
        self.max_tasks = max_tasks
        self.max_task_age = max_task_age
        self.max_workers = max_workers
        self._clock = clock
        self._ingest_key = _lock_key(self.conn, "ingest")
        self._pruned_at = 0.0
        self.seq = 0
        self.task_count = 0
        self._next_id = 1
        self._resume()

    def _resume(self) -> None:
        """Read the sequence number, next id and task count as the last writer left them.

        The count is counted once (a database made before the meta row existed) and then
        kept in ``meta`` by every write, so a takeover on 10M tasks does not scan them.
        """
        self.seq = int(self._meta("seq", 0))
        row = self.conn.execute("SELECT max(id) FROM tasks").fetchone()
        self._next_id = ((row[0] if row else None) or 0) + 1
        stored = self._meta("task_count", None)
        if stored is None:
            counted = self.conn.execute("SELECT count(*) FROM tasks").fetchone()
            self.task_count = int(counted[0]) if counted else 0
            self._set_meta(task_count=self.task_count)
        else:
            self.task_count = int(stored)

    # Ingest election: any number of instances share the database, one writes at a time.

    def try_lead(self) -> bool:
        """Take the ingest lock of this database schema if nobody holds it.

        The lock is a session advisory lock on this writer's own connection: if the
        connection dies, PostgreSQL releases the lock *and* this writer can no longer
        commit, so two instances never write at once. On success the writer re-reads its
        state, which another leader may have moved on since this one last wrote.
        """
        if self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = connect(self.url, writer=True)
        row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (self._ingest_key,)).fetchone()
        if not (row and row[0]):
            return False
        self._resume()
        return True

    def still_leading(self) -> bool:
        """False once the connection holding the lock is known to be gone (a write failed
        on it, or it was closed); checked without a query, so never inside a write."""
        return not (self.conn.closed or self.conn.broken)

    def close(self) -> None:
        self.conn.close()

    def _meta(self, key: str, default: Any) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return default if row is None else row[0]

    def _set_meta(self, **values: Any) -> None:
        self.conn.cursor().executemany(
            _META_UPSERT, [(key, str(value)) for key, value in values.items()]
        )

    # Reads the ingest side needs to resume where it stopped.

    def load_tasks(self, uuids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Stored records for those of ``uuids`` that exist, keyed and named as asked.

        A uuid holding NUL was stored with U+FFFD in its place (``_text``): it is looked up
        that way and handed back under the uuid ingest knows, so its next event merges into
        the stored task instead of failing the batch.
        """
        asked: dict[str, list[str]] = {}
        for uuid in uuids:
            asked.setdefault(_text(uuid) or "", []).append(uuid)
        found: dict[str, dict[str, Any]] = {}
        if not asked:
            return found
        cols = ", ".join(TASK_COLUMNS)
        rows = self.conn.execute(
            f"SELECT {cols}, id FROM tasks WHERE uuid = ANY(%s)", (list(asked),)
        )
        for row in rows:
            for uuid in asked[row[0]]:
                record = dict(zip(TASK_COLUMNS, row[:-1], strict=True))
                record["id"] = row[-1]
                record["uuid"] = uuid
                found[uuid] = record
        return found

    def load_workers(self) -> dict[str, dict[str, Any]]:
        cols = ", ".join(_WORKER_COLUMNS)
        workers = {}
        for row in self.conn.execute(f"SELECT {cols} FROM workers"):
            record = _decode_worker(row)
            workers[record["hostname"]] = record
        return workers

    def load_custom_states(self) -> set[str]:
        value = self._meta("custom_states", None)
        return set(orjson.loads(value)) if value else set()

    def load_task_types(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT name FROM task_types")}

    # The write path.

    def write(self, batch: Batch) -> Trimmed:
        """Commit one batch as one transaction under the next sequence number."""
        trimmed = Trimmed()
        if not batch:
            return trimmed
        self.seq += 1
        seq = self.seq
        # Ids handed out to a failed batch are not taken back: its tasks may live on in
        # ingest's cache with them, and a gap in ids is harmless.
        count_before = self.task_count
        try:
            with self.conn.transaction():
                cur = self.conn.cursor()
                if batch.tasks:
                    self._write_tasks(cur, batch, seq)
                self._write_rollups(cur, batch)
                if batch.workers:
                    cur.executemany(
                        _WORKER_INSERT,
                        [
                            (
                                *[
                                    f(w.get(c))
                                    for f, c in zip(_WORKER_CONVERT, _WORKER_COLUMNS, strict=True)
                                ],
                                seq,
                            )
                            for w in batch.workers.values()
                        ],
                    )
                if batch.counters:
                    now = int(self._clock())
                    # In the batch's order: new rows' ids record the order types were seen.
                    cur.executemany(
                        _COUNTER_INSERT,
                        [(host, kind, n, now) for (host, kind), n in batch.counters.items()],
                    )
                if batch.task_types:
                    cur.executemany(
                        "INSERT INTO task_types (name) VALUES (%s) ON CONFLICT DO NOTHING",
                        [(_text(name),) for name in sorted(batch.task_types)],
                    )
                trimmed.uuids = self._trim(cur)
                if batch.custom_states:
                    self._set_meta(custom_states=orjson.dumps(sorted(batch.custom_states)).decode())
                self._set_meta(seq=seq, task_count=self.task_count, written_at=self._clock())
        except BaseException:
            self.seq -= 1
            self.task_count = count_before
            raise
        return trimmed

    def _write_tasks(self, cur: psycopg.Cursor[Any], batch: Batch, seq: int) -> None:
        rows = []
        for task in batch.tasks.values():
            task_id = task.get("id")
            if task_id is None:
                task_id = task["id"] = self._next_id
                self._next_id += 1
            rows.append(
                (
                    task_id,
                    *[f(task.get(c)) for f, c in zip(_TASK_CONVERT, TASK_COLUMNS, strict=True)],
                    seq,
                    _kwargs_pairs(task.get("kwargs")),
                )
            )
        # Ascending ids: B-tree appends, and a stable lock order.
        rows.sort(key=lambda r: r[0])
        cur.executemany(_TASK_INSERT, rows)
        self.task_count += batch.new_tasks

    def _write_rollups(self, cur: psycopg.Cursor[Any], batch: Batch) -> None:
        """Apply the batch's rollup change and backfill marks; prune old rollups hourly."""
        if batch.rollups:
            for group in batch.rollups.failures.values():
                group.sample_uuid = _text(group.sample_uuid)  # as the task's uuid is stored
            apply_rollups(cur, batch.rollups, "%s")
        if batch.backfilled:
            now = self._clock()
            cur.executemany(
                "INSERT INTO backfilled (uuid, at) VALUES (%s, %s) ON CONFLICT (uuid) DO NOTHING",
                [(_text(uuid), now) for uuid in sorted(batch.backfilled)],
            )
        now = self._clock()
        if now - self._pruned_at >= PRUNE_EVERY:
            prune_rollups(cur, now - KEEP_SECONDS, "%s")
            self._pruned_at = now

    def _trim(self, cur: psycopg.Cursor[Any]) -> list[str]:
        """Drop the least recently updated tasks beyond the count and age limits."""
        removed: list[str] = []
        if self.max_task_age is not None:
            cutoff = self._clock() - self.max_task_age
            rows = cur.execute(
                "DELETE FROM tasks WHERE timestamp < %s RETURNING uuid", (cutoff,)
            ).fetchall()
            removed += [r[0] for r in rows]
            self.task_count -= len(rows)
        excess = self.task_count - self.max_tasks
        if excess > 0:
            rows = cur.execute(
                "DELETE FROM tasks WHERE id IN ("
                ' SELECT id FROM tasks ORDER BY timestamp NULLS FIRST, uuid COLLATE "C" LIMIT %s'
                ") RETURNING uuid",
                (excess,),
            ).fetchall()
            removed += [r[0] for r in rows]
            self.task_count -= len(rows)
        if removed:
            cur.execute("DELETE FROM backfilled WHERE uuid = ANY(%s)", (removed,))
        return removed

    def trim_workers(self, keep: Mapping[str, Any]) -> None:
        """Forget stored workers that ingest no longer keeps (``max_workers``)."""
        stored = [r[0] for r in self.conn.execute("SELECT hostname FROM workers")]
        gone = [h for h in stored if h not in keep]
        if gone:
            self.conn.execute("DELETE FROM workers WHERE hostname = ANY(%s)", (gone,))


# --- the reader ---------------------------------------------------------------------------

#: Default bound on the reader's connections (``--db_pool_size``).
READER_CONNECTIONS = 10
#: Seconds a query waits for a free reader connection before failing (a 503 on the API).
POOL_TIMEOUT = 30.0


#: A pooled connection idle longer than this is checked with a round trip before use.
IDLE_CHECK = 5.0


def _reader_session(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET default_transaction_read_only = on")


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    """The pool's check on checkout, skipped for a connection used in the last seconds: a
    server restart or an idle timeout shows on a connection that sat in the pool, and a
    round trip on every call would cost a fifth of a millisecond each."""
    if time.monotonic() - getattr(conn, "_stamen_used", 0.0) > IDLE_CHECK:
        ConnectionPool.check_connection(conn)


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _borrows(method: _Method) -> _Method:
    """Run a reader method on a connection borrowed from the pool for the call (a call made
    from inside another one uses the outer call's connection). A server that cannot answer
    (down, every connection busy past the pool's timeout) is a ``StoreError``, as for
    SQLite, so callers need not know psycopg's exceptions."""

    @functools.wraps(method)
    def borrowing(self: PostgresReader, *args: Any, **kwargs: Any) -> Any:
        try:
            with self.connection():
                return method(self, *args, **kwargs)
        except psycopg.OperationalError as exc:
            raise StoreError(f"PostgreSQL unavailable: {one_line(exc)}") from exc

    return borrowing  # type: ignore[return-value]


class PostgresReader:
    """Queries over the history; safe to call from any thread.

    Each call borrows a connection from a pool of at most ``connections`` for its duration,
    so the connections an instance holds stay bounded however many threads serve requests
    (PostgreSQL's default ``max_connections`` is 100, shared by every instance). A call
    that finds them all busy waits up to ``POOL_TIMEOUT``. A connection that sat idle is
    checked on checkout and replaced if the server dropped it; one dropped right after use
    fails the call that finds out (a 503), and the pool discards it.
    """

    def __init__(self, url: str, connections: int = READER_CONNECTIONS) -> None:
        self.url = url
        self.path = url
        self._local = threading.local()
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=connections,
            kwargs={"autocommit": True, **_named(url)},
            configure=_reader_session,
            check=_check_if_idle,
            timeout=POOL_TIMEOUT,
            name="stamen-reader",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=POOL_TIMEOUT)
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreError(f"cannot connect to PostgreSQL: {one_line(exc)}") from exc

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """This thread's connection for the block: borrowed from the pool, or the one an
        enclosing block already holds."""
        local = self._local
        held = getattr(local, "conn", None)
        if held is not None:
            yield held
            return
        with self._pool.connection() as conn:
            local.conn = conn
            try:
                yield conn
            finally:
                local.conn = None
                conn._stamen_used = time.monotonic()  # type: ignore[attr-defined]

    @property
    def raw(self) -> psycopg.Connection[Any]:
        """The connection of the call in progress on this thread."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None:
            raise RuntimeError("PostgresReader.raw is only valid inside a reader method")
        return conn

    def _meta(self, key: str, default: Any = None) -> Any:
        row = self.raw.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return default if row is None else row[0]

    @_borrows
    def seq(self) -> int:
        return int(self._meta("seq", 0))

    @_borrows
    def task_count(self) -> int:
        return int(self._meta("task_count", 0))

    @_borrows
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
                clauses.append(f"{nocase_c(f'tasks.{column}')} = %s")
                params.append(_text(ascii_lower(value)))
        for column, start, end in (
            ("received", q.received_start, q.received_end),
            ("started", q.started_start, q.started_end),
        ):
            if start is not None:
                clauses.append(f"(tasks.{column} IS NULL OR tasks.{column} >= %s)")
                params.append(start)
            if end is not None:
                clauses.append(f"(tasks.{column} IS NULL OR tasks.{column} <= %s)")
                params.append(end)
        if q.search is not None:
            expr, search_params = compile_query(q.search, self.states())
            clauses.append(f"({expr})")
            params.extend(search_params)
        return (" AND ".join(clauses) or "TRUE"), params

    def _order(self, q: TaskQuery) -> str:
        # PostgreSQL cannot estimate how many rows a kwargs pair matches (array containment
        # gets a fixed 0.5% guess), so with ORDER BY ... LIMIT it would walk the time index
        # hoping to meet matches soon, and read the whole table for a rare pair. Ordering by
        # an expression no index has ("+ 0") makes it collect the matches through the
        # kwargs_pairs index first and sort them, as SQLite does with every search.
        fence = " + 0" if q.search is not None and has_kwargs_pair(q.search) else ""
        if q.sort_by is None or q.sort_by not in SORTABLE:
            return f'(tasks.timestamp{fence}) DESC NULLS LAST, tasks.uuid COLLATE "C" DESC'
        direction = "DESC NULLS LAST" if q.descending else "ASC NULLS FIRST"
        if q.sort_by in _SORT_TEXT:
            key = nocase_c(f"tasks.{q.sort_by}")
        else:
            key = f"(tasks.{q.sort_by}{fence})"
        return f'{key} {direction}, tasks.uuid COLLATE "C" {direction}'

    @_borrows
    def list_tasks(self, q: TaskQuery) -> list[dict[str, Any]]:
        """One page of tasks in order, each as Celery's ``as_dict()`` with children."""
        if q.limit is not None and q.limit <= 0:
            return []
        # Only a kwargs pair needs the walk: for substring terms and states the planner
        # itself walks the sort index and filters (2-7 ms a page on 10M tasks, broad or
        # not), but a pair's ordering fence (``_order``) makes it fetch and sort every
        # match, seconds for a pair a tenth of the history has (docs/performance.md).
        if (
            q.search is not None
            and has_kwargs_pair(q.search)
            and q.limit is not None
            and q.sort_by in WALK_SORTS
        ):
            page = self._walk(q)
            if page is not None:
                return page
        return self.exact_page(q)

    @_borrows
    def exact_page(self, q: TaskQuery) -> list[dict[str, Any]]:
        """The page by one query over all matching tasks: what a search walk must equal,
        and the plan for rare terms (the trigram index hands over their few matches)."""
        if q.limit is not None and q.limit <= 0:
            return []
        where, params = self._where(q)
        sql = f"SELECT {_SELECT} FROM tasks WHERE {where} ORDER BY {self._order(q)}"
        sql += " LIMIT %s OFFSET %s"
        # BIGINT binds 64-bit integers only: a larger limit means "all", a larger offset
        # "none", as for SQLite and Flower's list slicing.
        limit = None if q.limit is None else min(q.limit, SQL_MAX_INT)
        params += [limit, min(max(q.offset, 0), SQL_MAX_INT)]
        tasks = [task_from_row(row) for row in self.raw.execute(sql, params)]
        self._fill_children(tasks)
        return tasks

    def _walk(self, q: TaskQuery) -> list[dict[str, Any]] | None:
        """A search page found by walking the sort order newest-first (or as requested) in
        growing windows, testing only each window's rows against the search.

        The planner cannot estimate how many tasks a kwargs pair matches, so such searches
        fetch every match and sort them (``_order``), seconds for a pair a tenth of 10M
        tasks hold; walking finds the newest matches at once. A window of
        the sort order's first ``W`` rows (the filters applied, the search not) is read
        through its B-tree index and the search tested on those rows alone; the page is the
        window's first matches, in one statement and so one snapshot, hence exactly the
        rows and order of the full plan. The window grows while the page is short and the
        window was full; ``None`` (use ``exact_page``) once the density seen says the page
        lies beyond ``PG_WALK_BUDGET`` rows: a term that rare is cheap to fetch whole.
        """
        assert q.limit is not None
        need = max(q.offset, 0) + q.limit
        if need > PG_WALK_BUDGET:
            return None
        plain = replace(q, search=None)
        base, base_params = self._where(plain)
        order = self._order(plain)
        search, search_params = compile_query(q.search, self.states())
        sql = (
            f"SELECT count(*), (array_agg(tasks.id ORDER BY {order}) FILTER (WHERE {search}))"
            f"[1:%s::int] FROM (SELECT tasks.* FROM tasks WHERE {base} ORDER BY {order} LIMIT %s)"
            " AS tasks"
        )
        window = min(max(WALK_FIRST, 4 * need), PG_WALK_BUDGET)
        with self.raw.transaction():
            # Rounds and the final read share one snapshot.
            self.raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            while True:
                row = self.raw.execute(sql, [*search_params, need, *base_params, window])
                walked, found = row.fetchone()  # type: ignore[misc]
                found = found or []
                if len(found) >= need or walked < window:
                    break
                # Rows still to walk at the density seen so far (one match if none yet).
                ahead = (need - len(found)) * walked / max(len(found), 1)
                if window >= PG_WALK_BUDGET or walked + ahead > PG_WALK_BUDGET:
                    return None
                window = min(max(2 * window, int(1.25 * (walked + ahead))), PG_WALK_BUDGET)
            page = found[max(q.offset, 0) : need]
            rows = self.raw.execute(
                f"SELECT {_SELECT}, tasks.id FROM tasks WHERE tasks.id = ANY(%s)", (page,)
            ).fetchall()
        by_id = {row[-1]: row[:-1] for row in rows}
        tasks = [task_from_row(by_id[i]) for i in page]
        self._fill_children(tasks)
        return tasks

    @_borrows
    def count_tasks(self, q: TaskQuery) -> int:
        where, params = self._where(q)
        if where == "TRUE":
            return self.task_count()
        row = self.raw.execute(f"SELECT count(*) FROM tasks WHERE {where}", params).fetchone()
        return int(row[0]) if row else 0

    @_borrows
    def get_task(self, uuid: str) -> dict[str, Any] | None:
        row = self.raw.execute(
            f"SELECT {_SELECT} FROM tasks WHERE uuid = %s", (_text(uuid),)
        ).fetchone()
        if row is None:
            return None
        task = task_from_row(row)
        self._fill_children([task])
        marked = self.raw.execute("SELECT 1 FROM backfilled WHERE uuid = %s", (_text(uuid),))
        if marked.fetchone():
            task["backfilled"] = True
        return task

    def _fill_children(self, tasks: list[dict[str, Any]]) -> None:
        if not tasks:
            return
        by_id = {t["uuid"]: t for t in tasks}
        for parent_id, uuid in self.raw.execute(
            "SELECT parent_id, uuid FROM tasks WHERE parent_id = ANY(%s) "
            'ORDER BY received NULLS FIRST, uuid COLLATE "C"',
            (list(by_id),),
        ):
            by_id[parent_id]["children"].append(uuid)

    @_borrows
    def task_types(self) -> list[str]:
        rows = self.raw.execute('SELECT name FROM task_types ORDER BY name COLLATE "C"')
        return [r[0] for r in rows]

    @_borrows
    def workers(self) -> dict[str, dict[str, Any]]:
        """Every known worker's Celery fields plus ``timestamp`` (its last event)."""
        cols = ", ".join(_WORKER_COLUMNS)
        found: dict[str, dict[str, Any]] = {}
        for row in self.raw.execute(f'SELECT {cols} FROM workers ORDER BY hostname COLLATE "C"'):
            worker = _decode_worker(row)
            found[worker["hostname"]] = worker
        return found

    @_borrows
    def counters(self) -> dict[str, dict[str, int]]:
        """Per-hostname event counts, hosts and types in the order they were first seen."""
        found: dict[str, dict[str, int]] = {}
        for host, kind, count in self.raw.execute(
            "SELECT hostname, type, count FROM worker_counters ORDER BY first_seen, id"
        ):
            found.setdefault(host, {})[kind] = int(count)
        return found

    @_borrows
    def task_rollups(self, width: int, start: float) -> list[RollupRow]:
        """Task rollup rows of bucket width ``width`` from the bucket starting at ``start``."""
        return self.raw.execute(
            "SELECT bucket, name, state, count, hist FROM task_rollups "
            "WHERE width = %s AND bucket >= %s",
            (width, start),
        ).fetchall()

    @_borrows
    def failure_rollups(self, width: int, start: float) -> list[FailureRow]:
        """Failure group rows of bucket width ``width`` from the bucket starting at ``start``."""
        return self.raw.execute(
            "SELECT bucket, exception_type, name, count, first_seen, last_seen, sample_uuid "
            "FROM failure_rollups WHERE width = %s AND bucket >= %s",
            (width, start),
        ).fetchall()

    @_borrows
    def task_exceptions(self, uuids: Iterable[str]) -> dict[str, tuple[Any, Any]]:
        """(exception, traceback) of those of ``uuids`` still stored."""
        ids = [_text(u) for u in uuids]
        if not ids:
            return {}
        rows = self.raw.execute(
            "SELECT uuid, exception, traceback FROM tasks WHERE uuid = ANY(%s)", (ids,)
        )
        return {uuid: (exception, traceback) for uuid, exception, traceback in rows}

    @_borrows
    def workflow_rows(self, taskid: str, limit: int) -> tuple[str, list[dict[str, Any]]] | None:
        """The root id of ``taskid``'s workflow and up to ``limit`` of its tasks."""
        row = self.raw.execute(
            "SELECT root_id FROM tasks WHERE uuid = %s", (_text(taskid),)
        ).fetchone()
        if row is None:
            return None
        root_id = row[0] or _text(taskid)
        cols = ", ".join(WORKFLOW_COLUMNS)
        rows = self.raw.execute(
            f"SELECT {cols} FROM tasks WHERE root_id = %s "
            f"UNION SELECT {cols} FROM tasks WHERE uuid = %s LIMIT %s",
            (root_id, root_id, limit),
        ).fetchall()
        return root_id, [dict(zip(WORKFLOW_COLUMNS, r, strict=True)) for r in rows]

    # What ``/metrics`` computes at scrape time.

    @_borrows
    def sent_times(self, uuids: Iterable[str]) -> dict[str, float]:
        """``task-sent`` time of those of ``uuids`` stored with one."""
        ids = [_text(u) for u in uuids]
        if not ids:
            return {}
        rows = self.raw.execute(
            "SELECT uuid, sent FROM tasks WHERE uuid = ANY(%s) AND sent IS NOT NULL", (ids,)
        )
        return {uuid: float(sent) for uuid, sent in rows}

    @_borrows
    def time_span(self) -> tuple[float | None, float | None]:
        """Timestamps of the oldest and newest task kept (``None`` when empty); both ends
        of ``tasks_by_time``."""
        row = self.raw.execute("SELECT min(timestamp), max(timestamp) FROM tasks").fetchone()
        return (row[0], row[1]) if row else (None, None)

    @_borrows
    def state_counts(self) -> list[tuple[str, int]]:
        """Tasks per state (states differing in ASCII case count as one, named by the first
        spelling in code point order), in case-folded order, as the SQLite store gives them."""
        groups: dict[str, list[Any]] = {}
        for state, n in self.raw.execute(
            "SELECT state, count(*) FROM tasks WHERE state IS NOT NULL GROUP BY state "
            'ORDER BY state COLLATE "C"'
        ):
            group = groups.setdefault(ascii_lower(state), [state, 0])
            group[1] += int(n)
        return [(str(state), n) for _, (state, n) in sorted(groups.items())]

    @_borrows
    def size_bytes(self) -> int:
        """Bytes the history's schema takes on the server: every table with its indexes."""
        row = self.raw.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'"
        ).fetchone()
        return int(row[0]) if row else 0

    @_borrows
    def changed_tasks(self, since: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """The newest ``limit`` tasks written after change number ``since`` (the live pages'
        columns only) and how many there are, counted up to ``limit + 1``; ``tasks_by_seq``
        serves it."""
        cols = ", ".join(LIVE_TASK_COLUMNS)
        rows = self.raw.execute(
            f"SELECT {cols} FROM tasks WHERE seq > %s ORDER BY seq DESC LIMIT %s",
            (since, limit + 1),
        ).fetchall()
        tasks = [dict(zip(LIVE_TASK_COLUMNS, r, strict=True)) for r in rows[:limit]]
        return tasks, len(rows)
