"""The pages in a real browser: they render cleanly, update live, search and draw charts."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import pytest

from tests.browser.conftest import WatchedPage
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def _open(page: WatchedPage, url: str) -> Any:
    response = page.page.goto(url, wait_until="load")
    page.page.wait_for_timeout(300)  # let page scripts run their first fetch
    return response


def test_every_page_renders_without_console_errors(page: WatchedPage, redis_cluster: Any) -> None:
    c = redis_cluster
    ok = c.send("itest.add", 2, 3)
    bad = c.send("itest.fail", "browser")
    c.wait_state(ok, "SUCCESS")
    c.wait_state(bad, "FAILURE")
    base = c.stamen.url
    pages = {
        "workers": "/",
        "workers-list": "/workers",
        "worker": f"/worker/{quote(c.worker.hostname, safe='')}",
        "tasks": "/tasks",
        "task-success": f"/task/{ok}",
        "task-failure": f"/task/{bad}",
        "workflow": f"/workflow/{ok}",
        "broker": "/broker",
        "charts": "/charts",
        "failures": "/failures",
    }
    for name, path in pages.items():
        response = _open(page, base + path)
        assert response.status == 200, (path, response.status)
        assert page.page.locator("main h1").count() >= 1, path
        page.shot(name)
        assert page.errors == [], (path, page.errors)
    assert "KeyError" in page.page.inner_text("main")  # the failures page, seen last
    outside = [url for url in page.requested if not url.startswith(base + "/")]
    assert outside == [], "pages must make no external requests"
    _open(page, base + f"/task/{bad}")
    assert page.page.locator("text=Traceback").count() >= 1
    response = _open(page, base + "/no/such/page")
    assert response.status == 404
    assert "Error, page not found" in page.page.inner_text("main")
    page.shot("not-found")


def test_new_task_appears_and_finishes_without_reload(
    page: WatchedPage, redis_cluster: Any
) -> None:
    c = redis_cluster
    _open(page, c.stamen.url + "/tasks")
    page.page.wait_for_selector("#live-status[data-state=live]", timeout=15_000)
    page.page.evaluate("window.__sameDocument = true")
    task_id = c.send("itest.sleep", 1.5)
    row = page.page.locator(f'tr[data-uuid="{task_id}"]')
    row.wait_for(timeout=15_000)
    page.shot("tasks-live-new")
    page.page.wait_for_selector(f'tr[data-uuid="{task_id}"][data-state="SUCCESS"]', timeout=20_000)
    assert page.page.evaluate("window.__sameDocument === true"), "the page reloaded"
    assert "SUCCESS" in row.inner_text()
    page.shot("tasks-live-success")
    assert page.errors == []


def test_search_narrows_the_list_and_reports_bad_queries(
    page: WatchedPage, redis_cluster: Any
) -> None:
    c = redis_cluster
    needle = f"needle{uuid.uuid4().hex[:10]}"
    wanted = c.send("itest.echo", needle)
    for _ in range(3):
        c.send("itest.add", 1, 1)
    c.wait_state(wanted, "SUCCESS")
    _open(page, c.stamen.url + "/tasks")
    page.page.wait_for_selector("#tasks-body tr[data-uuid]")
    before = page.page.locator("#tasks-body tr[data-uuid]").count()
    assert before > 1
    page.page.fill("#task-search", f"args:{needle}")
    wait_until(
        lambda: page.page.locator("#tasks-body tr[data-uuid]").count() == 1,
        timeout=10,
        what="search to narrow the list",
    )
    assert page.page.locator(f'tr[data-uuid="{wanted}"]').count() == 1
    assert "match" in page.page.inner_text("#tasks-summary")
    page.shot("tasks-search")
    page.page.fill("#task-search", "NOT broken")
    page.page.wait_for_selector("#search-error:not([hidden])", timeout=10_000)
    assert "NOT is not supported" in page.page.inner_text("#search-error")
    page.shot("tasks-search-error")
    assert page.errors == []


def test_charts_draw_with_data(page: WatchedPage, redis_cluster: Any) -> None:
    c = redis_cluster
    ids = [c.send("itest.add", i, i) for i in range(5)] + [c.send("itest.fail", "chart")]
    for task_id in ids[:-1]:
        c.wait_state(task_id, "SUCCESS")
    c.wait_state(ids[-1], "FAILURE")
    _open(page, c.stamen.url + "/charts")
    page.page.wait_for_selector("body[data-charts-ready=true]", timeout=15_000)
    for chart in ("throughput", "failures", "runtime"):
        assert page.page.locator(f"#chart-{chart} canvas").count() == 1, chart
    note = page.page.inner_text("#charts-note")
    assert not note.startswith("0 "), note
    assert page.page.locator("#types-table tbody tr").filter(has_text="itest.add").count() == 1
    page.page.click("button[data-range='15m']")
    page.page.wait_for_timeout(500)
    page.shot("charts")
    assert page.errors == []


def test_task_page_and_workflow_follow_the_task(page: WatchedPage, redis_cluster: Any) -> None:
    c = redis_cluster
    task_id = c.send("itest.sleep", 1.5)
    c.wait_state(task_id, "STARTED")
    _open(page, c.stamen.url + f"/task/{task_id}")
    page.page.wait_for_selector("#live-status[data-state=live]", timeout=15_000)
    page.page.evaluate("window.__sameDocument = true")
    page.page.wait_for_selector("#task-state:has-text('SUCCESS')", timeout=20_000)
    # The details were swapped in place: the runtime now shows, and nothing reloaded.
    page.page.wait_for_selector("dt:has-text('Runtime')", timeout=10_000)
    assert page.page.evaluate("window.__sameDocument === true"), "the page reloaded"
    page.shot("task-live-success")

    first = c.client.signature("itest.add", args=(1, 2), queue=c.queue)
    second = c.client.signature("itest.add", args=(3,), queue=c.queue)
    last = (first | second).apply_async()
    c.wait_state(str(last.id), "SUCCESS")
    _open(page, c.stamen.url + f"/workflow/{last.id}")
    nodes = page.page.locator("#workflow-tree a.node")
    assert nodes.count() == 2
    assert page.page.locator("#workflow-tree a.node.current").count() == 1
    page.shot("workflow-chain")
    assert page.errors == []


def test_buttons_call_the_control_api_and_are_audited(
    page: WatchedPage, redis_cluster: Any
) -> None:
    c = redis_cluster
    page.page.on("dialog", lambda dialog: dialog.accept())
    _open(page, c.stamen.url + f"/worker/{quote(c.worker.hostname, safe='')}")
    page.page.click("button:has-text('Refresh')")
    page.page.wait_for_selector(".toast:has-text('Refreshed')", timeout=15_000)

    task_id = c.send("itest.add", 5, 5, options={"countdown": 4})
    c.wait_state(task_id, "RECEIVED")
    _open(page, c.stamen.url + f"/task/{task_id}")
    page.page.click("button:has-text('Revoke')")
    page.page.wait_for_selector(".toast:not(.error)", timeout=15_000)
    page.shot("task-revoke-toast")
    c.wait_state(task_id, "REVOKED", timeout=30)
    _open(page, c.stamen.url + "/audit")
    assert task_id in page.page.inner_text("main")
    page.shot("audit")
    assert page.errors == []


def test_api_docs_render_from_vendored_swagger_ui(page: WatchedPage, redis_cluster: Any) -> None:
    base = redis_cluster.stamen.url
    response = _open(page, base + "/api/docs")
    assert response.status == 200
    operations = page.page.locator(".opblock")
    operations.first.wait_for(timeout=15_000)
    schema = redis_cluster.stamen.get("/api/openapi.json").json()
    listed = sum(len(methods) for methods in schema["paths"].values())
    assert operations.count() == listed > 20  # every operation of the API
    assert page.page.get_by_text("/api/tasks", exact=True).count() >= 1
    page.shot("api-docs")
    assert page.errors == []
    outside = [url for url in page.requested if not url.startswith(base + "/")]
    assert outside == [], "the API reference must make no external requests"


def test_received_filters_read_the_time_the_table_shows(
    browser: Any, screenshots_dir: Any, redis_cluster: Any
) -> None:
    """A browser far from the server's zone: typing the received time a row shows keeps
    that row (the filter is read in the table's zone, and sent as epoch seconds)."""
    c = redis_cluster
    task_id = c.send("itest.add", 7, 7)
    c.wait_state(task_id, "SUCCESS")
    context = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id="Asia/Tokyo")
    try:
        page = WatchedPage(context.new_page(), screenshots_dir)
        _open(page, c.stamen.url + "/tasks")
        page.page.fill("#task-search", task_id)
        row = page.page.locator(f'tr[data-uuid="{task_id}"]')
        row.wait_for(timeout=15_000)
        shown = row.locator('[data-cell="received"]').inner_text()  # "YYYY-MM-DD HH:MM:SS.mmm"
        minute = shown[:10] + "T" + shown[11:16]
        with page.page.expect_response(lambda r: "received_start=" in r.url):
            page.page.fill("#filter-from", minute)
            page.page.dispatch_event("#filter-from", "change")
        # The search alone matches the one task; a filter read in another zone than the
        # table shows would drop it (Tokyo's wall time read as UTC lies 9 h ahead).
        # ("1 task" alone in the store, else "1 of N tasks match".)
        page.page.wait_for_function(
            "/^1 (task$|of )/.test(document.getElementById('tasks-summary').textContent)"
        )
        assert row.count() == 1, "the task received in that minute was filtered out"
        with page.page.expect_response(lambda r: "received_end=" in r.url):
            page.page.fill("#filter-to", minute)
            page.page.dispatch_event("#filter-to", "change")
        row.wait_for(state="detached")  # to is that minute's start, before the task came
        assert page.page.inner_text("#tasks-summary").startswith("0 "), "the summary disagrees"
        page.shot("tasks-received-filter")
        assert page.errors == []
    finally:
        context.close()


def test_broker_graph_shows_the_last_ten_minutes_from_the_first_point(
    page: WatchedPage, redis_cluster: Any
) -> None:
    """One point is not drawn on an axis of years: the x scale is the caption's 10 minutes
    from the first point on."""
    c = redis_cluster
    page.page.goto(c.stamen.url + "/broker", wait_until="load")
    page.page.wait_for_selector("#queue-chart[data-points='1'] canvas", timeout=15_000)
    span = page.page.evaluate(
        "(() => { const u = document.getElementById('queue-chart').uplot;"
        " return [u.scales.x.min, u.scales.x.max, u.data[0][0]]; })()"
    )
    low, high, first = span
    assert low <= first <= high, span
    assert 540 <= high - low <= 660, f"x axis spans {high - low:.0f} s"
    assert "10 minutes" in page.page.inner_text(".queue-graph figcaption")
    page.shot("broker-graph-first-point")
    assert page.errors == []
