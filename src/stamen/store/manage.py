"""Opening the history store by ``--db`` and upgrading its schema (``stamen db upgrade``).

``--db`` names either a SQLite file (Flower's meaning) or a PostgreSQL URL; ``open_store``
builds the matching writer and reader so ``Services`` does not care which. Upgrading is what
every start does anyway (writers migrate before use); the command exists so an operator can
migrate a shared PostgreSQL database once, before rolling out a new Stamen everywhere.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from stamen.store import HistoryReader, HistoryWriter, is_postgres_url
from stamen.store.sqlite import StoreError


def _postgres() -> ModuleType:
    """The PostgreSQL store, or a StoreError saying how to install what it needs."""
    try:
        from stamen.store import postgres
    except ImportError as exc:
        raise StoreError(
            f"--db names a PostgreSQL database, but {exc.name} is not installed: "
            "pip install 'stamen[postgres]'"
        ) from None
    return postgres


def open_store(
    db: str | Path, *, pool_size: int | None = None, **limits: Any
) -> tuple[HistoryWriter, HistoryReader]:
    """A writer (schema migrated) and a reader for ``db``: a PostgreSQL URL or a SQLite path.

    ``pool_size`` bounds a PostgreSQL reader's connections (SQLite has no server to spare).
    """
    if isinstance(db, str) and is_postgres_url(db):
        postgres = _postgres()
        writer = postgres.PostgresWriter(db, **limits)
        return writer, postgres.PostgresReader(db, pool_size or postgres.READER_CONNECTIONS)
    from stamen.store.reader import StoreReader
    from stamen.store.writer import StoreWriter

    return StoreWriter(db, **limits), StoreReader(db)


def upgrade(db: str | Path) -> str:
    """Create or migrate the schema of ``db`` to this Stamen's version; says what it did.

    Raises ``StoreError`` for a database that is not Stamen's or is newer than this Stamen.
    """
    if isinstance(db, str) and is_postgres_url(db):
        postgres = _postgres()
        with postgres.connect(db) as conn:
            before = postgres.schema_version(conn)
            after = postgres.migrate(conn)
        where = "PostgreSQL"
    else:
        from stamen.store import sqlite

        lite = sqlite.connect(db)
        try:
            before = int(lite.execute("PRAGMA user_version").fetchone()[0])
            sqlite.migrate(lite)
            after = int(lite.execute("PRAGMA user_version").fetchone()[0])
        finally:
            lite.close()
        where = str(db)
    if before == after:
        return f"{where}: schema version {after}, up to date"
    return f"{where}: schema version {before} -> {after}"
