"""The history store: the single source of truth that ingest writes and the web reads.

Two backends implement it: SQLite (``writer.StoreWriter``/``reader.StoreReader``, the default)
and PostgreSQL (``postgres.PostgresWriter``/``postgres.PostgresReader``, for ``--db=
postgresql://...``). ``HistoryWriter`` and ``HistoryReader`` name the interface both keep, so
ingest and the web are written against it rather than against one backend; the contract suite
(tests/integration/test_store_contract.py) checks both behave alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stamen.store.reader import TaskQuery
    from stamen.store.writer import Batch, Trimmed


class HistoryWriter(Protocol):
    """The single writer (one ingest thread owns it)."""

    seq: int
    task_count: int
    max_tasks: int
    max_task_age: float | None
    max_workers: int

    def write(self, batch: Batch) -> Trimmed: ...
    def load_tasks(self, uuids: Iterable[str]) -> dict[str, dict[str, Any]]: ...
    def load_workers(self) -> dict[str, dict[str, Any]]: ...
    def load_task_types(self) -> set[str]: ...
    def load_custom_states(self) -> set[str]: ...
    def trim_workers(self, keep: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


class HistoryReader(Protocol):
    """Queries over the history, safe from any thread."""

    def seq(self) -> int: ...
    def task_count(self) -> int: ...
    def states(self) -> list[str]: ...
    def list_tasks(self, q: TaskQuery) -> list[dict[str, Any]]: ...
    def count_tasks(self, q: TaskQuery) -> int: ...
    def get_task(self, uuid: str) -> dict[str, Any] | None: ...
    def task_types(self) -> list[str]: ...
    def workers(self) -> dict[str, dict[str, Any]]: ...
    def counters(self) -> dict[str, dict[str, int]]: ...


def is_postgres_url(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database (``postgresql://``/``postgres://``)."""
    return db.startswith(("postgresql://", "postgres://"))
