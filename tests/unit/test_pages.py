"""The HTML pages and the JSON they read, over a real store fed with Celery-shaped events."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from stamen.web import live, present, stats
from tests.factories import lifecycle, task_sent, worker_heartbeat, worker_offline, worker_online
from tests.unit.conftest import AppHarness, make_harness


def _datatable(h: AppHarness, auth: Any = None, **extra: Any) -> dict[str, Any]:
    params = {
        "draw": "3",
        "start": "0",
        "length": "10",
        "order[0][column]": "0",
        "columns[0][data]": "received",
        "order[0][dir]": "desc",
        **extra,
    }
    response = h.client.get("/tasks/datatable", params=params, auth=auth)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _feed_cluster(h: AppHarness) -> float:
    now = time.time()
    h.feed([worker_online("w1@host", now - 5), worker_heartbeat("w1@host", now - 1)])
    h.feed(lifecycle("a", ts=now - 30) + lifecycle("b", ts=now - 20, outcome="failed"))
    h.feed(lifecycle("c", ts=now - 10, parent_id="a", root_id="a"))
    h.feed([task_sent("d<x>", "tasks.<b>queued</b>", now - 5)])
    return now


def test_every_page_renders_and_escapes(harness: AppHarness) -> None:
    _feed_cluster(harness)
    for path in ("/", "/workers", "/tasks", "/task/a", "/task/b", "/charts", "/failures"):
        response = harness.client.get(path)
        assert response.status_code == 200, (path, response.text[:500])
        assert "text/html" in response.headers["content-type"]
        assert "<b>queued" not in response.text
    page = harness.client.get("/task/d%3Cx%3E")
    assert page.status_code == 200
    assert "tasks.&lt;b&gt;queued&lt;/b&gt;" in page.text
    assert "<b>queued" not in page.text
    task_b = harness.client.get("/task/b").text
    assert "KeyError" in task_b and "Traceback" in task_b
    assert harness.client.get("/workflow/c").status_code == 200
    assert 'href="/static/stamen.css?v=' in task_b
    assert harness.client.get("/static/stamen.css").status_code == 200


def test_not_found_pages_use_flower_texts(harness: AppHarness) -> None:
    missing = harness.client.get("/task/nope")
    assert missing.status_code == 404 and "Unknown task &#39;nope&#39;" in missing.text
    unknown = harness.client.get("/no/such/page")
    assert unknown.status_code == 404 and "Error, page not found" in unknown.text
    assert "<nav" in unknown.text
    assert harness.client.get("/tasks/").status_code == 404
    worker = harness.client.get("/worker/ghost@nowhere")
    assert worker.status_code == 404 and "Unknown worker &#39;ghost@nowhere&#39;" in worker.text
    broker = harness.client.get("/broker")
    assert broker.status_code == 404 and "&#39;memory&#39; broker is not supported" in broker.text


def test_workers_json_is_counters_and_workers(harness: AppHarness) -> None:
    _feed_cluster(harness)
    harness.feed([worker_online("gone@host", time.time() - 100)])
    harness.feed([worker_offline("gone@host", time.time() - 90)])
    data = harness.client.get("/workers?json=1").json()["data"]
    by_host = {w["hostname"]: w for w in data}
    w1 = by_host["w1@host"]
    assert w1["status"] is True and w1["task-received"] == 3 and w1["task-failed"] == 1
    keys = list(w1)
    assert keys[-12:] == [
        "hostname", "pid", "freq", "heartbeats", "clock", "active", "processed",
        "loadavg", "sw_ident", "sw_ver", "sw_sys", "status",
    ]  # fmt: skip
    assert by_host["gone@host"]["status"] is False


def test_purge_offline_workers(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, purge_offline_workers=30):
        h.feed([worker_online("gone@host", time.time() - 100)])
        h.feed([worker_offline("gone@host", time.time() - 90)])
        h.feed([worker_online("w1@host", time.time() - 1)])
        hosts = [w["hostname"] for w in h.client.get("/workers?json=1").json()["data"]]
        assert hosts == ["w1@host"]


def test_datatable_pages_sorts_and_searches(harness: AppHarness) -> None:
    _feed_cluster(harness)
    body = _datatable(harness)
    assert body["draw"] == 3 and body["recordsTotal"] == 4 and body["recordsFiltered"] == 4
    # Missing values sort last descending, as in Flower (d was only sent).
    assert [t["uuid"] for t in body["data"]] == ["c", "b", "a", "d<x>"]
    assert body["data"][1]["worker"] == "w1@host"
    paged = _datatable(harness, start="1", length="2", **{"order[0][dir]": "asc"})
    assert [t["uuid"] for t in paged["data"]] == ["a", "b"]
    failed = _datatable(harness, **{"search[value]": "state:FAILURE"})
    assert [t["uuid"] for t in failed["data"]] == ["b"] and failed["recordsFiltered"] == 1
    bad = _datatable(harness, **{"search[value]": "NOT x"})
    assert bad["data"] == [] and bad["recordsFiltered"] == 0 and bad["recordsTotal"] == 4
    assert bad["searchError"].startswith("NOT is not supported")
    typed = _datatable(harness, taskname="tasks.add", workername="w1@host")
    assert typed["recordsFiltered"] == 3
    missing = harness.client.get("/tasks/datatable", params={"draw": "1", "start": "0"})
    assert missing.status_code == 400 and missing.text == "Missing argument length"
    posted = harness.client.post(
        "/tasks/datatable",
        data={"draw": "1", "start": "0", "length": "1", "order[0][column]": "0"},
    )
    assert posted.status_code == 200 and len(posted.json()["data"]) == 1


def test_format_task_applies_and_fails_open(tmp_path: Path) -> None:
    def shout(task: Any) -> Any:
        task.name = task.name.upper()
        return task

    for h in make_harness(tmp_path, format_task=shout):
        h.feed(lifecycle("a", ts=time.time()))
        assert _datatable(h)["data"][0]["name"] == "TASKS.ADD"
        assert "TASKS.ADD" in h.client.get("/task/a").text
        assert h.client.get("/api/task/info/a").json()["name"] == "tasks.add"

    def broken(task: Any) -> Any:
        raise RuntimeError("boom")

    (tmp_path / "b").mkdir()
    for h in make_harness(tmp_path / "b", format_task=broken):
        h.feed(lifecycle("a", ts=time.time()))
        assert _datatable(h)["data"][0]["name"] == "tasks.add"
        assert h.client.get("/task/a").status_code == 200


def test_tasks_page_columns_and_prefill(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, tasks_columns=["state", "name", "uuid"], natural_time=True):
        page = h.client.get("/tasks?state=FAILURE&worker=w1").text
        head = page.split('<table class="data" id="tasks-table"', 1)[1].split("</thead>")[0]
        assert head.index('data-column="state"') < head.index('data-column="name"')
        assert 'data-column="runtime"' not in head
        assert 'data-default-columns="state,name,uuid"' in head
        # The column chooser offers every column: the default ones first (ticked), in order.
        menu = page.split('<ul id="columns-list"', 1)[1].split("</ul>")[0]
        offered = re.findall(r'<li data-column="([a-z_]+)"', menu)
        assert offered[:3] == ["state", "name", "uuid"]
        assert sorted(offered) == sorted(present.TASK_COLUMN_LABELS)
        assert re.findall(r'value="([a-z_]+)" checked', menu) == ["state", "name", "uuid"]
        assert 'value="state:FAILURE worker:w1"' in page
        assert 'data-time="natural-time' in page


def test_read_only_hides_actions(tmp_path: Path) -> None:
    for h in make_harness(tmp_path, read_only=True):
        h.feed(lifecycle("a", ts=time.time(), outcome="none"))
        assert "/api/task/revoke/" not in h.client.get("/task/a").text
    (tmp_path / "rw").mkdir()
    for h in make_harness(tmp_path / "rw"):
        h.feed(lifecycle("a", ts=time.time(), outcome="none"))
        assert "/api/task/revoke/a" in h.client.get("/task/a").text


def test_stats_and_live_changes(harness: AppHarness) -> None:
    now = _feed_cluster(harness)
    reader = harness.services.reader
    data = stats.chart_data(reader, "1h", now + 1)
    assert data["finished"] == 3 and len(data["times"]) == len(data["throughput"])
    assert max(v for v in data["failure_rate"] if v is not None) > 0
    assert {t["name"] for t in data["types"]} == {"tasks.add"}
    groups = stats.failure_groups(reader, "1d", now + 1)
    assert groups[0]["exception_type"] == "KeyError" and groups[0]["count"] == 1
    tree = stats.workflow(reader, "c")
    assert tree is not None and tree["root"]["uuid"] == "a"
    assert [n["uuid"] for n in tree["root"]["children"]] == ["c"]
    seq = reader.seq()
    harness.feed(lifecycle("e", ts=now))
    changed, total = reader.changed_tasks(seq, 10)
    assert [t["uuid"] for t in changed] == ["e"] and total == 1
    assert harness.client.get("/charts/data?range=15m").json()["range"] == "15m"
    assert harness.client.get("/charts/data?range=2y").status_code == 400


def test_roles_decide_which_buttons_show(tmp_path: Path) -> None:
    users = ["ann:pw1", "bob:pw2", "cy:pw3"]
    for h in make_harness(
        tmp_path, basic_auth=users, admins=["ann"], operators=["cy"], viewers=["bob"]
    ):
        h.feed(lifecycle("a", ts=time.time(), outcome="none"))
        assert h.client.get("/task/a").status_code == 401
        assert "/api/task/revoke/a" in h.client.get("/task/a", auth=("cy", "pw3")).text
        assert "/api/task/revoke/a" not in h.client.get("/task/a", auth=("bob", "pw2")).text
        assert h.client.get("/audit", auth=("bob", "pw2")).status_code == 403
        assert h.client.get("/audit", auth=("cy", "pw3")).status_code == 403
        audit = h.client.get("/audit", auth=("ann", "pw1"))
        assert audit.status_code == 200 and "No actions recorded" in audit.text
        assert 'href="/audit"' in h.client.get("/tasks", auth=("ann", "pw1")).text


def test_pages_follow_the_url_prefix(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from stamen.server import build_asgi

    for h in make_harness(tmp_path, url_prefix="flower"):
        with TestClient(build_asgi(h.services)) as client:
            page = client.get("/flower/tasks")
            assert page.status_code == 200
            assert 'href="/flower/static/stamen.css?v=' in page.text
            assert 'content="/flower"' in page.text
            assert client.get("/flower/static/stamen.js").status_code == 200
            # Flower: the prefix without its slash, or with more letters, is its 404 page;
            # outside the prefix nothing answers but a bare 404.
            for path in ("/flower", "/flowerx", "/flowerx/tasks"):
                missing = client.get(path, follow_redirects=False)
                assert missing.status_code == 404, path
                assert "Error, page not found" in missing.text, path
                assert 'href="/flower/static/stamen.css?v=' in missing.text, path
            outside = client.get("/tasks")
            assert outside.status_code == 404 and "Error, page not found" not in outside.text


def test_live_hub_fans_out_coalesced_changes(harness: AppHarness) -> None:
    import asyncio

    import orjson

    now = _feed_cluster(harness)
    reader = harness.services.reader

    async def scenario() -> list[tuple[str, Any]]:
        hub = live.LiveHub(reader, lambda: [{"hostname": "w1@host"}], interval=0.05)
        queue = hub.subscribe()
        await asyncio.sleep(0.2)
        for n in range(50):
            harness.services.ingester.add(lifecycle(f"x{n}", ts=now)[0])
        await asyncio.to_thread(harness.services.ingester.flush)
        got = []
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline:
            try:
                raw = await asyncio.wait_for(queue.get(), 0.5)
            except asyncio.TimeoutError:
                continue
            kind = raw.split(b"\n", 1)[0].split(b": ", 1)[1].decode()
            got.append((kind, orjson.loads(raw.split(b"data: ", 1)[1])))
            if kind == "tasks":
                break
        hub.unsubscribe(queue)
        return got

    messages = asyncio.run(scenario())
    kinds = [k for k, _ in messages]
    assert kinds[0] == "workers" and kinds[-1] == "tasks"
    tasks = messages[-1][1]
    assert tasks["changed"] == 50 and len(tasks["tasks"]) == 50
    assert {t["uuid"] for t in tasks["tasks"]} == {f"x{n}" for n in range(50)}


def test_live_hub_sends_new_names_once_and_to_late_subscribers(harness: AppHarness) -> None:
    import asyncio

    import orjson

    now = _feed_cluster(harness)
    reader = harness.services.reader

    async def next_names(queue: asyncio.Queue[bytes]) -> dict[str, Any]:
        while True:
            raw = await asyncio.wait_for(queue.get(), 5)
            if raw.startswith(b"event: names\n"):
                return orjson.loads(raw.split(b"data: ", 1)[1])  # type: ignore[no-any-return]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]:
        hub = live.LiveHub(reader, lambda: [], interval=0.02, workers_interval=0.05)
        first = hub.subscribe()
        initial = await next_names(first)
        harness.feed(lifecycle("n1", name="tasks.brand_new", ts=now))
        grown = await next_names(first)
        # Another change with no new name sends no names message.
        harness.feed(lifecycle("n2", name="tasks.brand_new", ts=now))
        sent = hub.messages_sent
        while hub.messages_sent == sent:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        repeats = 0
        while not first.empty():
            repeats += first.get_nowait().startswith(b"event: names\n")
        late = hub.subscribe()
        replayed = await next_names(late)
        hub.unsubscribe(first)
        hub.unsubscribe(late)
        return initial, grown, replayed, repeats

    initial, grown, replayed, repeats = asyncio.run(scenario())
    assert initial["types"] == ["tasks.<b>queued</b>", "tasks.add"]
    assert "SUCCESS" in initial["states"]
    assert grown["types"] == ["tasks.<b>queued</b>", "tasks.add", "tasks.brand_new"]
    assert repeats == 0
    assert replayed == grown


def test_tasks_filters_and_failure_retry_follow_the_role(tmp_path: Path) -> None:
    users = ["ann:pw1", "bob:pw2"]
    for h in make_harness(tmp_path, basic_auth=users, operators=["ann"], viewers=["bob"]):
        _feed_cluster(h)
        tasks = h.client.get("/tasks", auth=("bob", "pw2")).text
        assert '<select id="filter-state">' in tasks and "<option>FAILURE</option>" in tasks
        assert "<option>w1@host</option>" in tasks and "<option>tasks.add</option>" in tasks
        assert "data-retry-group" not in h.client.get("/failures", auth=("bob", "pw2")).text
        failures = h.client.get("/failures?range=1h", auth=("ann", "pw1")).text
        assert 'data-retry-group data-taskname="tasks.add"' in failures
        assert 'data-since="' in failures
        # The exact state filter reaches the datatable (and the bulk selection).
        rows = _datatable(h, auth=("bob", "pw2"), state="FAILURE")["data"]
        assert [t["uuid"] for t in rows] == ["b"]


def test_worker_page_shows_live_counters_running_tasks_and_offline(harness: AppHarness) -> None:
    now = time.time()
    harness.feed([worker_online("w1@host", now - 5), worker_heartbeat("w1@host", now - 1)])
    harness.feed(lifecycle("done", ts=now - 4) + lifecycle("running", ts=now - 2, outcome="none"))
    # What an inspection would have cached (the harness has no worker to ask).
    inspector = harness.services.inspector
    for method in inspector.WORKER_METHODS:
        reply = {"pid": 42, "pool": {}} if method == "stats" else []
        inspector._merge(method, {"w1@host": reply})
    page = harness.client.get("/worker/w1@host")
    assert page.status_code == 200, page.text[:300]
    html = page.text
    assert 'id="worker-status">Online<' in html
    assert 'id="worker-offline" role="status" hidden' in html
    assert 'id="live-received">2<' in html and 'id="live-succeeded">1<' in html
    assert 'data-uuid="running"' in html and 'data-uuid="done"' not in html
    assert 'src="/static/worker.js?v=' in html

    harness.feed([worker_offline("w1@host", now)])
    html = harness.client.get("/worker/w1@host").text
    assert 'id="worker-status">Offline<' in html
    assert 'id="worker-offline" role="status">' in html


def _pager_links(html: str) -> dict[str, str]:
    """The audit pager's links by label, unescaped."""
    import html as html_lib

    pager = html.split('<div class="pager">', 1)[1].split("</div>", 1)[0]
    return {
        label: html_lib.unescape(href)
        for href, label in re.findall(r'<a class="button" href="([^"]*)">(\w+)</a>', pager)
    }


def test_audit_paging_keeps_the_filters(harness: AppHarness) -> None:
    from urllib.parse import parse_qs

    actions = harness.services.actions
    for n in range(230):
        who = "ann" if n % 2 else "bob & co"
        actions.record(user=who, action="task.revoke", target=f"t{n}", params={}, status=200)
    actions.record(user="ann", action="worker.shutdown", target="w", params={}, status=200)
    page = harness.client.get("/audit", params={"user": "bob & co", "action": "task.revoke"})
    assert page.status_code == 200
    links = _pager_links(page.text)
    assert set(links) == {"Older"}  # 115 of bob's: one more page, and nothing newer
    older = parse_qs(links["Older"].lstrip("?"))
    assert older == {"user": ["bob & co"], "action": ["task.revoke"], "offset": ["100"]}
    second = harness.client.get("/audit" + links["Older"])
    assert second.status_code == 200
    assert second.text.count("<code>task.revoke</code>") == 15
    assert ">ann<" not in second.text
    links = _pager_links(second.text)
    assert set(links) == {"Newer"}
    newer = parse_qs(links["Newer"].lstrip("?"))
    assert newer == {"user": ["bob & co"], "action": ["task.revoke"], "offset": ["0"]}
    # No filters: the links carry the offset alone.
    assert _pager_links(harness.client.get("/audit?offset=100").text) == {
        "Newer": "?offset=0",
        "Older": "?offset=200",
    }


def test_log_out_shows_only_for_login_sessions(tmp_path: Path) -> None:
    """A browser keeps sending Basic credentials (and a bearer token is the client's), so
    only a login cookie can be logged out of; Flower shows the link for OAuth only."""
    from stamen.web.auth import sign_value

    for h in make_harness(tmp_path, basic_auth=["ann:pw1"], api_tokens=["ci:tok-123"]):
        basic = h.client.get("/tasks", auth=("ann", "pw1")).text
        assert '<span class="user" title="Signed in">ann</span>' in basic
        assert "Log out" not in basic and 'href="/logout"' not in basic
        token = h.client.get("/tasks", headers={"Authorization": "Bearer tok-123"})
        assert token.status_code == 200 and "Log out" not in token.text
    (tmp_path / "oauth").mkdir()
    for h in make_harness(tmp_path / "oauth", auth=".*@corp.com"):
        h.client.cookies.set(
            "user", sign_value(h.services.settings.cookie_secret, "user", "me@corp.com")
        )
        session = h.client.get("/tasks")
        assert session.status_code == 200
        assert '<span class="user" title="Signed in">me@corp.com</span>' in session.text
        assert '<a class="logout" href="/logout">Log out</a>' in session.text
    (tmp_path / "open").mkdir()
    for h in make_harness(tmp_path / "open"):
        assert "Log out" not in h.client.get("/tasks").text
