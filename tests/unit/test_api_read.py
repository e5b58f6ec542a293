"""Flower's read API over a real store: shapes, order, filters and every error answer."""

from __future__ import annotations

import re
from pathlib import Path

from tests.factories import lifecycle, task_sent, worker_heartbeat, worker_online
from tests.unit.conftest import AppHarness, make_harness


def test_api_is_closed_without_auth_or_opt_in(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, unauthenticated_api=False):
        response = h.client.get("/api/tasks")
        assert response.status_code == 401
        assert response.text == (
            "FLOWER_UNAUTHENTICATED_API environment variable is required to enable API "
            "without authentication"
        )
        assert h.client.get("/healthcheck").status_code in (200, 503)


def test_basic_auth_gates_the_api(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, unauthenticated_api=False, basic_auth=["ann:s3cret"]):
        assert h.client.get("/api/tasks").status_code == 401
        assert h.client.get("/api/tasks", auth=("ann", "wrong")).status_code == 401
        assert h.client.get("/api/tasks", auth=("ann", "s3cret")).status_code == 200


def test_tasks_are_an_ordered_object_with_worker_last(harness: AppHarness) -> None:
    harness.feed(lifecycle("a", ts=10.0) + lifecycle("b", ts=20.0, outcome="failed"))
    harness.feed([task_sent("c", "tasks.queued", 30.0)])
    body = harness.client.get("/api/tasks").json()
    assert list(body) == ["c", "b", "a"]
    assert list(body["a"])[-1] == "worker" and body["a"]["worker"] == "w1@host"
    assert "worker" not in body["c"]
    assert body["a"]["result"] == "3" and body["b"]["state"] == "FAILURE"
    assert list(harness.client.get("/api/tasks?sort_by=-received&limit=1").json()) == ["b"]
    assert list(harness.client.get("/api/tasks?offset=-3&limit=2").json()) == ["c", "b"]
    assert list(harness.client.get("/api/tasks?state=failure").json()) == ["b"]
    assert list(harness.client.get("/api/tasks?state=All&taskname=All").json()) == ["c", "b", "a"]


def test_task_info_keeps_worker_in_place(harness: AppHarness) -> None:
    harness.feed(lifecycle("a", ts=10.0))
    info = harness.client.get("/api/task/info/a").json()
    keys = list(info)
    assert keys.index("worker") == keys.index("retries") + 1
    assert info["worker"] == "w1@host"
    assert info["uuid"] == "a" and info["children"] == []
    missing = harness.client.get("/api/task/info/zzz")
    assert (missing.status_code, missing.text) == (404, "Unknown task 'zzz'")
    assert missing.headers["content-type"].startswith("text/plain")


def test_task_types_sorted(harness: AppHarness) -> None:
    harness.feed(lifecycle("a", name="z.last", ts=1.0) + lifecycle("b", name="a.first", ts=2.0))
    assert harness.client.get("/api/task/types").json() == {"task-types": ["a.first", "z.last"]}


def test_worker_status_from_events(harness: AppHarness) -> None:
    import time

    now = time.time()
    harness.feed([worker_online("w1@host", now), worker_heartbeat("w1@host", now)])
    harness.feed([worker_online("old@host", now - 3600)])
    assert harness.client.get("/api/workers?status=true").json() == {
        "old@host": False,
        "w1@host": True,
    }
    assert harness.client.get("/api/workers?status=maybe").status_code == 400


def test_bad_arguments_answer_400_with_flower_texts(harness: AppHarness) -> None:
    get = harness.client.get
    cases = {
        "/api/tasks?limit=abc": "Invalid argument 'abc' of type 'int'",
        "/api/tasks?offset=1.5": "Invalid argument '1.5' of type 'int'",
        "/api/tasks?sort_by=runtime": (
            "Invalid sort_by 'runtime', expected one of name, received, started, state"
        ),
        "/api/tasks?received_end=2024-13-01": (
            "Invalid received_start or received_end, expected format 'YYYY-MM-DD HH:MM'"
        ),
    }
    for url, text in cases.items():
        response = get(url)
        assert (response.status_code, response.text) == (400, text), url
    bad_search = get("/api/tasks", params={"search": 'args:"open'})
    assert bad_search.status_code == 400
    assert bad_search.json() == {"error": "Unterminated quoted phrase at position 5."}


def test_result_without_backend_is_503(harness: AppHarness) -> None:
    response = harness.client.get("/api/task/result/abc")
    assert (response.status_code, response.text) == (503, "")


def test_queue_length_on_unsupported_broker_is_404(harness: AppHarness) -> None:
    response = harness.client.get("/api/queues/length")
    assert (response.status_code, response.text) == (404, "'memory' broker is not supported")


def test_unknown_paths_are_404_not_500(harness: AppHarness) -> None:
    assert harness.client.get("/api/nothing").status_code == 404
    assert harness.client.get("/api/tasks/").status_code == 404
    assert harness.client.get("/api/openapi.json").status_code == 200


def test_api_docs_load_swagger_ui_from_stamen_itself(harness: AppHarness) -> None:
    page = harness.client.get("/api/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(assets) == 3 and all(a.startswith(("/static/", "/api/docs/")) for a in assets)
    assert "cdn" not in page.text and 'validatorUrl": null' in page.text
    for asset in assets:
        assert harness.client.get(asset).status_code == 200, asset
