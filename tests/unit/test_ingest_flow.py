"""Ingest flow control: adaptive batching and the bound on pending events.

A real Ingester on a temporary SQLite store; the receiver thread is built (never
connected) so its event handler and flush thread run exactly as with a broker. Storing is
slowed by holding the writer at a gate, which is how "storing falls behind" looks from the
receiver's side.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from stamen.events.ingest import FlushThread, Ingester
from stamen.events.receiver import EventReceiverThread
from stamen.health import Health
from stamen.store.writer import Batch, StoreWriter, Trimmed
from tests.factories import lifecycle
from tests.unit.conftest import make_harness


class GatedWriter(StoreWriter):
    """A StoreWriter whose writes wait while the gate is closed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, max_tasks=100_000)
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()

    def write(self, batch: Batch) -> Trimmed:
        self.writing.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().write(batch)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.01)


def events(tasks: int) -> list[dict[str, Any]]:
    return [e for i in range(tasks) for e in lifecycle(f"task-{i:06d}", ts=1_700_000_000.0 + i)]


def stored_tasks(writer: StoreWriter) -> int:
    return writer.conn.execute("SELECT count(*) FROM tasks").fetchone()[0]


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[GatedWriter]:
    w = GatedWriter(tmp_path / "history.sqlite3")
    yield w
    w.gate.set()
    w.close()


def receiver_for(ingester: Ingester, commit_interval: float) -> EventReceiverThread:
    app = Celery("flow-test", broker="memory://")
    return EventReceiverThread(app, ingester, Health(), commit_interval=commit_interval)


def test_receiving_waits_at_max_pending_and_resumes_when_storing_catches_up(
    writer: GatedWriter,
) -> None:
    ingester = Ingester(writer, max_pending=300, batch_size=30, max_batch=60)
    receiver = receiver_for(ingester, commit_interval=60.0)
    feed = events(400)  # 1,200 events: four times the bound
    peak = 0
    fed = 0

    def receive() -> None:
        nonlocal peak, fed
        for event in feed:
            receiver._on_event(event)
            peak = max(peak, len(ingester.pending))
            fed += 1

    writer.gate.clear()
    receiver.flusher.start()
    feeder = threading.Thread(target=receive, daemon=True)
    feeder.start()
    try:
        wait_until(lambda: ingester.receive_pauses == 1, 10, what="receiving paused")
        assert writer.writing.wait(5)
        held = fed
        # Storing is stuck, so receiving stays paused: nothing more is taken.
        time.sleep(0.3)
        assert fed == held < len(feed)
        # (the flush stuck at the gate took its batch out of pending before it stuck)
        assert ingester.max_pending // 2 < len(ingester.pending) <= ingester.max_pending
    finally:
        writer.gate.set()
    feeder.join(30)
    assert not feeder.is_alive()
    receiver.flusher.stop()
    assert peak <= ingester.max_pending
    assert stored_tasks(writer) == 400
    assert ingester.events_ingested == len(feed)
    # Every episode is counted; the first one lasted as long as the gate was shut.
    assert ingester.receive_pauses >= 1


def test_a_bound_below_a_batch_is_honoured(writer: GatedWriter) -> None:
    """--max_pending_events=500 pauses at 500 pending, not at the 2,000 of a full batch."""
    ingester = Ingester(writer, max_pending=500)
    assert ingester.batch_size == 500
    receiver = receiver_for(ingester, commit_interval=60.0)
    stopping = receiver._stop_event

    def receive() -> None:
        for event in events(1000):
            if stopping.is_set():
                return
            receiver._on_event(event)

    # No flush thread runs: storing is stalled, so receiving must stop at the bound.
    feeder = threading.Thread(target=receive, daemon=True)
    feeder.start()
    wait_until(lambda: ingester.receive_pauses == 1, 10, what="receiving paused")
    assert len(ingester.pending) == 500
    stopping.set()
    feeder.join(10)
    assert not feeder.is_alive()
    assert Ingester(writer, max_pending=0).batch_size == 2_000


def test_stop_ends_a_pause_and_stores_everything_received(writer: GatedWriter) -> None:
    ingester = Ingester(writer, max_pending=100, batch_size=10, max_batch=20)
    receiver = receiver_for(ingester, commit_interval=60.0)
    taken: list[dict[str, Any]] = []

    def receive() -> None:
        for event in events(100):
            receiver._on_event(event)
            taken.append(event)
            if receiver._stop_event.is_set():
                return

    writer.gate.clear()
    receiver.flusher.start()
    feeder = threading.Thread(target=receive, daemon=True)
    feeder.start()
    wait_until(lambda: ingester.receive_pauses == 1, 10, what="receiving paused")
    receiver._stop_event.set()
    feeder.join(2)  # the pause notices the stop within PAUSE_POLL
    assert not feeder.is_alive()
    assert len(taken) < 300
    writer.gate.set()
    receiver.flusher.stop()
    # A clean stop loses nothing that was received.
    assert ingester.events_ingested == len(taken)
    assert not ingester.pending


def test_a_backlog_is_flushed_back_to_back_in_bounded_batches(writer: GatedWriter) -> None:
    ingester = Ingester(writer, max_pending=0, batch_size=100, max_batch=250)
    sizes: list[int] = []
    ingester.observers.append(lambda evs, batch: sizes.append(len(evs)))
    for event in events(400):  # 1,200 events pending before the flush thread starts
        ingester.add(event)
    flusher = FlushThread(ingester, interval=60.0, on_error=lambda message: None)
    flusher.start()
    try:
        # The interval is a minute: only flushing again at once empties the backlog soon.
        wait_until(lambda: stored_tasks(writer) == 400, 10, what="backlog stored")
    finally:
        flusher.stop()
    assert max(sizes) == 250
    assert sum(sizes) == 1200


def test_stop_flushes_more_than_one_batch(writer: GatedWriter) -> None:
    ingester = Ingester(writer, max_pending=0, batch_size=1000, max_batch=1000)
    flusher = FlushThread(ingester, interval=60.0, on_error=lambda message: None)
    flusher.start()
    for event in events(900):  # 2,700 events, fewer per check than a batch
        ingester.add(event)
    flusher.stop()
    assert not flusher.is_alive()
    assert stored_tasks(writer) == 900
    assert not ingester.pending


def test_a_small_trickle_waits_for_the_commit_interval(writer: GatedWriter) -> None:
    ingester = Ingester(writer, batch_size=100)
    commits: list[float] = []
    ingester.observers.append(lambda evs, batch: commits.append(time.monotonic()))
    flusher = FlushThread(ingester, interval=0.5, on_error=lambda message: None)
    flusher.start()
    try:
        started = time.monotonic()
        for event in events(3):
            ingester.add(event)
        wait_until(lambda: stored_tasks(writer) == 3, 5, what="trickle stored")
    finally:
        flusher.stop()
    # Batched, not one commit per event: all nine events went in at the interval.
    assert len(commits) == 1
    assert commits[0] - started <= 0.5 + 0.2


def test_the_option_sets_the_bound_and_pauses_show_on_metrics(tmp_path: Path) -> None:
    for harness in make_harness(tmp_path, max_pending_events=7):
        ingester = harness.services.ingester
        assert ingester.max_pending == 7
        ingester.receive_pauses = 2
        text = harness.client.get("/metrics").text
        found = re.search(r"^stamen_ingest_receive_pauses_total (\S+)$", text, re.MULTILINE)
        assert found is not None and float(found.group(1)) == 2


class FailingOnceWriter(StoreWriter):
    """A StoreWriter whose first commit fails the way a full disk or a lost database
    connection does: after part of the batch went in, inside the transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, max_tasks=100_000)
        self.failures = 1

    def _write_rollups(self, batch: Batch) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        super()._write_rollups(batch)


def test_a_failed_commit_keeps_its_events_and_the_retry_stores_them_once(
    tmp_path: Path,
) -> None:
    writer = FailingOnceWriter(tmp_path / "history.sqlite3")
    try:
        ingester = Ingester(writer)
        # A task stored before the failure, whose next events are in the failing batch.
        first = lifecycle("known", name="tasks.first", ts=1_700_000_000.0)
        writer.failures = 0
        ingester.add(first[0])
        ingester.flush()
        writer.failures = 1
        for event in [*first[1:], *lifecycle("new", name="tasks.second", outcome="failed")]:
            ingester.add(event)
        with pytest.raises(OSError):
            ingester.flush()
        assert len(ingester.pending) == 5  # nothing lost, still in arrival order
        assert [e["type"] for e in ingester.pending][:2] == ["task-started", "task-succeeded"]
        assert stored_tasks(writer) == 1

        assert ingester.flush() == 5
        states = dict(writer.conn.execute("SELECT uuid, state FROM tasks").fetchall())
        assert states == {"known": "SUCCESS", "new": "FAILURE"}
        assert writer.load_task_types() == {"tasks.first", "tasks.second"}
        # The rollups count each task once, in its final state: the failed merge's changes
        # to the cached record were not counted twice.
        counts = writer.conn.execute(
            "SELECT name, state, sum(count) FROM task_rollups WHERE width = 30 "
            "GROUP BY name, state ORDER BY name"
        ).fetchall()
        assert counts == [("tasks.first", "SUCCESS", 1), ("tasks.second", "FAILURE", 1)]
        assert writer.task_count == 2
    finally:
        writer.close()


class FailingReadWriter(StoreWriter):
    """A StoreWriter whose reads of stored tasks fail once (a statement timeout, a lock, a
    dropped connection), as merging a task that fell out of the cache does."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, max_tasks=100_000)
        self.failures = 0

    def load_tasks(self, uuids: Any) -> dict[str, dict[str, Any]]:
        if self.failures:
            self.failures -= 1
            raise OSError("canceling statement due to statement timeout")
        return super().load_tasks(uuids)


def test_a_failed_read_while_merging_keeps_the_events(tmp_path: Path) -> None:
    writer = FailingReadWriter(tmp_path / "history.sqlite3")
    try:
        ingester = Ingester(writer)
        first = lifecycle("known", name="tasks.first")
        ingester.add(first[0])
        ingester.flush()
        ingester.cache.clear()  # the task fell out of the cache: merging must read it
        writer.failures = 1
        for event in [*first[1:], *lifecycle("new", name="tasks.second")]:
            ingester.add(event)
        with pytest.raises(OSError):
            ingester.flush()
        assert len(ingester.pending) == 5  # nothing lost, still in arrival order
        assert ingester.flush() == 5
        states = dict(writer.conn.execute("SELECT uuid, state FROM tasks").fetchall())
        assert states == {"known": "SUCCESS", "new": "SUCCESS"}
        assert writer.load_task_types() == {"tasks.first", "tasks.second"}
    finally:
        writer.close()


def test_the_flush_thread_retries_a_failed_commit_after_the_interval(tmp_path: Path) -> None:
    writer = FailingOnceWriter(tmp_path / "history.sqlite3")
    errors: list[str] = []
    ingester = Ingester(writer, batch_size=10)
    flusher = FlushThread(ingester, interval=0.2, on_error=errors.append)
    try:
        for event in events(20):  # a batch's worth: flushed at once, then retried
            ingester.add(event)
        flusher.start()
        flusher.wake()
        wait_until(lambda: stored_tasks(writer) == 20, 5, what="retry stored the tasks")
        assert errors == ["OSError: disk full", ""]
    finally:
        flusher.stop()
        writer.close()
