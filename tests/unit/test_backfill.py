"""Backfill from the result backend: which tasks a pass picks, what events it makes up.

The store is real SQLite (the unit harness) and the result backend is Celery's own
``cache+memory://`` backend, written with Celery's ``store_result`` as a worker would.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from stamen.events.backfill import (
    GRACE,
    BackendBusy,
    BackendLookup,
    Backfiller,
    Cursor,
    backfill_event,
    backfill_unavailable,
    done_timestamp,
    unfinished_states,
)
from tests.unit.conftest import AppHarness, make_harness
from tests.unit.test_config import load, load_error

NOW = 1_700_000_000.0
DONE = "2023-11-14T22:11:40+00:00"  # NOW - 100 s, as a backend stores date_done


def started_task(**fields: Any) -> dict[str, Any]:
    task = {"uuid": "t1", "state": "STARTED", "worker": "w1@host", "started": NOW - 130.0}
    return task | fields


# --- selection ----------------------------------------------------------------------------


def test_unfinished_states_leave_out_celerys_ready_states_and_keep_custom_ones() -> None:
    known = [
        "PENDING",
        "RECEIVED",
        "STARTED",
        "SUCCESS",
        "FAILURE",
        "RETRY",
        "REVOKED",
        "REJECTED",
        "PROGRESS",
    ]
    assert unfinished_states(known) == [
        "PENDING",
        "RECEIVED",
        "STARTED",
        "RETRY",
        "REJECTED",
        "PROGRESS",
    ]


def test_each_pass_starts_one_state_later() -> None:
    cursor = Cursor()
    states = ["PENDING", "STARTED", "RETRY"]
    assert cursor.rotation(states) == ["PENDING", "STARTED", "RETRY"]
    assert cursor.rotation(states) == ["STARTED", "RETRY", "PENDING"]
    assert cursor.rotation(states) == ["RETRY", "PENDING", "STARTED"]
    assert cursor.rotation(states) == ["PENDING", "STARTED", "RETRY"]
    assert cursor.rotation([]) == []


def test_the_cursor_moves_past_tasks_that_stay_and_wraps_at_the_end() -> None:
    cursor = Cursor()
    # A full page of 5 where 2 finished: the 3 that stay are skipped next time.
    cursor.advance("STARTED", 0, 5, fetched=5, resolved=2)
    assert cursor.offsets["STARTED"] == 3
    cursor.advance("STARTED", 3, 5, fetched=5, resolved=0)
    assert cursor.offsets["STARTED"] == 8
    # A short page reached the newest: start again from the oldest.
    cursor.advance("STARTED", 8, 5, fetched=4, resolved=0)
    assert cursor.offsets["STARTED"] == 0


# --- synthesis ----------------------------------------------------------------------------


def test_done_timestamp_reads_iso_text_and_datetimes_naive_as_utc() -> None:
    assert done_timestamp(DONE) == NOW - 100
    assert done_timestamp("2023-11-14T22:11:40") == NOW - 100
    assert done_timestamp(datetime(2023, 11, 14, 22, 11, 40, tzinfo=UTC)) == NOW - 100
    assert done_timestamp(datetime(2023, 11, 14, 22, 11, 40)) == NOW - 100
    assert done_timestamp(None) is None
    assert done_timestamp("yesterday") is None
    assert done_timestamp(12) is None


def test_success_becomes_task_succeeded_with_the_results_repr() -> None:
    meta = {"status": "SUCCESS", "result": {"n": [1, "a"]}, "date_done": DONE}
    event = backfill_event(started_task(), meta, NOW)
    assert event == {
        "type": "task-succeeded",
        "uuid": "t1",
        "hostname": "w1@host",
        "timestamp": NOW - 100,
        "result": "{'n': [1, 'a']}",
        "runtime": 30.0,
        "stamen_backfilled": True,
    }


def test_a_long_result_is_cut_like_a_workers_event() -> None:
    meta = {"status": "SUCCESS", "result": "x" * 5000, "date_done": DONE}
    event = backfill_event(started_task(started=None), meta, NOW)
    assert event is not None
    assert "runtime" not in event
    assert len(event["result"]) < 1100 and event["result"].startswith("'xxx")


def test_failure_becomes_task_failed_with_exception_and_traceback() -> None:
    meta = {
        "status": "FAILURE",
        "result": KeyError("boom"),
        "traceback": "Traceback (most recent call last):\nKeyError: 'boom'\n",
        "date_done": DONE,
    }
    event = backfill_event(started_task(), meta, NOW)
    assert event is not None
    assert event["type"] == "task-failed"
    assert event["exception"] == "KeyError('boom')"
    assert event["traceback"].endswith("KeyError: 'boom'\n")
    assert "result" not in event and "runtime" not in event


def test_revoked_becomes_task_revoked() -> None:
    meta = {"status": "REVOKED", "result": None, "date_done": DONE}
    event = backfill_event(started_task(state="RECEIVED"), meta, NOW)
    assert event is not None and event["type"] == "task-revoked"
    assert event["timestamp"] == NOW - 100 and event["stamen_backfilled"] is True


@pytest.mark.parametrize("status", ["PENDING", "STARTED", "RETRY", "PROGRESS"])
def test_a_task_the_backend_knows_as_unfinished_makes_no_event(status: str) -> None:
    assert backfill_event(started_task(), {"status": status, "date_done": DONE}, NOW) is None


def test_a_result_stored_moments_ago_waits_for_the_workers_own_event() -> None:
    meta = {"status": "SUCCESS", "result": 1, "date_done": DONE}
    assert backfill_event(started_task(), meta, NOW - 100 + GRACE - 1) is None
    assert backfill_event(started_task(), meta, NOW - 100 + GRACE + 1) is not None


def test_the_worker_comes_from_the_backend_when_the_history_has_none() -> None:
    meta = {"status": "SUCCESS", "result": 1, "date_done": DONE, "worker": "w2@host"}
    event = backfill_event(started_task(worker=None, state="PENDING"), meta, NOW)
    assert event is not None and event["hostname"] == "w2@host"


def test_without_date_done_the_event_is_stamped_now() -> None:
    event = backfill_event(started_task(), {"status": "SUCCESS", "result": 1}, NOW)
    assert event is not None and event["timestamp"] == NOW and "runtime" not in event


# --- which backends ----------------------------------------------------------------------


def test_only_a_backend_that_keeps_results_for_anyone_is_asked() -> None:
    assert backfill_unavailable(Celery("b", broker="memory://")) == "no result backend configured"
    rpc = Celery("b", broker="memory://", backend="rpc://")
    assert backfill_unavailable(rpc) == "rpc:// results go to the caller only"
    assert backfill_unavailable(Celery("b", broker="memory://", backend="cache+memory://")) is None


def test_the_option_defaults_to_a_minute_and_takes_zero_or_seconds(tmp_path: Path) -> None:
    assert load(tmp_path).backfill_interval == 60.0
    assert load(tmp_path, "--backfill_interval=0").backfill_interval == 0.0
    assert load(tmp_path, env={"FLOWER_BACKFILL_INTERVAL": "2.5"}).backfill_interval == 2.5
    assert "0 or more" in load_error(tmp_path, "--backfill_interval=-1")
    assert "finite" in load_error(tmp_path, "--backfill_interval=inf")
    assert "finite" in load_error(tmp_path, conf="backfill_interval = float('inf')\n")


# --- passes over a real store and Celery's in-memory result backend ---------------------


@pytest.fixture
def filled(tmp_path: Path) -> Iterator[AppHarness]:
    yield from make_harness(tmp_path, backend="cache+memory://")


def lifecycle(uuid: str, *kinds: str, at: float, **extra: Any) -> list[dict[str, Any]]:
    events = []
    for i, kind in enumerate(kinds):
        event = {
            "type": f"task-{kind}",
            "uuid": uuid,
            "hostname": "w1@host",
            "timestamp": at + i,
            "local_received": at + i,
            "clock": i,
        }
        if kind == "received":
            event |= {"name": "tasks.add", "args": "(1, 2)", "kwargs": "{}"}
        events.append(event | extra)
    return events


def store(app: Celery, uuid: str, value: Any, state: str, traceback: str | None = None) -> None:
    """What a worker writes to the result backend when a task ends."""
    app.backend.store_result(uuid, value, state, traceback=traceback)


def backfiller(h: AppHarness, **kwargs: Any) -> Backfiller:
    """Passes run with the clock a minute ahead: results just stored are past the grace."""
    svc = h.services
    return Backfiller(
        svc.app, svc.reader, svc.ingester, 60.0, clock=lambda: time.time() + 60, **kwargs
    )


def test_a_pass_fills_in_how_missed_tasks_ended(filled: AppHarness) -> None:
    at = time.time() - 300
    filled.feed(
        lifecycle("ran", "received", "started", at=at)
        + lifecycle("broke", "received", "started", at=at + 10)
        + lifecycle("queued", "received", at=at + 20)
        + lifecycle("heard", "received", "started", "succeeded", at=at + 30, result="7")
    )
    app = filled.services.app
    store(app, "ran", 3, "SUCCESS")
    try:
        raise KeyError("boom")
    except KeyError as exc:
        store(app, "broke", exc, "FAILURE", traceback="Traceback ...\nKeyError: 'boom'\n")
    store(app, "heard", 8, "SUCCESS")  # the events said 7: the history is not touched
    counters = filled.services.reader.counters()

    done = backfiller(filled).run_pass()
    filled.services.ingester.flush()

    assert (done.looked_up, done.backfilled) == (3, 2)
    reader = filled.services.reader
    ran = reader.get_task("ran")
    assert ran is not None
    assert (ran["state"], ran["result"], ran["worker"]) == ("SUCCESS", "3", "w1@host")
    assert ran["name"] == "tasks.add" and ran["runtime"] > 0
    broke = reader.get_task("broke")
    assert broke is not None and broke["state"] == "FAILURE"
    assert broke["exception"] == "KeyError('boom')"
    assert broke["traceback"].endswith("KeyError: 'boom'\n")
    queued = reader.get_task("queued")
    assert queued is not None and queued["state"] == "RECEIVED"
    heard = reader.get_task("heard")
    assert heard is not None and heard["result"] == "7"
    assert ran.get("backfilled") is True and broke.get("backfilled") is True
    assert "backfilled" not in heard and "backfilled" not in queued
    # Made-up events are not events heard from the worker.
    assert reader.counters() == counters
    succeeded = [
        line
        for line in filled.client.get("/metrics").text.splitlines()
        if line.startswith("flower_events_total") and 'type="task-succeeded"' in line
    ]
    assert len(succeeded) == 1 and succeeded[0].endswith(" 1.0"), succeeded  # "heard" only


def test_a_pass_does_not_ask_again_about_tasks_it_just_filled_in(filled: AppHarness) -> None:
    filled.feed(lifecycle("ran", "received", "started", at=time.time() - 300))
    store(filled.services.app, "ran", 3, "SUCCESS")
    runner = backfiller(filled)
    assert runner.run_pass().backfilled == 1
    # Not flushed yet: the task is still STARTED in the store.
    again = runner.run_pass()
    assert (again.looked_up, again.backfilled) == (1, 0)
    assert len(filled.services.ingester.pending) == 1


def test_passes_are_bounded_and_go_round_the_oldest_first(filled: AppHarness) -> None:
    at = time.time() - 300
    events = []
    for i in range(6):
        events += lifecycle(f"t{i}", "received", "started", at=at + 10 * i)
    filled.feed(events)
    app = filled.services.app
    for i in (0, 4):
        store(app, f"t{i}", i, "SUCCESS")
    runner = backfiller(filled, per_pass=1)

    seen: list[str] = []
    runner.lookup = lambda ids, real=runner.lookup: seen.extend(ids) or real(ids)
    first = runner.run_pass()
    filled.services.ingester.flush()
    assert seen == ["t0"] and first.backfilled == 1 and first.more
    for _ in range(5):
        runner.run_pass()
        filled.services.ingester.flush()
    # t0 left STARTED, so the walk went on from t1; t4 was found on the way.
    assert seen == ["t0", "t1", "t2", "t3", "t4", "t5"]
    states = {t: filled.services.reader.get_task(t)["state"] for t in ("t0", "t4", "t5")}  # type: ignore[index]
    assert states == {"t0": "SUCCESS", "t4": "SUCCESS", "t5": "STARTED"}
    runner.run_pass()
    assert seen[-1] == "t1"  # the end was reached: round again from the oldest


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_backend_is_logged_once_and_stalls_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    for h in make_harness(tmp_path, backend=url):
        h.services.app.conf.redis_socket_connect_timeout = 1
        h.services.app.conf.redis_retry_on_timeout = False
        h.feed(lifecycle("ran", "received", "started", at=time.time() - 300))
        runner = backfiller(h)
        with caplog.at_level(logging.INFO, logger="stamen.events.backfill"):
            started = time.monotonic()
            assert runner.run_pass().backfilled == 0
            assert runner.run_pass().backfilled == 0
            elapsed = time.monotonic() - started
        warnings = [
            r
            for r in caplog.records
            if r.name == "stamen.events.backfill" and r.levelno >= logging.WARNING
        ]
        assert len(warnings) == 1, caplog.text
        assert "cannot reach the result backend" in warnings[0].getMessage()
        assert elapsed < 25
        runner.stop()


def test_a_backend_that_never_answers_times_out_and_is_not_queued_behind() -> None:
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        app = Celery("b", broker="memory://", backend=f"redis://127.0.0.1:{port}/0")
        lookup = BackendLookup(app, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            lookup(["a"])
        assert time.monotonic() - started < 5
        with pytest.raises(BackendBusy):
            lookup(["b"])
        lookup.close()


def test_the_task_page_shows_a_backfilled_badge(filled: AppHarness) -> None:
    at = time.time() - 300
    filled.feed(
        lifecycle("ran", "received", "started", at=at)
        + lifecycle("heard", "received", "started", "succeeded", at=at, result="7")
    )
    store(filled.services.app, "ran", 3, "SUCCESS")
    backfiller(filled).run_pass()
    filled.services.ingester.flush()
    page = filled.client.get("/task/ran")
    assert page.status_code == 200
    assert 'class="badge backfilled"' in page.text
    assert "<dt>Backfilled</dt>" not in page.text
    assert 'class="badge backfilled"' not in filled.client.get("/task/heard").text


def test_an_unreadable_record_is_skipped_and_its_kind_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Celery("b", broker="memory://", backend="cache+memory://")
    backend = app.backend
    forged = {
        "status": "FAILURE",
        "date_done": DONE,
        "result": {"exc_module": "os", "exc_type": "system", "exc_message": "id"},
    }
    for task_id in ("forged-1", "forged-2"):
        backend.set(backend.get_key_for_task(task_id), backend.encode(forged))
    store(app, "fine", 1, "SUCCESS")
    lookup = BackendLookup(app)
    with caplog.at_level(logging.WARNING, logger="stamen.events.backfill"):
        assert set(lookup(["forged-1", "fine", "unknown"])) == {"fine"}
        assert set(lookup(["forged-2"])) == set()
    lookup.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "stamen.events.backfill"]
    assert len(logged) == 1 and "SecurityError for forged-1" in logged[0]


def test_stopping_does_not_wait_for_a_backend_that_never_answers(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        for h in make_harness(tmp_path, backend=url):
            h.feed(lifecycle("ran", "received", "started", at=time.time() - 300))
            runner = Backfiller(h.services.app, h.services.reader, h.services.ingester, 0.1)
            runner.start()
            silent.settimeout(10)
            conn, _ = silent.accept()  # the pass is now waiting on the backend
            started = time.monotonic()
            runner.stop(timeout=1.0)
            assert time.monotonic() - started < 2
            conn.close()
