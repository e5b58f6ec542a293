"""Where ``pg_trgm`` goes: ``public``, so that dropping one Stamen schema cannot drop the
search index of another schema in the same database.

Runs in a database of its own (created and dropped here), since the shared test database
has the extension installed already.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from stamen.store.postgres import connect, migrate
from tests.integration import pgutil


@pytest.fixture
def fresh_database() -> Iterator[str]:
    reason = pgutil.available()
    if reason is not None:
        pytest.skip(reason)
    name = f"stamen_ext_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pgutil.SERVER, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = pgutil.SERVER.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(pgutil.SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _schema_url(database: str, schema: str) -> str:
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    return f"{database}?options=-csearch_path%3D{schema}"


def test_pg_trgm_lands_in_public_and_outlives_the_first_schema(fresh_database: str) -> None:
    first = _schema_url(fresh_database, "stamen_a")
    second = _schema_url(fresh_database, "stamen_b")
    for url in (first, second):
        with connect(url, writer=True) as conn:
            migrate(conn)
    with psycopg.connect(fresh_database, autocommit=True) as admin:
        home = admin.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'pg_trgm'"
        ).fetchone()
        assert home == ("public",)
        admin.execute('DROP SCHEMA "stamen_a" CASCADE')
        left = admin.execute(
            "SELECT schemaname FROM pg_indexes WHERE indexname = 'tasks_trgm'"
        ).fetchall()
        assert left == [("stamen_b",)]
