"""Tasks run by a real worker show up in Stamen's API as Flower shows them.

Each test runs against Redis and RabbitMQ: the same session-wide worker and Stamen per
broker, tasks submitted by a client exactly as an application would.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Cluster, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "rabbitmq"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(f"{request.param}_cluster")  # type: ignore[no-any-return]


def test_success_is_recorded_with_flower_fields(cluster: Cluster) -> None:
    task_id = cluster.send("itest.add", 2, 3)
    task = cluster.wait_state(task_id, "SUCCESS")
    assert task["uuid"] == task_id
    assert task["name"] == "itest.add"
    assert task["args"] == "(2, 3)"
    assert task["kwargs"] == "{}"
    assert task["result"] == "5"
    assert task["worker"] == cluster.worker.hostname
    assert task["received"] <= task["started"] <= task["succeeded"]
    assert task["runtime"] >= 0
    assert task["children"] == []
    assert task["root_id"] == task_id


def test_failure_keeps_exception_and_traceback(cluster: Cluster) -> None:
    task_id = cluster.send("itest.fail", "boom-failure")
    task = cluster.wait_state(task_id, "FAILURE")
    assert task["exception"] == "KeyError('boom-failure')"
    assert "KeyError" in task["traceback"]
    assert task["result"] is None


def test_retries_end_in_success(cluster: Cluster) -> None:
    task_id = cluster.send("itest.retry", "again")
    task = cluster.wait_state(task_id, "SUCCESS")
    assert task["retries"] == 2
    assert task["retried"] is not None
    assert task["result"] == "'done again'"


def test_task_list_filters_sorts_and_searches(cluster: Cluster) -> None:
    ok = cluster.send("itest.echo", "needle-in-a-haystack", colour="teal")
    bad = cluster.send("itest.fail", "needle-broken")
    cluster.wait_state(ok, "SUCCESS")
    cluster.wait_state(bad, "FAILURE")

    def ids(**params: Any) -> list[str]:
        response = cluster.stamen.get("/api/tasks", params=params)
        assert response.status_code == 200, response.text
        return list(response.json())

    assert ok in ids(search="needle-in")
    assert bad not in ids(search="needle-in")
    assert set(ids(search="needle", state="FAILURE")) >= {bad}
    assert ok not in ids(search="needle", state="FAILURE")
    assert ok in ids(search="kwargs:colour=teal")
    assert ok not in ids(search="kwargs:colour=tea")
    assert bad in ids(taskname="ITEST.FAIL", workername=cluster.worker.hostname)
    assert ids(limit=1) and len(ids(limit=1)) == 1
    by_name = ids(sort_by="name", search="needle")
    assert by_name.index(ok) < by_name.index(bad)
    page = cluster.stamen.get("/api/tasks", params={"search": "needle", "limit": 5}).json()
    for task in page.values():
        assert list(task)[-1] == "worker"


def test_task_types_and_workers(cluster: Cluster) -> None:
    task_id = cluster.send("itest.add", 1, 1)
    cluster.wait_state(task_id, "SUCCESS")
    types = cluster.stamen.get("/api/task/types").json()["task-types"]
    assert "itest.add" in types
    assert types == sorted(types)
    workers = cluster.stamen.get("/api/workers", params={"refresh": "1"}).json()
    entry = workers[cluster.worker.hostname]
    assert entry["stats"]["pid"] == cluster.worker.proc.pid
    assert any(q["name"] == cluster.queue for q in entry["active_queues"])
    assert "itest.add" in entry["registered"]
    assert "timestamp" in entry
    one = cluster.stamen.get("/api/workers", params={"workername": cluster.worker.hostname})
    assert list(one.json()) == [cluster.worker.hostname]
    missing = cluster.stamen.get("/api/workers", params={"workername": "nobody@nowhere"})
    assert missing.status_code == 404
    assert missing.text == "Unknown worker 'nobody@nowhere'"


def test_result_endpoint_reads_the_backend(cluster: Cluster) -> None:
    task_id = cluster.send("itest.add", 20, 22)
    response = cluster.stamen.get(f"/api/task/result/{task_id}", params={"timeout": "10"})
    assert response.status_code == 200
    assert response.json() == {"task-id": task_id, "state": "SUCCESS", "result": 42}
    failed = cluster.send("itest.fail", "result-failure")
    body = cluster.stamen.get(f"/api/task/result/{failed}", params={"timeout": "10"}).json()
    assert body["state"] == "FAILURE"
    assert body["result"] == "KeyError('result-failure')"
    assert "KeyError" in body["traceback"]
    bad = cluster.stamen.get(f"/api/task/result/{task_id}", params={"timeout": "soon"})
    assert bad.status_code == 400
    assert bad.text == "Invalid argument 'soon' of type 'float'"


def test_queue_length_counts_waiting_messages(cluster: Cluster) -> None:
    for _ in range(16):
        cluster.send("itest.sleep", 0.4)

    def waiting() -> int:
        body = cluster.stamen.get("/api/queues/length").json()
        queues = {q["name"]: q["messages"] for q in body["active_queues"]}
        return queues.get(cluster.queue, 0)

    assert wait_until(lambda: waiting() >= 4, timeout=20, what="messages waiting")
    wait_until(lambda: waiting() == 0, timeout=30, what="queue drained")


def test_unknown_task_and_bad_arguments_are_4xx(cluster: Cluster) -> None:
    get = cluster.stamen.get
    assert get("/api/task/info/no-such-task").status_code == 404
    assert get("/api/task/info/no-such-task").text == "Unknown task 'no-such-task'"
    assert get("/api/task/info/").status_code == 404
    response = get("/api/tasks", params={"limit": "abc"})
    assert (response.status_code, response.text) == (400, "Invalid argument 'abc' of type 'int'")
    response = get("/api/tasks", params={"sort_by": "bogus"})
    assert response.status_code == 400
    assert (
        response.text == "Invalid sort_by 'bogus', expected one of name, received, started, state"
    )
    response = get("/api/tasks", params={"received_start": "yesterday"})
    assert response.status_code == 400
    assert "expected format 'YYYY-MM-DD HH:MM'" in response.text
    response = get("/api/tasks", params={"search": "ab"})
    assert response.status_code == 400
    assert response.json() == {
        "error": "Substring search terms must contain at least 3 characters at position 0."
    }
    assert get("/api/tasks", params={"limit": "-5"}).json() == {}
