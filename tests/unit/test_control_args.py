"""Control API input rules and error answers, without a broker worth the name.

The pure rules (reply reading, option normalisation, signals, rebuilding a stored call) are
tested directly; the endpoints run in-process on a ``memory://`` broker, where no worker ever
answers, so every path here ends in a 4xx before or instead of a worker's reply. Effects on
real workers are tested in ``tests/integration/test_control.py`` and ``test_actions.py``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.utils.saferepr import saferepr

from stamen.cluster import control as rules
from stamen.cluster.pause import consumers_of
from tests.factories import lifecycle
from tests.unit.conftest import AppHarness, make_harness

# --- pure rules -------------------------------------------------------------------------------


def test_reply_reading_follows_flower() -> None:
    assert rules.reply_ok([{"w": {"ok": "pool will grow"}}], "w") == "pool will grow"
    assert rules.reply_ok([{"w": "ok"}], "w") == "ok"
    assert rules.reply_ok([{"w": {"error": "nope"}}], "w") is None
    assert rules.reply_error([{"w": {"error": "ValueError('x')"}}], "w") == "ValueError('x')"
    # No reply in time, malformed, or another worker's reply first: never a crash.
    assert rules.reply_error([], "w") == "Unknown reason"
    assert rules.reply_error(None, "w") == "Unknown reason"
    assert rules.reply_ok([{"other": {"ok": "x"}}, {"w": {"ok": "y"}}], "w") == "y"


def test_signals() -> None:
    assert rules.parse_signal(None) == "SIGTERM"
    assert rules.parse_signal("kill") == "SIGKILL"
    assert rules.parse_signal("SIGUSR1") == "SIGUSR1"
    assert rules.parse_signal("9") == "SIGKILL"
    for bad in ("SIGNOPE", "999", "TERM;rm"):
        with pytest.raises(rules.InputError, match="Invalid signal"):
            rules.parse_signal(bad)


def test_body_parsing_uses_flowers_messages() -> None:
    assert rules.parse_body(b"") == ([], {}, {})
    assert rules.parse_body(b'{"args": [1], "kwargs": {"a": 2}, "queue": "q"}') == (
        [1],
        {"a": 2},
        {"queue": "q"},
    )
    cases = {
        b"notjson": "Expecting value: line 1 column 1 (char 0)",
        b"[1, 2]": "invalid options",
        b'{"args": "x"}': "args must be an array",
        b'{"kwargs": [1]}': "kwargs must be an object",
    }
    for body, message in cases.items():
        with pytest.raises(rules.InputError) as caught:
            rules.parse_body(body)
        assert str(caught.value) == message


def test_option_normalisation() -> None:
    options = rules.normalise_options(
        {"eta": "2030-01-02 03:04:05.000006", "countdown": "5", "expires": "2.5", "queue": "q"}
    )
    assert options["eta"] == datetime(2030, 1, 2, 3, 4, 5, 6)
    assert options["countdown"] == 5.0
    assert options["expires"] == 2.5
    dated = rules.normalise_options({"expires": "2030-01-02 03:04:05.000000"})
    assert dated["expires"] == datetime(2030, 1, 2, 3, 4, 5)
    for bad in (
        {"eta": "bad"},
        {"eta": "2030-01-02 03:04:05"},  # Flower requires the microseconds
        {"eta": 5},
        {"countdown": "soon"},
        {"countdown": "nan"},
        {"expires": [1]},
        {"queue": 5},
        {"priority": 300},
        {"priority": True},
        {"headers": "x"},
    ):
        with pytest.raises(rules.InputError, match=r"^Invalid option$"):
            rules.normalise_options(bad)


def test_apply_timeout() -> None:
    options = {"timeout": "2.5", "queue": "q"}
    assert rules.pop_timeout(options) == 2.5
    assert options == {"queue": "q"}
    assert rules.pop_timeout({}) is None
    for bad in ("x", -1, "inf", True):
        with pytest.raises(rules.InputError, match=r"^Invalid timeout$"):
            rules.pop_timeout({"timeout": bad})


def test_retry_call_rebuilds_literals_only() -> None:
    task = {
        "uuid": "a",
        "name": "tasks.add",
        "args": "(1, 2)",
        "kwargs": "{'x': 'y'}",
        "exchange": "",
        "routing_key": "work",
    }
    assert rules.retry_call(task) == ("tasks.add", (1, 2), {"x": "y"}, {"queue": "work"})
    task |= {"exchange": "topic-x", "routing_key": "a.b"}
    assert rules.retry_call(task)[3] == {"exchange": "topic-x", "routing_key": "a.b"}
    with pytest.raises(rules.InputError, match="cannot be rebuilt"):
        rules.retry_call(task | {"args": "(<object at 0x1>,)"})
    with pytest.raises(rules.InputError, match="cannot be rebuilt"):
        rules.retry_call(task | {"args": "('aaaa...',"})
    with pytest.raises(rules.InputError, match="name is not known"):
        rules.retry_call(task | {"name": None})
    # What the result backend kept wins over the events' reprs.
    assert rules.retry_call(task | {"args": "(<x>,)"}, ((3,), {}))[1:3] == ((3,), {})


@pytest.mark.parametrize(
    "call",
    [
        (("m" * 3000,), {}),  # a long string: cut, yet still a string literal
        (("x" * 5000, "y"), {}),  # an item past the cut: Ellipsis
        ((list(range(1000)),), {}),
        (([[[[1]]]],), {}),  # nested past task_repr_maxlevels
        ((), {"note": "n" * 2000}),
    ],
)
def test_retry_refuses_arguments_celery_cut_short(call: tuple[Any, Any]) -> None:
    """The reprs a Celery sender really puts in its events (saferepr with its limits)."""
    args, kwargs = call
    amqp = Celery("cut").amqp
    task = {
        "uuid": "a",
        "name": "tasks.echo",
        "args": saferepr(args, amqp.argsrepr_maxsize, maxlevels=3),
        "kwargs": saferepr(kwargs, amqp.kwargsrepr_maxsize, maxlevels=3),
    }
    with pytest.raises(rules.InputError, match="shortened in its events"):
        rules.retry_call(task)


def test_retry_keeps_long_arguments_that_were_not_cut() -> None:
    args = ("a" * 1020,)  # a repr over the limit's length that Celery did not cut
    task = {"uuid": "a", "name": "t", "args": saferepr(args, 1024), "kwargs": "{}"}
    assert rules.retry_call(task)[1] == args
    assert rules.retry_call(task | {"args": "('loading...',)"})[1] == ("loading...",)


def test_check_bounds() -> None:
    assert rules.check_count(None, "n") == 1
    with pytest.raises(rules.InputError, match="between 1 and 1000"):
        rules.check_count(-3, "n")
    assert rules.check_seconds(None, "hard") is None
    with pytest.raises(rules.InputError, match="non-negative"):
        rules.check_seconds(float("inf"), "hard")
    with pytest.raises(rules.InputError):
        rules.check_name("", "queue")


def test_consumers_of() -> None:
    replies = {"a": [{"name": "q"}, {"name": "r"}], "b": [{"name": "r"}], "c": None}
    assert consumers_of(replies, "q") == ["a"]
    assert consumers_of(replies, "r") == ["a", "b"]
    assert consumers_of(None, "q") == []


# --- endpoints: every bad input is a 4xx with a clear message ---------------------------------


def _add(x: int, y: int) -> int:
    return x + y


def _register_add(h: AppHarness) -> None:
    """Stamen's own app knows ``unit.add`` (Flower checks its own registry)."""
    h.services.app.task(name="unit.add")(_add)


def _post(h: AppHarness, path: str, **kwargs: object) -> tuple[int, str]:
    response = h.client.post(path, **kwargs)  # type: ignore[arg-type]
    return response.status_code, response.text


def test_read_only_refuses_every_action(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, read_only=True):
        for path in (
            "/api/worker/shutdown/w1",
            "/api/worker/pool/grow/w1",
            "/api/worker/pool/autoscale/w1?min=1&max=2",
            "/api/worker/queue/add-consumer/w1?queue=q",
            "/api/task/revoke/abc",
            "/api/task/timeout/t?workername=w1",
            "/api/task/rate-limit/t?workername=w1&ratelimit=1",
            "/api/task/abort/abc",
            "/api/task/apply/t",
            "/api/task/async-apply/t",
            "/api/task/send-task/t",
            "/api/task/retry/abc",
            "/api/tasks/bulk/revoke?state=FAILURE",
            "/api/queue/purge/q",
            "/api/queue/pause/q",
            "/api/queue/resume/q",
        ):
            assert _post(h, path) == (403, "Read only mode is enabled"), path
        # Reading the audit log is not an action; the refusals were all recorded.
        entries = h.client.get("/api/audit?action=worker.shutdown").json()["entries"]
        assert entries[0]["status"] == 403
        assert entries[0]["outcome"] == "refused"
        assert entries[0]["user"] == "anonymous"


def test_bad_arguments_are_400(harness: AppHarness) -> None:
    h = harness
    h.services.inspector._merge("stats", {"w1": {}})  # a worker Stamen has inspected
    expected = {
        "/api/worker/pool/grow/w1?n=abc": "Invalid argument 'abc' of type 'int'",
        "/api/worker/pool/grow/w1?n=-2": "Invalid argument 'n': must be between 1 and 1000",
        "/api/worker/pool/autoscale/w1?max=3": "Missing argument min",
        "/api/worker/pool/autoscale/w1?min=1": "Missing argument max",
        "/api/worker/pool/autoscale/w1?min=5&max=2": (
            "Invalid arguments: min must not be greater than max"
        ),
        "/api/worker/queue/add-consumer/w1": "Missing argument queue",
        "/api/worker/queue/cancel-consumer/w1?queue=": "Missing argument queue",
        "/api/task/revoke/abc?terminate=maybe": "Invalid argument 'maybe' of type 'bool'",
        "/api/task/revoke/abc?signal=SIGNOPE": "Invalid signal 'SIGNOPE'",
        "/api/task/timeout/t": "Missing argument workername",
        "/api/task/timeout/t?workername=w1&hard=x": "Invalid argument 'x' of type 'float'",
        "/api/task/timeout/t?workername=w1&soft=-1": (
            "Invalid argument 'soft': must be a non-negative number of seconds"
        ),
        "/api/task/rate-limit/t?workername=w1": "Missing argument ratelimit",
        "/api/tasks/bulk/revoke": "A search query or filter is required for a bulk action",
        "/api/tasks/bulk/retry?state=FAILURE&limit=0": (
            "Invalid argument 'limit': must be between 1 and 1000"
        ),
        "/api/tasks/bulk/revoke?search=ab": (
            "Substring search terms must contain at least 3 characters at position 0."
        ),
    }
    for path, message in expected.items():
        assert _post(h, path) == (400, message), path
    # Form bodies work like query strings, as in Flower's UI.
    assert _post(h, "/api/worker/pool/grow/w1", data={"n": "zz"}) == (
        400,
        "Invalid argument 'zz' of type 'int'",
    )
    assert h.client.get("/api/audit?limit=0").status_code == 400


def test_execution_bodies(harness: AppHarness) -> None:
    h = harness
    assert _post(h, "/api/task/async-apply/t", content=b"notjson") == (
        400,
        "Expecting value: line 1 column 1 (char 0)",
    )
    assert _post(h, "/api/task/apply/t", json={"args": "x"}) == (400, "args must be an array")
    assert _post(h, "/api/task/send-task/t", json=[1]) == (400, "invalid options")
    # Body parsing comes before the task lookup, the lookup before the options (Flower).
    assert _post(h, "/api/task/apply/nope.task", json={"timeout": "x"}) == (
        404,
        "Unknown task 'nope.task'",
    )
    _register_add(h)
    assert _post(h, "/api/task/apply/unit.add", json={"timeout": "x"}) == (400, "Invalid timeout")
    assert _post(h, "/api/task/async-apply/unit.add", json={"eta": "bad"}) == (
        400,
        "Invalid option",
    )
    assert _post(h, "/api/task/send-task/x", json={"countdown": "soon"}) == (
        400,
        "Invalid option",
    )
    # A call that does not fit the task says so (Flower lets Celery's TypeError be a 500).
    assert _post(h, "/api/task/async-apply/unit.add", json={"args": [1]}) == (
        400,
        "Invalid arguments: _add() missing 1 required positional argument: 'y'",
    )
    status, text = _post(h, "/api/task/apply/unit.add", json={"args": [1, 2, 3]})
    assert status == 400 and text.startswith("Invalid arguments: "), text
    # No result backend: async-apply answers the id only (Flower), apply refuses to wait.
    sent = h.client.post("/api/task/async-apply/unit.add", json={"args": [1, 2]})
    assert sent.status_code == 200
    assert list(sent.json()) == ["task-id"]
    assert _post(h, "/api/task/apply/unit.add", json={"args": [1, 2]})[0] == 503
    assert _post(h, "/api/task/abort/abc") == (503, "")


def test_unknown_workers_and_tasks_are_404(harness: AppHarness) -> None:
    h = harness
    assert _post(h, "/api/worker/shutdown/ghost@nowhere") == (
        404,
        "Unknown worker 'ghost@nowhere'",
    )
    assert _post(h, "/api/worker/pool/restart/ghost") == (404, "Unknown worker 'ghost'")
    # The worker is checked before the arguments, as in Flower.
    assert _post(h, "/api/worker/pool/grow/ghost?n=x") == (404, "Unknown worker 'ghost'")
    assert _post(h, "/api/task/timeout/nope?workername=w1") == (404, "Unknown task 'nope'")
    _register_add(h)
    assert _post(h, "/api/task/rate-limit/unit.add?workername=ghost&ratelimit=1/m") == (
        404,
        "Unknown worker 'ghost'",
    )
    assert _post(h, "/api/task/retry/nope") == (404, "Unknown task 'nope'")
    assert _post(h, "/api/queue/resume/never-paused") == (404, "Queue 'never-paused' is not paused")


def test_retry_links_and_bulk_dry_run(harness: AppHarness) -> None:
    h = harness
    h.feed(
        lifecycle("t1", name="tasks.flaky", ts=10.0, outcome="failed")
        + lifecycle("t2", name="tasks.flaky", ts=20.0, outcome="failed")
        + lifecycle("t3", name="tasks.fine", ts=30.0)
    )
    retried = h.client.post("/api/task/retry/t1")
    assert retried.status_code == 200, retried.text
    new_id = retried.json()["task-id"]
    assert retried.json()["retry-of"] == "t1"
    assert h.client.get(f"/api/task/retries/{new_id}").json() == {
        "retry_of": "t1",
        "retried_as": [],
    }
    assert h.client.get("/api/task/retries/t1").json()["retried_as"] == [new_id]

    dry = h.client.post("/api/tasks/bulk/retry?state=FAILURE&dry_run=1&limit=1").json()
    assert dry["matched"] == 2
    assert dry["count"] == 1
    assert [t["uuid"] for t in dry["sample"]] == ["t2"]
    searched = h.client.post("/api/tasks/bulk/revoke", data={"search": "flaky", "dry_run": "1"})
    assert searched.json()["matched"] == 2

    # A literal JSON cannot carry is refused with the reason, not a 500.
    h.feed(lifecycle("t4", name="tasks.sets", args="({1, 2},)"))
    refused = h.client.post("/api/task/retry/t4")
    assert refused.status_code == 400, refused.text
    assert "cannot be serialized" in refused.text

    audit = h.client.get("/api/audit?target=t1").json()["entries"]
    assert audit[0]["action"] == "task.retry"
    assert audit[0]["outcome"] == "ok"
    assert new_id in audit[0]["message"]


def test_paused_queues_are_remembered(harness: AppHarness) -> None:
    store = harness.services.actions
    assert store.resume("q") is None
    store.pause("q", "ann", ["w2", "w1"])
    store.add_paused_worker("q", "w3")
    store.add_paused_worker("other", "w3")  # not paused: ignored
    store.pause("q", "bob", ["w1"])  # pausing again keeps the workers it took it from
    assert harness.client.get("/api/queues/paused").json() == {
        "paused": {
            "q": {"paused_at": store.paused()["q"]["paused_at"], "paused_by": "bob",
                  "workers": ["w1", "w2", "w3"]}
        }
    }  # fmt: skip
    assert store.resume("q") == ["w1", "w2", "w3"]
    assert store.paused() == {}


def test_actions_are_documented_in_openapi(harness: AppHarness) -> None:
    paths = harness.client.get("/api/openapi.json").json()["paths"]
    for path in (
        "/api/worker/shutdown/{workername}",
        "/api/worker/pool/autoscale/{workername}",
        "/api/worker/queue/add-consumer/{workername}",
        "/api/task/revoke/{taskid}",
        "/api/task/rate-limit/{taskname}",
        "/api/task/apply/{taskname}",
        "/api/task/retry/{taskid}",
        "/api/tasks/bulk/revoke",
        "/api/tasks/bulk/retry",
        "/api/queue/purge/{queue}",
        "/api/queue/pause/{queue}",
        "/api/queue/resume/{queue}",
        "/api/queues/paused",
        "/api/audit",
    ):
        assert path in paths, path
    autoscale = paths["/api/worker/pool/autoscale/{workername}"]["post"]
    required = {p["name"] for p in autoscale["parameters"] if p["required"]}
    assert {"min", "max", "workername"} <= required
    bulk = {p["name"] for p in paths["/api/tasks/bulk/revoke"]["post"]["parameters"]}
    assert {"search", "dry_run", "limit", "terminate"} <= bulk
    assert "requestBody" in paths["/api/task/send-task/{taskname}"]["post"]


def test_roles_and_who_reach_the_audit_log(tmp_path: Path) -> None:
    for h in make_harness(
        tmp_path,
        unauthenticated_api=False,
        basic_auth=["ann:pw-a", "bob:pw-b"],
        admins=["ann"],
        operators=["bob"],
    ):
        bob, ann = ("bob", "pw-b"), ("ann", "pw-a")
        # An operator may act on tasks but not shut workers down.
        refused = h.client.post("/api/worker/shutdown/w1", auth=bob)
        assert refused.status_code == 403
        assert "admin" in refused.text
        assert h.client.post("/api/task/revoke/abc?signal=nope", auth=bob).status_code == 400
        # Only admins read the audit log; it names who did what.
        assert h.client.get("/api/audit", auth=bob).status_code == 403
        entries = h.client.get("/api/audit", auth=ann).json()["entries"]
        assert [(e["user"], e["action"], e["status"]) for e in entries] == [
            ("bob", "task.revoke", 400),
            ("bob", "worker.shutdown", 403),
        ]
        assert entries[0]["target"] == "abc"
        assert entries[0]["params"] == {"signal": "nope"}
