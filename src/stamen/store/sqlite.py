"""Opening SQLite databases for the store: pragmas, schema creation and version checks.

Every connection runs in WAL mode so the one writer (ingest) never blocks readers (web,
metrics), and ``synchronous=NORMAL`` so a commit costs no fsync: a crash loses at most
the last commit interval, which is the durability DESIGN.md promises.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from stamen.search.sql import register_functions
from stamen.store.rollup import delta_of
from stamen.store.rollup_sql import apply_rollups
from stamen.store.schema import DDL, FTS_COLUMNS, SCHEMA_VERSION, V2_DDL


class StoreError(Exception):
    """The database cannot be used (wrong file, newer schema); the message says why."""


#: Page cache of the writer, in KiB: the inner pages of the indexes the upserts touch stay
#: hot; leaves come from the kernel's file cache (32 MB measured no faster at 1M tasks).
WRITER_CACHE_KIB = 8_000
#: Page cache of each reader connection (one per web thread), in KiB. A page of the API
#: touches a few hundred pages; the rest comes from the kernel's file cache, which is
#: shared and not charged to the process (4 MB measured no faster at 1M tasks).
READER_CACHE_KIB = 1_000
#: Bytes the WAL file is truncated to after a checkpoint, so a burst does not keep it large.
WAL_LIMIT = 64 * 1024 * 1024


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open ``path`` with the store's pragmas; a reader is marked query-only.

    No connection memory-maps the file (``mmap_size=0``): each mapping's pages count in the
    process's RSS once per connection, up to the mapping size each, which made memory grow
    with the number of web threads and the history's size. Reads through the kernel's file
    cache cost about the same for the store's indexed queries.
    """
    try:
        conn = sqlite3.connect(
            str(path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:  # a missing folder, no permission
        raise StoreError(f"cannot open the history file {path}: {exc}") from None
    cache_kib = READER_CACHE_KIB if readonly else WRITER_CACHE_KIB
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute(f"PRAGMA cache_size=-{cache_kib}")
        conn.execute("PRAGMA mmap_size=0")
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path} is not a Stamen database: {exc}") from exc
    if readonly:
        conn.execute("PRAGMA query_only=1")
    register_functions(conn)
    return conn


#: Segments of one size the search index lets gather before merging them (FTS5's
#: ``automerge``; its default is 4). Merging is most of what indexing costs once the history
#: is large: with 8, indexing 300k tasks cost 36% less per task (65 instead of 101 us) while
#: a rare term was found as fast and a common one counted in 11.5 instead of 11.4 ms.
FTS_AUTOMERGE = 8
#: WAL pages the writer lets gather before it checkpoints them into the database (SQLite's
#: default is 1,000). Under load nearly every commit passed 1,000 pages, so each one also
#: copied them and waited for two fsyncs; 10,000 (about 40 MB, under ``WAL_LIMIT``) made a
#: flush 8-14% cheaper with 200k tasks kept.
WRITER_AUTOCHECKPOINT = 10_000


def tune_writer(conn: sqlite3.Connection) -> None:
    """Apply the ingest writer's settings. FTS5 keeps ``automerge`` in the database, so
    this also updates a database made by an older Stamen (with the default)."""
    conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT}")
    conn.execute(
        "INSERT INTO tasks_fts (tasks_fts, rank) VALUES ('automerge', ?)", (FTS_AUTOMERGE,)
    )


def migrate(conn: sqlite3.Connection) -> None:
    """Create the schema in an empty database, upgrade an older one of ours in place, or
    refuse one that is newer or not ours."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {version}, newer than this Stamen "
            f"understands ({SCHEMA_VERSION}); upgrade Stamen"
        )
    if version == SCHEMA_VERSION:
        return
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if version == 0 and tables:
        raise StoreError("the database file holds tables that are not Stamen's")
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            for statement in DDL:
                conn.execute(statement)
        if version == 1:
            for statement in V2_DDL:
                conn.execute(statement)
            build_rollups(conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def build_rollups(conn: sqlite3.Connection) -> None:
    """Compute the rollups from the stored finished tasks (upgrading from version 1)."""
    conn.execute("DELETE FROM task_rollups")
    conn.execute("DELETE FROM failure_rollups")
    cols = ("uuid", "name", "state", "timestamp", "runtime", "exception")
    rows = conn.execute(
        f"SELECT {', '.join(cols)} FROM tasks WHERE state IN ('SUCCESS', 'FAILURE')"
    )
    apply_rollups(conn, delta_of(dict(zip(cols, row, strict=True)) for row in rows), "?")


def rebuild_search_index(conn: sqlite3.Connection) -> None:
    """Re-index every stored task for search (after bulk loads or a repair)."""
    cols = ", ".join(FTS_COLUMNS)
    conn.execute("DELETE FROM tasks_fts")
    conn.execute(f"INSERT INTO tasks_fts (rowid, {cols}) SELECT id, {cols} FROM tasks ORDER BY id")
