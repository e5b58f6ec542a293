"""SQLite-only store behaviour.

What both backends must do (merge, batching, filters, limits, restart, search examples)
is asserted once, in ``tests/integration/test_store_contract.py``, which runs its SQLite
half without any service; this file keeps what only the SQLite reader does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stamen.events.ingest import Ingester
from stamen.search.parser import parse_query
from stamen.store.reader import StoreReader, TaskQuery
from stamen.store.sqlite import FTS_AUTOMERGE, WRITER_AUTOCHECKPOINT
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
    monkeypatch.setattr(reader_module, "WALK_SORTS", frozenset())
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


def test_search_walk_gives_the_exact_plans_page(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest-first walk (tiny steps, one index probe per id) pages like the exact plan,
    whatever the order of timestamps against ids, the sort, filters and OR-ed conditions."""
    import stamen.store.reader as reader_module

    events = []
    for i in range(80):
        events += lifecycle(
            f"t{i:02d}", ts=1000.0 + (i * 7919) % 80, args=f"('customer-{i % 7}',)",
            outcome="failed" if i % 3 == 0 else "succeeded",
        )  # fmt: skip
    ingest(db, events)
    reader = StoreReader(db)
    queries = [
        TaskQuery(search=parse_query("customer-3"), limit=4),
        TaskQuery(search=parse_query("customer-3"), limit=3, offset=4),
        TaskQuery(search=parse_query("customer state:FAILURE"), limit=5, offset=2),
        TaskQuery(search=parse_query("customer-1 OR state:FAILURE"), limit=9),
        TaskQuery(search=parse_query("fail"), limit=6),
        TaskQuery(search=parse_query("customer-2"), state="SUCCESS", limit=50),
        TaskQuery(search=parse_query("args:customer-4"), sort_by="started", limit=5),
        TaskQuery(search=parse_query("customer-5"), sort_by="timestamp", descending=True, limit=4),
        TaskQuery(search=parse_query("customer-6"), sort_by="received", limit=100),
    ]
    exact: list[list[str]] = []
    with monkeypatch.context() as m:
        m.setattr(reader_module, "WALK_SORTS", frozenset())
        exact = [[t["uuid"] for t in reader.list_tasks(q)] for q in queries]
    for name, value in (("WALK_FIRST", 2), ("WALK_STEP_MAX", 4), ("ID_GAP", 0)):
        monkeypatch.setattr(reader_module, name, value)
    walked = []
    for q in queries:
        where, params = reader._where(q)
        page = reader._walk(q, where, params)
        assert page is not None
        walked.append([t["uuid"] for t in page])
    assert walked == exact
    assert all(exact)
    assert all(int(uuid[1:]) % 7 == 3 for uuid in exact[0] + exact[1])


def test_search_walk_hands_rare_terms_to_the_exact_plan(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stamen.store.reader as reader_module

    events = []
    for i in range(40):
        events += lifecycle(f"t{i:02d}", ts=1000.0 + i, args=f"('item-{i}',)")
    ingest(db, events)
    reader = StoreReader(db)
    monkeypatch.setattr(reader_module, "WALK_FIRST", 4)
    monkeypatch.setattr(reader_module, "WALK_BUDGET", 20)
    q = TaskQuery(search=parse_query("item-5"), limit=2)
    where, params = reader._where(q)
    assert reader._walk(q, where, params) is None  # 0 matches in 4 rows: page beyond 20 rows
    assert [t["uuid"] for t in reader.list_tasks(q)] == ["t05"]


def test_a_pure_search_count_from_the_index_equals_the_rows(db: Path) -> None:
    """A lone term is counted on the search index alone; trimmed and re-indexed tasks must
    leave it one row per stored task."""
    events = []
    for i in range(30):
        events += lifecycle(f"t{i:02d}", ts=1000.0 + i, args=f"('box-{i % 4}',)")
    ingest(db, events, max_tasks=20)
    reader = StoreReader(db)
    for text in ("box", "box-1", "t15", "t05", "nothing-like-it"):
        q = TaskQuery(search=parse_query(text))
        assert reader.count_tasks(q) == len(reader.list_tasks(q))
    assert reader.count_tasks(TaskQuery(search=parse_query("box"))) == 20
    assert reader.count_tasks(TaskQuery(search=parse_query("box-1"))) == 5


def test_the_writer_lets_index_segments_and_wal_pages_gather(db: Path) -> None:
    """FTS5 keeps ``automerge`` in the database: a new one gets ours, and so does one an
    older Stamen made with FTS5's default (4) when a writer opens it again. The WAL
    checkpoint threshold is the writer connection's own."""
    automerge = "SELECT v FROM tasks_fts_config WHERE k = 'automerge'"
    writer = StoreWriter(db, max_tasks=10)
    assert writer.conn.execute(automerge).fetchone() == (FTS_AUTOMERGE,)
    assert writer.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (WRITER_AUTOCHECKPOINT,)
    writer.conn.execute("INSERT INTO tasks_fts (tasks_fts, rank) VALUES ('automerge', 4)")
    writer.close()
    writer = StoreWriter(db, max_tasks=10)
    assert writer.conn.execute(automerge).fetchone() == (FTS_AUTOMERGE,)
    writer.close()


def test_one_writer_at_a_time_holds_a_files_ingest_lock(db: Path) -> None:
    first, second = StoreWriter(db, max_tasks=10), StoreWriter(db, max_tasks=10)
    try:
        assert first.try_lead() and first.still_leading()
        assert not second.try_lead() and not second.still_leading()
        assert second.lock_holder() == str(os.getpid())
        ingester = Ingester(first)
        for e in lifecycle("t1"):
            ingester.add(e)
        ingester.flush()
        linked = db.with_name("linked.sqlite3")
        linked.symlink_to(db)
        through_link = StoreWriter(linked, max_tasks=10)
        assert not through_link.try_lead()  # the same file, whatever its name
        through_link.close()
        first.close()  # the process that held it ended
        assert second.try_lead()
        # The new holder resumes where the history stands, not where it stood at opening.
        assert (second.seq, second.task_count) == (1, 1)
    finally:
        first.close()
        second.close()
