"""The store's only writer: one connection, owned by the ingest thread.

Ingest hands it whole batches (every task and worker a burst of events touched, already
merged), so a burst of events costs one transaction (DESIGN rule 4). Each batch gets the
next change sequence number (rule 2), and the history is trimmed to ``max_tasks`` and
``max_task_age`` here (rule 6), so nobody else ever deletes.

The charts' and failures' rollups change in the same transaction as the task rows (ingest
works out the net change, ``Batch.rollups``). Trimming tasks leaves them alone, so charts
show true throughput whatever ``max_tasks`` keeps; rollups older than the longest range
are deleted instead, at most every ``PRUNE_EVERY`` seconds.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from stamen.model import WORKER_FIELDS
from stamen.store.rollup import KEEP_SECONDS, RollupDelta
from stamen.store.rollup_sql import apply_rollups, prune_rollups
from stamen.store.schema import FTS_COLUMNS, TASK_COLUMNS
from stamen.store.sqlite import connect, migrate, tune_writer

_TASK_INSERT = (
    f"INSERT INTO tasks (id, {', '.join(TASK_COLUMNS)}, seq) "
    f"VALUES ({', '.join('?' * (len(TASK_COLUMNS) + 2))}) "
    "ON CONFLICT(uuid) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in (*TASK_COLUMNS[1:], "seq"))
)
_WORKER_COLUMNS = (*WORKER_FIELDS, "timestamp")
_WORKER_INSERT = (
    f"INSERT OR REPLACE INTO workers ({', '.join(_WORKER_COLUMNS)}, seq) "
    f"VALUES ({', '.join('?' * (len(_WORKER_COLUMNS) + 1))})"
)
_COUNTER_INSERT = (
    "INSERT INTO worker_counters (hostname, type, count, first_seen) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(hostname, type) DO UPDATE SET count = count + excluded.count"
)
_FTS_INSERT = (
    f"INSERT INTO tasks_fts (rowid, {', '.join(FTS_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(FTS_COLUMNS) + 1))})"
)
_SCALARS = (str, int, float, type(None))
#: Seconds between deletions of rollups older than the longest range.
PRUNE_EVERY = 3600.0


#: The exact types ``_column_value`` passes through, checked first: a set lookup instead of
#: a function call per column (the task rows are the flush's hottest Python loop).
_PLAIN = frozenset({str, int, float, bool, type(None)})


def _column_value(value: Any) -> Any:
    """SQLite keeps scalars as they are; anything else an event carries is kept as JSON."""
    if isinstance(value, _SCALARS):
        return value
    return orjson.dumps(value, default=repr).decode()


def _row_values(record: Mapping[str, Any], columns: tuple[str, ...]) -> list[Any]:
    """``_column_value`` of each column of ``record``, in order."""
    plain = _PLAIN
    return [v if type(v) in plain else _column_value(v) for v in map(record.get, columns)]


def _by_id(task: dict[str, Any]) -> int:
    return int(task["id"])


@dataclass
class Batch:
    """What one flush of ingest changed."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_tasks: int = 0
    #: uuids of tasks whose searchable text changed (new tasks included).
    reindex: set[str] = field(default_factory=set)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    task_types: set[str] = field(default_factory=set)
    custom_states: list[str] = field(default_factory=list)
    #: Net change of the charts' and failures' rollups (ingest computes it).
    rollups: RollupDelta = field(default_factory=RollupDelta)
    #: uuids of tasks filled in by backfill (from the result backend), not by events.
    backfilled: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.tasks or self.workers or self.counters or self.task_types)


@dataclass
class Trimmed:
    """Tasks a write removed to honour the limits, so ingest can forget them too."""

    uuids: list[str] = field(default_factory=list)


class StoreWriter:
    """Writes batches and trims history. Not thread-safe: one ingest thread owns it."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_tasks: int,
        max_task_age: float | None = None,
        max_workers: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conn = connect(path)
        migrate(self.conn)
        tune_writer(self.conn)
        self.path = Path(path)
        self.max_tasks = max_tasks
        self.max_task_age = max_task_age
        self.max_workers = max_workers
        self._clock = clock
        self._pruned_at = 0.0
        self._lock: IO[str] | None = None
        self._resume()

    def _resume(self) -> None:
        """Read where the history stands (another instance may have written since)."""
        self.seq = self._meta("seq", 0)
        self._next_id = (self.conn.execute("SELECT max(id) FROM tasks").fetchone()[0] or 0) + 1
        self.task_count = self.conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        self._set_meta(task_count=self.task_count)

    def close(self) -> None:
        self.conn.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # Ingest election: instances sharing one history file take turns, one writes at a time.

    @property
    def lock_path(self) -> Path:
        """Beside the file itself: a second instance reaching it through a symlink (or
        another relative path) must race for the same lock."""
        real = self.path.resolve()
        return real.with_name(real.name + "-ingest.lock")

    def try_lead(self) -> bool:
        """Take the history's ingest lock (an exclusive ``flock`` on ``<db>-ingest.lock``)
        if no other process holds it.

        Two instances writing one file would each store every event, doubling the
        workers' counters; with the lock, a second instance serves reads and takes over
        when the first one's process ends (the kernel releases the lock even on SIGKILL).
        On success the writer re-reads its state, which the other may have moved on.
        """
        if self._lock is not None:
            return True
        handle = open(self.lock_path, "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle
        self._resume()
        return True

    def still_leading(self) -> bool:
        """A held ``flock`` lasts as long as the process: only ``close`` gives it up."""
        return self._lock is not None

    def lock_holder(self) -> str:
        """The pid the lock file names (who ingests), for a standby's log line."""
        try:
            return self.lock_path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def _meta(self, key: str, default: Any) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def _set_meta(self, **values: Any) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items()
        )

    # Reads the ingest side needs to resume where it stopped.

    def load_tasks(self, uuids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Stored records for those of ``uuids`` that exist (chunked to SQLite's limits)."""
        found: dict[str, dict[str, Any]] = {}
        ids = list(uuids)
        cols = ", ".join(TASK_COLUMNS)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {cols}, id FROM tasks WHERE uuid IN ({marks})", chunk
            ):
                record = dict(zip(TASK_COLUMNS, row[:-1], strict=True))
                record["id"] = row[-1]
                found[row[0]] = record
        return found

    def load_workers(self) -> dict[str, dict[str, Any]]:
        cols = ", ".join(_WORKER_COLUMNS)
        workers = {}
        for row in self.conn.execute(f"SELECT {cols} FROM workers"):
            record = dict(zip(_WORKER_COLUMNS, row, strict=True))
            for key in ("heartbeats", "loadavg"):
                if isinstance(record[key], str):
                    record[key] = orjson.loads(record[key])
            record["heartbeats"] = record["heartbeats"] or []
            workers[record["hostname"]] = record
        return workers

    def load_custom_states(self) -> set[str]:
        value = self._meta("custom_states", None)
        return set(orjson.loads(value)) if value else set()

    def load_task_types(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT name FROM task_types")}

    # The write path.

    def write(self, batch: Batch) -> Trimmed:
        """Commit one batch as one transaction under the next sequence number."""
        trimmed = Trimmed()
        if not batch:
            return trimmed
        self.seq += 1
        seq = self.seq
        count_before = self.task_count
        conn = self.conn
        conn.execute("BEGIN")
        try:
            if batch.tasks:
                self._write_tasks(batch, seq)
            self._write_rollups(batch)
            if batch.workers:
                conn.executemany(
                    _WORKER_INSERT,
                    [
                        (*[_column_value(w.get(c)) for c in _WORKER_COLUMNS], seq)
                        for w in batch.workers.values()
                    ],
                )
            if batch.counters:
                now = int(self._clock())
                conn.executemany(
                    _COUNTER_INSERT,
                    [(host, kind, n, now) for (host, kind), n in batch.counters.items()],
                )
            if batch.task_types:
                conn.executemany(
                    "INSERT OR IGNORE INTO task_types (name) VALUES (?)",
                    [(name,) for name in batch.task_types],
                )
            trimmed.uuids = self._trim()
            if batch.custom_states:
                self._set_meta(custom_states=orjson.dumps(sorted(batch.custom_states)).decode())
            self._set_meta(seq=seq, task_count=self.task_count, written_at=self._clock())
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            self.seq -= 1
            self.task_count = count_before
            raise
        return trimmed

    def _write_tasks(self, batch: Batch, seq: int) -> None:
        rows = []
        first_new = self._next_id
        for task in batch.tasks.values():
            task_id = task.get("id")
            if task_id is None:
                # The single writer hands out ids itself, so it knows a new row's rowid
                # for the search index without reading it back.
                task_id = task["id"] = self._next_id
                self._next_id += 1
            rows.append((task_id, *_row_values(task, TASK_COLUMNS), seq))
        self.conn.executemany(_TASK_INSERT, rows)
        self.task_count += batch.new_tasks
        if batch.reindex:
            # FTS5 flushes its pending terms whenever a rowid goes backwards: keep them
            # ascending, which makes indexing several times cheaper.
            changed = sorted((batch.tasks[uuid] for uuid in batch.reindex), key=_by_id)
            # Rows new in this batch are not in the index yet: only older ones are removed.
            self.conn.executemany(
                "DELETE FROM tasks_fts WHERE rowid = ?",
                [(t["id"],) for t in changed if t["id"] < first_new],
            )
            self.conn.executemany(
                _FTS_INSERT,
                [(t["id"], *_row_values(t, FTS_COLUMNS)) for t in changed],
            )

    def _write_rollups(self, batch: Batch) -> None:
        """Apply the batch's rollup change and backfill marks; prune old rollups hourly."""
        if batch.rollups:
            apply_rollups(self.conn, batch.rollups, "?")
        if batch.backfilled:
            now = self._clock()
            self.conn.executemany(
                "INSERT INTO backfilled (uuid, at) VALUES (?, ?) ON CONFLICT (uuid) DO NOTHING",
                [(uuid, now) for uuid in sorted(batch.backfilled)],
            )
        now = self._clock()
        if now - self._pruned_at >= PRUNE_EVERY:
            prune_rollups(self.conn, now - KEEP_SECONDS, "?")
            self._pruned_at = now

    def _trim(self) -> list[str]:
        """Drop the least recently updated tasks beyond the count and age limits."""
        removed: list[str] = []
        if self.max_task_age is not None:
            cutoff = self._clock() - self.max_task_age
            rows = self.conn.execute(
                "DELETE FROM tasks WHERE timestamp < ? RETURNING id, uuid", (cutoff,)
            ).fetchall()
            removed += self._unindex(rows)
            self.task_count -= len(rows)
        excess = self.task_count - self.max_tasks
        if excess > 0:
            rows = self.conn.execute(
                "DELETE FROM tasks WHERE id IN ("
                " SELECT id FROM tasks ORDER BY timestamp, uuid LIMIT ?"
                ") RETURNING id, uuid",
                (excess,),
            ).fetchall()
            removed += self._unindex(rows)
            self.task_count -= len(rows)
        return removed

    def _unindex(self, rows: list[tuple[int, str]]) -> list[str]:
        """Remove deleted tasks from the search index; returns their uuids."""
        self.conn.executemany("DELETE FROM tasks_fts WHERE rowid = ?", [(r[0],) for r in rows])
        self.conn.executemany("DELETE FROM backfilled WHERE uuid = ?", [(r[1],) for r in rows])
        return [r[1] for r in rows]

    def trim_workers(self, keep: Mapping[str, Any]) -> None:
        """Forget stored workers that ingest no longer keeps (``max_workers``)."""
        stored = [r[0] for r in self.conn.execute("SELECT hostname FROM workers")]
        gone = [(h,) for h in stored if h not in keep]
        if gone:
            self.conn.executemany("DELETE FROM workers WHERE hostname = ?", gone)
