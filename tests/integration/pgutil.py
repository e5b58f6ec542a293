"""PostgreSQL for tests: each user gets a fresh schema of its own, dropped afterwards.

The server is ``STAMEN_TEST_POSTGRES`` (default: local, trust auth, database ``test``).
Stamen is pointed at the schema through libpq's ``options=-csearch_path=...`` in the URL,
so tables and indexes land in that schema only (``pg_trgm`` goes to ``public``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest

SERVER = os.environ.get("STAMEN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def available() -> str | None:
    """``None`` when the test server answers, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        psycopg.connect(SERVER, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {SERVER}: {exc}"
    return None


def schema_url(schema: str) -> str:
    """``SERVER`` with ``search_path`` set to ``schema``."""
    joiner = "&" if "?" in SERVER else "?"
    return f"{SERVER}{joiner}options={quote(f'-csearch_path={schema}', safe='')}"


@contextmanager
def temp_schema() -> Iterator[str]:
    """A URL whose ``search_path`` is a new ``stamen_test_<random>`` schema, dropped after."""
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    import psycopg

    schema = f"stamen_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema_url(schema)
    finally:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute("SET lock_timeout = '30s'")
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
