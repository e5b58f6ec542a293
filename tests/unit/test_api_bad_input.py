"""Regression tests for bad input the API fuzzer (test_fuzz_api.py) found: 4xx, never 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import lifecycle
from tests.unit.conftest import AppHarness, make_harness


@pytest.fixture
def with_backend(tmp_path: Path) -> Iterator[AppHarness]:
    yield from make_harness(tmp_path, backend="cache+memory://")


@pytest.mark.parametrize("timeout", ["nan", "inf", "-inf", "-1"])
def test_task_result_rejects_a_timeout_that_is_not_a_number_of_seconds(
    with_backend: AppHarness, timeout: str
) -> None:
    # Before: NaN and infinity were passed to AsyncResult.get, which waited for ever
    # (the request never answered); -1 was silently treated as "do not wait".
    response = with_backend.client.get("/api/task/result/x", params={"timeout": timeout})
    assert (response.status_code, response.text) == (
        400,
        "Invalid argument 'timeout': must be a non-negative number of seconds",
    )


def test_task_result_still_waits_a_valid_timeout(with_backend: AppHarness) -> None:
    response = with_backend.client.get("/api/task/result/x", params={"timeout": "0.05"})
    assert response.status_code == 200
    assert response.json() == {"task-id": "x", "state": "PENDING"}


def test_task_result_timeout_that_is_not_a_number(with_backend: AppHarness) -> None:
    response = with_backend.client.get("/api/task/result/x", params={"timeout": "soon"})
    assert (response.status_code, response.text) == (400, "Invalid argument 'soon' of type 'float'")


HUGE = str(10**20)  # beyond the 64-bit integers SQLite can bind


def test_tasks_limit_and_offset_beyond_64_bits(harness: AppHarness) -> None:
    # Before: 500 (OverflowError: Python int too large to convert to SQLite INTEGER).
    # Flower slices a list, so a huge limit is "all" and a huge offset "none": so do we.
    harness.feed(lifecycle("a", ts=10.0))
    response = harness.client.get("/api/tasks", params={"limit": HUGE})
    assert response.status_code == 200 and list(response.json()) == ["a"]
    response = harness.client.get("/api/tasks", params={"offset": HUGE})
    assert (response.status_code, response.json()) == (200, {})


def test_datatable_start_and_length_beyond_64_bits(harness: AppHarness) -> None:
    # Before: 500, the same overflow through the Tasks page's datatable.
    harness.feed(lifecycle("a", ts=10.0))
    base = {"draw": "1", "order[0][column]": "0"}
    response = harness.client.get("/tasks/datatable", params={**base, "start": "0", "length": HUGE})
    assert response.status_code == 200
    assert [row["uuid"] for row in response.json()["data"]] == ["a"]
    response = harness.client.get(
        "/tasks/datatable", params={**base, "start": HUGE, "length": "10"}
    )
    assert response.status_code == 200 and response.json()["data"] == []


def test_audit_offset_beyond_64_bits(harness: AppHarness) -> None:
    # Before: 500 (the same overflow in the audit log query).
    response = harness.client.get("/api/audit", params={"offset": HUGE})
    assert (response.status_code, response.json()) == (200, {"entries": []})


def _echo(x: int) -> int:
    return x


def test_an_audited_integer_past_64_bits_reads_back(harness: AppHarness) -> None:
    """JSON bodies may carry any integer; the audit log keeps it and must still answer."""
    harness.services.app.task(name="unit.echo")(_echo)
    sent = harness.client.post("/api/task/async-apply/unit.echo", json={"args": [2**70]})
    assert sent.status_code in (200, 400, 503), sent.text
    response = harness.client.get("/api/audit", params={"action": "task.async_apply"})
    assert response.status_code == 200, response.text
    assert response.json()["entries"][0]["params"]["args"] == [2**70]
