"""Opening SQLite databases for the store: pragmas, schema creation and version checks.

Every connection runs in WAL mode so the one writer (ingest) never blocks readers (web,
metrics), and ``synchronous=NORMAL`` so a commit costs no fsync: a crash loses at most
the last commit interval, which is the durability DESIGN.md promises.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from stamen.search.sql import register_functions
from stamen.store.schema import DDL, FTS_COLUMNS, SCHEMA_VERSION


class StoreError(Exception):
    """The database cannot be used (wrong file, newer schema); the message says why."""


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open ``path`` with the store's pragmas; a reader is marked query-only."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA cache_size=-32000")
        conn.execute("PRAGMA mmap_size=268435456")
        conn.execute("PRAGMA busy_timeout=30000")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path} is not a Stamen database: {exc}") from exc
    if readonly:
        conn.execute("PRAGMA query_only=1")
    register_functions(conn)
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Create the schema in an empty database, or check that an existing one is ours."""
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
        for statement in DDL:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def rebuild_search_index(conn: sqlite3.Connection) -> None:
    """Re-index every stored task for search (after bulk loads or a repair)."""
    cols = ", ".join(FTS_COLUMNS)
    conn.execute("DELETE FROM tasks_fts")
    conn.execute(f"INSERT INTO tasks_fts (rowid, {cols}) SELECT id, {cols} FROM tasks ORDER BY id")
