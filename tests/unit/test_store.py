"""SQLite-only store behaviour.

What both backends must do (merge, batching, filters, limits, restart, search examples)
is asserted once, in ``tests/integration/test_store_contract.py``, which runs its SQLite
half without any service; this file keeps what only the SQLite reader does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stamen.events.ingest import Ingester
from stamen.search.parser import parse_query
from stamen.store.reader import StoreReader, TaskQuery
from stamen.store.writer import StoreWriter
from tests.factories import lifecycle


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "history.sqlite3"


def ingest(db: Path, events: list[dict], **limits: object) -> Ingester:
    writer = StoreWriter(db, max_tasks=limits.pop("max_tasks", 1000), **limits)  # type: ignore[arg-type]
    ingester = Ingester(writer)
    for e in events:
        ingester.add(e)
    ingester.flush()
    return ingester


def test_broad_search_plan_gives_the_same_page(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stamen.store.reader as reader_module

    events = []
    for i in range(60):
        events += lifecycle(
            f"t{i:02d}", ts=1000.0 + (i * 7919) % 60, args=f"('customer-{i}',)",
            outcome="failed" if i % 4 == 0 else "succeeded",
        )  # fmt: skip
    ingest(db, events)
    reader = StoreReader(db)
    queries = [
        TaskQuery(search=parse_query("customer"), limit=10),
        TaskQuery(search=parse_query("customer state:FAILURE"), limit=5, offset=2),
        TaskQuery(search=parse_query("customer"), sort_by="received", descending=True, limit=7),
    ]
    narrow = [[t["uuid"] for t in reader.list_tasks(q)] for q in queries]
    monkeypatch.setattr(reader_module, "BROAD_MATCHES", 3)
    broad = [[t["uuid"] for t in reader.list_tasks(q)] for q in queries]
    assert broad == narrow
    assert all(narrow)
