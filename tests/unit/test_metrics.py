"""``/metrics``: Flower's six families and rules, our scrape-time families, celery-exporter's.

Events go through the real ingest path (``AppHarness.feed`` commits a batch, which runs the
metrics observer), as Flower's own tests feed events into its state, and the assertions are
on exposition lines as Prometheus would read them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stamen.events.ingest import Ingester
from stamen.store.writer import StoreWriter
from tests.factories import (
    event,
    lifecycle,
    task_sent,
    worker_heartbeat,
    worker_offline,
    worker_online,
)
from tests.unit.conftest import AppHarness, make_harness

W = "w1@host"
T0 = 1_700_000_000.0


def scrape(h: AppHarness) -> str:
    response = h.client.get("/metrics")
    assert response.status_code == 200
    return response.text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as ``(name, sorted labels) -> value``."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(text: str, metric: str, /, **labels: str) -> float | None:
    return samples(text).get((metric, tuple(sorted(labels.items()))))


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[AppHarness]:
    yield from make_harness(tmp_path, celery_exporter_metrics=True)


def test_header_help_and_types_match_flower(harness: AppHarness) -> None:
    response = harness.client.get("/metrics")
    assert response.headers["content-type"] == "text/plain"
    text = response.text
    for line in (
        "# HELP flower_events_total Number of events",
        "# TYPE flower_events_total counter",
        "# HELP flower_task_runtime_seconds Task runtime",
        "# TYPE flower_task_runtime_seconds histogram",
        "# HELP flower_task_prefetch_time_seconds The time the task spent waiting at the "
        "celery worker to be executed.",
        "# TYPE flower_task_prefetch_time_seconds gauge",
        "# HELP flower_worker_prefetched_tasks Number of tasks of given type prefetched at a "
        "worker",
        "# TYPE flower_worker_prefetched_tasks gauge",
        "# HELP flower_worker_online Worker online status",
        "# TYPE flower_worker_online gauge",
        "# HELP flower_worker_number_of_currently_executing_tasks Number of tasks currently "
        "executing at a worker",
        "# TYPE flower_worker_number_of_currently_executing_tasks gauge",
        "# TYPE python_info gauge",
        "# TYPE python_gc_objects_collected_total counter",
    ):
        assert line in text.splitlines(), line
    assert "process_" in text or not Path("/proc/self/stat").exists()
    # Celery-exporter's family is off by default.
    assert "celery_task_sent_total" not in text


@pytest.mark.parametrize("batched", [True, False], ids=["one-batch", "batch-per-event"])
def test_task_lifecycle(harness: AppHarness, batched: bool) -> None:
    events = [task_sent("t1", "tasks.add", T0 - 1), *lifecycle("t1", ts=T0)]
    if batched:
        harness.feed(events)
    else:
        for e in events:
            harness.feed([e])
    text = scrape(harness)
    assert value(text, "flower_events_total", worker=W, type="task-received", task="tasks.add") == 1
    assert (
        value(text, "flower_events_total", worker="client@app", type="task-sent", task="tasks.add")
        == 1
    )
    # task-started carries no name: the task's known name is used.
    assert value(text, "flower_events_total", worker=W, type="task-started", task="tasks.add") == 1
    assert value(text, "flower_task_runtime_seconds_count", worker=W, task="tasks.add") == 1
    assert value(text, "flower_task_runtime_seconds_sum", worker=W, task="tasks.add") == 0.49
    assert (
        value(text, "flower_task_runtime_seconds_bucket", worker=W, task="tasks.add", le="0.5") == 1
    )
    assert (
        value(text, "flower_task_runtime_seconds_bucket", worker=W, task="tasks.add", le="0.1") == 0
    )
    # Set to started - received on task-started, back to 0 when the task finished.
    assert value(text, "flower_task_prefetch_time_seconds", worker=W, task="tasks.add") == 0
    assert value(text, "flower_worker_prefetched_tasks", worker=W, task="tasks.add") == 0


def test_prefetch_gauges_while_waiting(harness: AppHarness) -> None:
    received, started, _ = lifecycle("t1", ts=T0)
    harness.feed([received])
    text = scrape(harness)
    assert value(text, "flower_worker_prefetched_tasks", worker=W, task="tasks.add") == 1
    harness.feed([started])
    text = scrape(harness)
    assert value(text, "flower_worker_prefetched_tasks", worker=W, task="tasks.add") == 0
    prefetch = value(text, "flower_task_prefetch_time_seconds", worker=W, task="tasks.add")
    assert prefetch == pytest.approx(0.01)


def test_revoked_before_start_decrements_prefetched(harness: AppHarness) -> None:
    received = lifecycle("t1", ts=T0)[0]
    harness.feed([received, event("task-revoked", T0 + 1, uuid="t1", hostname=W)])
    harness.feed([lifecycle("t2", ts=T0)[0]])
    harness.feed([event("task-rejected", T0 + 2, uuid="t2", hostname=W)])
    text = scrape(harness)
    assert value(text, "flower_worker_prefetched_tasks", worker=W, task="tasks.add") == 0
    assert value(text, "flower_events_total", worker=W, type="task-revoked", task="tasks.add") == 1


def test_eta_tasks_leave_prefetch_gauges_alone(harness: AppHarness) -> None:
    received, started, done = lifecycle("t1", ts=T0)
    received["eta"] = "2023-11-14T22:13:30+00:00"
    harness.feed([received, started, done])
    text = scrape(harness)
    assert value(text, "flower_worker_prefetched_tasks", worker=W, task="tasks.add") is None
    assert value(text, "flower_task_prefetch_time_seconds", worker=W, task="tasks.add") is None


def test_unknown_task_gets_empty_name(harness: AppHarness) -> None:
    harness.feed([event("task-started", T0, uuid="ghost", hostname=W)])
    text = scrape(harness)
    assert value(text, "flower_events_total", worker=W, type="task-started", task="") == 1


def test_worker_gauges(harness: AppHarness) -> None:
    harness.feed([worker_online(W, T0), worker_heartbeat(W, T0 + 2, active=3)])
    text = scrape(harness)
    assert value(text, "flower_worker_online", worker=W) == 1
    assert value(text, "flower_worker_number_of_currently_executing_tasks", worker=W) == 3
    harness.feed([worker_offline(W, T0 + 3)])
    text = scrape(harness)
    assert value(text, "flower_worker_online", worker=W) == 0
    assert value(text, "flower_worker_number_of_currently_executing_tasks", worker=W) == 3


def test_runtime_buckets_follow_the_option(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, task_runtime_metric_buckets=[0.25, 1.0]):
        h.feed(lifecycle("t1", ts=T0))
        text = scrape(h)
        les = {
            labels["le"]
            for (name, items), _ in samples(text).items()
            if name == "flower_task_runtime_seconds_bucket"
            for labels in [dict(items)]
        }
        assert les == {"0.25", "1.0", "+Inf"}


def test_purge_offline_workers(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, purge_offline_workers=60):
        now = time.time()
        h.feed(
            [
                worker_online("old@host", now - 3600),
                *lifecycle("t1", worker="old@host", ts=now - 3600),
                worker_heartbeat("new@host", now - 1),
                *lifecycle("t2", worker="new@host", ts=now - 1),
            ]
        )
        text = scrape(h)
        workers = {dict(items).get("worker") for (_, items) in samples(text) if items}
        assert "old@host" not in workers
        assert "new@host" in workers
        # The client that sent no worker events is not in the worker table: purged too.
        assert value(text, "flower_worker_online", worker="new@host") == 1
        # A purged worker comes back with its next event.
        h.feed([worker_heartbeat("old@host", time.time())])
        assert value(scrape(h), "flower_worker_online", worker="old@host") == 1


def test_no_purge_without_the_option(harness: AppHarness) -> None:
    harness.feed([worker_online("old@host", T0)])
    assert value(scrape(harness), "flower_worker_online", worker="old@host") == 1


def test_two_apps_do_not_share_series(tmp_path: Path) -> None:
    first = make_harness(tmp_path / "a")
    second = make_harness(tmp_path / "b")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = next(first)
    b = next(second)
    try:
        a.feed(lifecycle("t1", ts=T0))
        assert (
            value(
                scrape(a), "flower_events_total", worker=W, type="task-received", task="tasks.add"
            )
            == 1
        )
        assert (
            value(
                scrape(b), "flower_events_total", worker=W, type="task-received", task="tasks.add"
            )
            is None
        )
    finally:
        for gen in (first, second):
            with pytest.raises(StopIteration):
                next(gen)


def test_scrape_time_families(harness: AppHarness) -> None:
    now = time.time()
    harness.feed(
        [
            worker_heartbeat(W, now),
            *lifecycle("t1", ts=now - 100),
            *lifecycle("t2", ts=now - 50, outcome="failed"),
            lifecycle("t3", ts=now)[0],
        ]
    )
    text = scrape(harness)
    assert value(text, "flower_store_tasks") == 3
    assert value(text, "flower_tasks", state="SUCCESS") == 1
    assert value(text, "flower_tasks", state="FAILURE") == 1
    assert value(text, "flower_tasks", state="RECEIVED") == 1
    assert value(text, "flower_workers_online") == 1
    assert value(text, "flower_store_history_span_seconds") == pytest.approx(100, abs=1)
    assert value(text, "flower_ingest_lag_seconds") == 0
    assert value(text, "flower_ingest_pending_events") == 0
    assert value(text, "flower_events_ingested_total") == 8
    assert (value(text, "flower_store_size_bytes") or 0) > 0
    # The memory broker has no queue lengths: the family is empty, the scrape fine.
    assert "flower_queue_length{" not in text


def test_ingest_lag_counts_pending_events(harness: AppHarness) -> None:
    pending = lifecycle("t1", ts=time.time() - 30)[0]
    harness.services.ingester.add(pending)
    text = scrape(harness)
    assert value(text, "flower_ingest_pending_events") == 1
    assert (value(text, "flower_ingest_lag_seconds") or 0) >= 29
    harness.services.ingester.flush()


def test_ingest_leader_gauge_follows_the_role(harness: AppHarness) -> None:
    # The harness does not ingest: a standby. The real hand-over is in
    # tests/integration/test_postgres_multi.py.
    assert value(scrape(harness), "stamen_ingest_leader") == 0
    harness.services.health.set_ingesting(True)
    assert value(scrape(harness), "stamen_ingest_leader") == 1
    assert harness.client.get("/healthcheck").text == "OK"


def test_celery_exporter_family(exporter: AppHarness) -> None:
    now = time.time()
    exporter.feed(
        [
            worker_heartbeat("celery@box1", now, active=2),
            {**task_sent("t1", "tasks.add", now), "queue": "jobs", "hostname": "web@front"},
            *lifecycle("t1", worker="celery@box1", ts=now),
            *lifecycle("t2", worker="celery@box1", ts=now, outcome="failed"),
        ]
    )
    text = scrape(exporter)
    lab = {"name": "tasks.add", "hostname": "box1"}
    assert (
        value(text, "celery_task_sent_total", name="tasks.add", hostname="front", queue_name="jobs")
        == 1
    )
    assert value(text, "celery_task_received_total", **lab, queue_name="jobs") == 1
    assert value(text, "celery_task_succeeded_total", **lab, queue_name="jobs") == 1
    # Without a task-sent event the queue is unknown: celery-exporter says "celery".
    assert (
        value(text, "celery_task_failed_total", **lab, exception="KeyError", queue_name="celery")
        == 1
    )
    # Every counter is made visible at 0 for the labels of a worker-side event.
    assert value(text, "celery_task_retried_total", **lab, queue_name="jobs") == 0
    assert value(text, "celery_task_runtime_count", **lab, queue_name="jobs") == 1
    assert value(text, "celery_worker_up", hostname="box1") == 1
    assert value(text, "celery_worker_tasks_active", hostname="box1") == 2
    assert "# TYPE celery_queue_length gauge" in text
    # Queues named by task-sent events are measured too (not only the inspected ones).
    assert "jobs" in exporter.client.app.state.metrics.queue_cache.seen  # type: ignore[attr-defined]
    assert "# TYPE celery_task_runtime histogram" in text


def test_label_names_and_order(exporter: AppHarness) -> None:
    """Declared order is what purging relies on (worker first); exposition sorts labels."""
    metrics = exporter.client.app.state.metrics  # type: ignore[attr-defined]
    declared = {m._name: m._labelnames for m in metrics.flower.all}
    assert declared == {
        "flower_events": ("worker", "type", "task"),
        "flower_task_runtime_seconds": ("worker", "task"),
        "flower_task_prefetch_time_seconds": ("worker", "task"),
        "flower_worker_prefetched_tasks": ("worker", "task"),
        "flower_worker_online": ("worker",),
        "flower_worker_number_of_currently_executing_tasks": ("worker",),
    }
    exp = metrics.exporter
    assert exp.counters["task-failed"]._labelnames == (
        "name",
        "hostname",
        "exception",
        "queue_name",
    )
    assert exp.counters["task-sent"]._labelnames == ("name", "hostname", "queue_name")
    assert exp.runtime._labelnames == ("name", "hostname", "queue_name")


def test_no_authentication(tmp_path: Path) -> None:
    """Flower serves /metrics without any auth, even with --basic_auth set (spec 3.7)."""
    for h in make_harness(tmp_path, basic_auth=["user:secret"], unauthenticated_api=False):
        response = h.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain"


def test_purge_threshold_zero_purges_every_offline_worker(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, purge_offline_workers=0):
        now = time.time()
        h.feed([worker_online("gone@host", now - 1), worker_offline("gone@host", now)])
        h.feed([worker_heartbeat("here@host", now)])
        text = scrape(h)
        assert value(text, "flower_worker_online", worker="gone@host") is None
        assert value(text, "flower_worker_online", worker="here@host") == 1


def test_state_counts_refresh_in_the_background(harness: AppHarness) -> None:
    harness.feed(lifecycle("t1", ts=T0))
    assert value(scrape(harness), "flower_tasks", state="SUCCESS") == 1
    harness.feed(lifecycle("t2", ts=T0 + 1))
    collector = harness.client.app.state.metrics.collector  # type: ignore[attr-defined]
    collector._states_at = 0.0  # expired: the next scrape starts a refresh, not waits for it
    deadline = time.monotonic() + 10
    while value(scrape(harness), "flower_tasks", state="SUCCESS") != 2:
        assert time.monotonic() < deadline, "state counts never refreshed"
        time.sleep(0.05)


def test_worker_online_follows_what_another_instance_stored(harness: AppHarness) -> None:
    """A standby, or a new leader, never ingested the worker's events: the gauge follows
    the shared history instead of staying absent or stale."""
    other = StoreWriter(harness.services.db_path, max_tasks=100)
    ingester = Ingester(other)
    now = time.time()

    def store(events: list[dict[str, Any]]) -> None:
        for e in events:
            ingester.add(e)
        ingester.flush()

    try:
        store([worker_online("w9@host", now), worker_heartbeat("w9@host", now)])
        assert value(scrape(harness), "flower_worker_online", worker="w9@host") == 1
        store([worker_offline("w9@host", now + 1)])
        assert value(scrape(harness), "flower_worker_online", worker="w9@host") == 0
        store(lifecycle("only-tasks", worker="w8@host", ts=now))  # no worker events: as Flower
        assert value(scrape(harness), "flower_worker_online", worker="w8@host") is None
    finally:
        other.close()
