"""The SQLite schema of the history store, versioned so an upgrade can migrate a database.

Tasks keep Celery's field names as columns. ``seq`` is the change sequence number of the
last write that touched the row (DESIGN rule 2). ``tasks_fts`` is an FTS5 trigram index
over the text fields that plain search terms and ``name:``/``worker:``/``args:``/
``kwargs:``/``result:`` qualifiers look into; its rowid is ``tasks.id``. The writer keeps
it in step itself, in bulk and only for rows whose indexed text changed: per-row triggers
cost five times as much on the ingest path.

Version 2 added the rollups the writer keeps for the charts and failures pages
(``task_rollups``, ``failure_rollups``; see ``stamen.store.rollup``), the index for a state
filter sorted by received time, and ``backfilled``, the tasks filled in from the result
backend rather than from events.
"""

from __future__ import annotations

SCHEMA_VERSION = 2

#: Columns of the ``tasks`` table after ``id``, in Celery's field order.
TASK_COLUMNS: tuple[str, ...] = (
    "uuid", "name", "state", "received", "sent", "started", "rejected",
    "succeeded", "failed", "retried", "revoked", "args", "kwargs",
    "eta", "expires", "retries", "worker", "result", "exception",
    "timestamp", "runtime", "traceback", "exchange", "routing_key",
    "clock", "client", "root_id", "parent_id",
)  # fmt: skip

#: Text columns indexed for substring search, in the order of ``tasks_fts``.
FTS_COLUMNS: tuple[str, ...] = ("uuid", "name", "worker", "args", "kwargs", "result")

_fts_cols = ", ".join(FTS_COLUMNS)

DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS tasks (
        id INTEGER PRIMARY KEY,
        uuid TEXT NOT NULL UNIQUE,
        {", ".join(c for c in TASK_COLUMNS[1:])},
        seq INTEGER NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX IF NOT EXISTS tasks_by_time ON tasks (timestamp, uuid)",
    "CREATE INDEX IF NOT EXISTS tasks_by_seq ON tasks (seq)",
    "CREATE INDEX IF NOT EXISTS tasks_by_name ON tasks (name COLLATE NOCASE, timestamp)",
    "CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state COLLATE NOCASE, timestamp)",
    "CREATE INDEX IF NOT EXISTS tasks_by_worker ON tasks (worker COLLATE NOCASE, timestamp)",
    "CREATE INDEX IF NOT EXISTS tasks_by_received ON tasks (received, uuid)",
    "CREATE INDEX IF NOT EXISTS tasks_by_started ON tasks (started, uuid)",
    "CREATE INDEX IF NOT EXISTS tasks_by_parent ON tasks (parent_id)",
    "CREATE INDEX IF NOT EXISTS tasks_by_root ON tasks (root_id)",
    f"""
    CREATE VIRTUAL TABLE IF NOT EXISTS tasks_fts USING fts5(
        {_fts_cols}, tokenize='trigram'
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS task_types (
        name TEXT PRIMARY KEY
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS workers (
        hostname TEXT PRIMARY KEY,
        pid, freq, heartbeats, clock, active, processed, loadavg,
        sw_ident, sw_ver, sw_sys,
        timestamp,
        seq INTEGER NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS worker_counters (
        hostname TEXT NOT NULL,
        type TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        PRIMARY KEY (hostname, type)
    )
    """,
)

#: Tables the web process writes (control actions), not the ingest writer: the audit log,
#: which task a retry re-sent, and the queues paused across the cluster. ``stamen.audit``
#: also creates them on databases made before they existed.
ACTION_DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS audit_log (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        user TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT,
        params TEXT,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        message TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS audit_by_action ON audit_log (action, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_target ON audit_log (target, id)",
    """
    CREATE TABLE IF NOT EXISTS task_retries (
        task_id TEXT PRIMARY KEY,
        retry_of TEXT NOT NULL,
        at REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS task_retries_by_origin ON task_retries (retry_of)",
    """
    CREATE TABLE IF NOT EXISTS paused_queues (
        name TEXT PRIMARY KEY,
        paused_at REAL NOT NULL,
        paused_by TEXT NOT NULL,
        workers TEXT NOT NULL DEFAULT '[]'
    )
    """,
)
DDL += ACTION_DDL

#: What version 2 added; ``migrate`` runs these on a version-1 database and then builds the
#: rollups from the stored tasks.
V2_DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS task_rollups (
        width INTEGER NOT NULL,
        bucket REAL NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        count INTEGER NOT NULL,
        hist TEXT NOT NULL,
        PRIMARY KEY (width, bucket, name, state)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS failure_rollups (
        width INTEGER NOT NULL,
        bucket REAL NOT NULL,
        exception_type TEXT NOT NULL,
        name TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen REAL,
        last_seen REAL,
        sample_uuid TEXT,
        PRIMARY KEY (width, bucket, exception_type, name)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS backfilled (
        uuid TEXT PRIMARY KEY,
        at REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS tasks_by_state_received ON tasks "
    "(state COLLATE NOCASE, received, uuid)",
)
DDL += V2_DDL
