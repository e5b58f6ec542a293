"""Applying rollup changes to a database: the same SQL on SQLite and PostgreSQL.

Both backends call these inside the writer's transaction (and a migration building
rollups from stored tasks), passing the placeholder they use (``?`` or ``%s``) and a
connection or cursor with ``execute``/``executemany``. Histograms are merged in Python:
the writer is the only one writing, so reading the touched rows first is safe, and a batch
costs one read per width plus one upsert per row touched.
"""

from __future__ import annotations

from typing import Any

from stamen.store.rollup import WIDTHS, RollupDelta, decode_hist, encode_hist, merge_hist

_CHUNK = 500


def apply_rollups(db: Any, delta: RollupDelta, mark: str) -> None:
    """Add ``delta`` to the stored rollups (rows whose count reaches zero are deleted)."""
    delta.compact()
    if delta.tasks:
        _apply_tasks(db, delta, mark)
    if delta.failures:
        _apply_failures(db, delta, mark)


def _stored_tasks(db: Any, delta: RollupDelta, mark: str) -> dict[tuple[Any, ...], str]:
    stored: dict[tuple[Any, ...], str] = {}
    for width in WIDTHS:
        buckets = sorted({key[1] for key in delta.tasks if key[0] == width})
        for start in range(0, len(buckets), _CHUNK):
            chunk = buckets[start : start + _CHUNK]
            marks = ", ".join([mark] * len(chunk))
            for bucket, name, state, hist in db.execute(
                "SELECT bucket, name, state, hist FROM task_rollups "
                f"WHERE width = {mark} AND bucket IN ({marks})",
                [width, *chunk],
            ).fetchall():
                stored[(width, float(bucket), name, state)] = hist
    return stored


def _apply_tasks(db: Any, delta: RollupDelta, mark: str) -> None:
    stored = _stored_tasks(db, delta, mark)
    upserts = []
    deletes = []
    for key, change in delta.tasks.items():
        hist = merge_hist(decode_hist(stored.get(key)), change)
        if hist:
            upserts.append((*key, sum(hist.values()), encode_hist(hist)))
        elif key in stored:
            deletes.append(key)
    if upserts:
        db.executemany(
            "INSERT INTO task_rollups (width, bucket, name, state, count, hist) "
            f"VALUES ({', '.join([mark] * 6)}) "
            "ON CONFLICT (width, bucket, name, state) DO UPDATE "
            "SET count = excluded.count, hist = excluded.hist",
            upserts,
        )
    if deletes:
        db.executemany(
            f"DELETE FROM task_rollups WHERE width = {mark} AND bucket = {mark} "
            f"AND name = {mark} AND state = {mark}",
            deletes,
        )


def _apply_failures(db: Any, delta: RollupDelta, mark: str) -> None:
    rows = [
        (*key, d.count, d.first_seen, d.last_seen, d.sample_uuid)
        for key, d in delta.failures.items()
    ]
    db.executemany(
        "INSERT INTO failure_rollups (width, bucket, exception_type, name, count, "
        f"first_seen, last_seen, sample_uuid) VALUES ({', '.join([mark] * 8)}) "
        "ON CONFLICT (width, bucket, exception_type, name) DO UPDATE SET "
        "count = failure_rollups.count + excluded.count, "
        "first_seen = CASE WHEN excluded.first_seen IS NOT NULL AND ("
        " failure_rollups.first_seen IS NULL OR excluded.first_seen < failure_rollups.first_seen"
        ") THEN excluded.first_seen ELSE failure_rollups.first_seen END, "
        "sample_uuid = CASE WHEN excluded.last_seen IS NOT NULL AND ("
        " failure_rollups.last_seen IS NULL OR excluded.last_seen >= failure_rollups.last_seen"
        ") THEN excluded.sample_uuid ELSE failure_rollups.sample_uuid END, "
        "last_seen = CASE WHEN excluded.last_seen IS NOT NULL AND ("
        " failure_rollups.last_seen IS NULL OR excluded.last_seen >= failure_rollups.last_seen"
        ") THEN excluded.last_seen ELSE failure_rollups.last_seen END",
        rows,
    )
    shrunk = [key for key, d in delta.failures.items() if d.count < 0]
    if shrunk:
        db.executemany(
            f"DELETE FROM failure_rollups WHERE width = {mark} AND bucket = {mark} "
            f"AND exception_type = {mark} AND name = {mark} AND count <= 0",
            shrunk,
        )


def prune_rollups(db: Any, before: float, mark: str) -> None:
    """Delete rollup buckets that start before ``before`` (older than any range shows)."""
    for table in ("task_rollups", "failure_rollups"):
        db.executemany(
            f"DELETE FROM {table} WHERE width = {mark} AND bucket < {mark}",
            [(width, before) for width in WIDTHS],
        )
