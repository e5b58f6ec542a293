"""Action buttons in a real browser: queue pause, resume and purge on the broker page take
effect on the broker and the worker; a viewer gets none of the buttons an admin gets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.browser.conftest import SpareWorker, WatchedPage, wait_online
from tests.integration.conftest import Cluster, StamenProcess, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.integration]

#: Everything on a page that changes the cluster (the worker page's Refresh only reads).
ACTIONS = (
    "main button[data-post], main form[data-action-form] button, main [data-bulk], "
    "main [data-bulk-matching], main [data-retry-group], main #select-all"
)


def _waiting(c: Cluster, queue: str) -> int | None:
    """Messages waiting in ``queue`` as ``/api/queues/length`` reports them."""
    for q in c.stamen.get("/api/queues/length").json()["active_queues"]:
        if q["name"] == queue:
            return int(q["messages"])
    return None


def _press(page: WatchedPage, queue: str, label: str, toast: str) -> None:
    row = page.page.locator(f'tr[data-queue="{queue}"]')
    row.locator(f"button:text-is('{label}')").click()
    page.page.wait_for_selector(f".toast:not(.error):has-text('{toast}')", timeout=15_000)


def test_broker_page_pauses_resumes_and_purges_a_queue(
    page: WatchedPage, redis_cluster: Any, spare_workers: Callable[[], SpareWorker]
) -> None:
    c = redis_cluster
    spare = spare_workers()
    wait_online(c, spare)
    dialogs: list[str] = []
    page.page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    page.page.goto(c.stamen.url + "/broker", wait_until="load")
    row = page.page.locator(f'tr[data-queue="{spare.queue}"]')
    assert row.get_attribute("data-paused") == "false"

    # Pause: the page says so, and a task sent to the queue waits there.
    _press(page, spare.queue, "Pause", "Paused queue")
    assert dialogs and spare.queue in dialogs[-1]
    page.page.wait_for_selector(f'tr[data-queue="{spare.queue}"][data-paused=true]')
    assert row.locator(".badge:text-is('Paused')").count() == 1
    page.shot("broker-paused")
    waiting = c.client.send_task("itest.add", args=(20, 22), queue=spare.queue)
    wait_until(lambda: _waiting(c, spare.queue) == 1, timeout=15, what="the task to wait")
    assert c.wait_state(str(waiting.id), "PENDING")

    # Resume: the worker consumes the queue again and runs the task.
    _press(page, spare.queue, "Resume", "Resumed queue")
    page.page.wait_for_selector(f'tr[data-queue="{spare.queue}"][data-paused=false]')
    c.wait_state(str(waiting.id), "SUCCESS")
    assert waiting.get(timeout=10) == 42
    assert _waiting(c, spare.queue) == 0

    # Purge (after its confirmation) drops what waits in a paused queue.
    _press(page, spare.queue, "Pause", "Paused queue")
    page.page.wait_for_selector(f'tr[data-queue="{spare.queue}"][data-paused=true]')
    doomed = [
        str(c.client.send_task("itest.add", args=(n, n), queue=spare.queue).id) for n in range(3)
    ]
    wait_until(lambda: _waiting(c, spare.queue) == 3, timeout=15, what="3 tasks to wait")
    # The page follows the queue by itself: the table and the graph.
    page.page.evaluate("window.__sameDocument = true")
    messages = f'tr[data-queue="{spare.queue}"] [data-cell=messages]'
    page.page.wait_for_selector(f"{messages}:text-is('3')", timeout=15_000)
    assert page.page.evaluate("window.__sameDocument === true"), "the page reloaded"
    assert int(page.page.get_attribute("#queue-chart", "data-points") or 0) >= 2
    assert page.page.locator("#queue-chart canvas").count() == 1
    page.shot("broker-graph")
    before = len(dialogs)
    _press(page, spare.queue, "Purge", "Purged 3 messages")
    assert len(dialogs) == before + 1 and "Delete every message" in dialogs[-1]
    wait_until(lambda: _waiting(c, spare.queue) == 0, timeout=15, what="the queue to empty")
    _press(page, spare.queue, "Resume", "Resumed queue")
    page.shot("broker-resumed")
    check = c.client.send_task("itest.add", args=(1, 1), queue=spare.queue)
    c.wait_state(str(check.id), "SUCCESS")
    assert all(c.task(t)["state"] == "PENDING" for t in doomed)  # type: ignore[index]
    assert page.errors == []


@pytest.fixture(scope="module")
def roles_stamen(redis_cluster: Cluster, logs_dir: Path) -> Iterator[StamenProcess]:
    """A second Stamen on the session's cluster with an admin and a viewer."""
    args = [
        "-A", "tests.integration.celeryapp", "--basic_auth=boss:pw-boss,watcher:pw-watch",
        "--admins=boss", "--viewers=watcher",
    ]  # fmt: skip
    stamen = StamenProcess(args, redis_cluster.env).start(logs_dir / "stamen-roles.log")
    try:
        yield stamen
    finally:
        stamen.stop()


def _enter_in_the_limits_forms(page: WatchedPage) -> None:
    """A viewer's Limits forms have no button; Enter in their fields must do nothing (it
    used to throw reading the missing submit button's dataset)."""
    page.page.evaluate("window.__sameDocument = true")
    page.page.click("a[data-tab=tab-limits]")
    for field, value in (("ratelimit", "5/m"), ("seconds", "3")):
        box = page.page.locator(f"#tab-limits input[name={field}]").first
        box.fill(value)
        box.press("Enter")
    # A round trip through the page: an error the key press raised has been reported.
    assert page.page.evaluate("window.__sameDocument === true"), "the form was submitted"
    assert page.errors == []
    sent = [u for u in page.requested if "/api/task/" in u or "ratelimit=" in u]
    assert sent == [], "a viewer's Enter sent something"
    assert page.page.locator(".toast").count() == 0


def test_a_viewer_sees_no_action_buttons_where_an_admin_does(
    browser: Any, screenshots_dir: Path, redis_cluster: Cluster, roles_stamen: StamenProcess
) -> None:
    c = redis_cluster
    admin = ("boss", "pw-boss")
    # This Stamen has seen nothing yet: give it a failure (task, tasks, failures pages).
    failed = c.send("itest.fail", "roles")
    wait_until(
        lambda: (
            httpx.get(f"{roles_stamen.url}/api/task/info/{failed}", auth=admin, timeout=5)
            .json()
            .get("state")
            == "FAILURE"
        ),
        timeout=30,
        what="the failure in the second stamen",
    )
    wait_until(
        lambda: (
            c.worker.hostname in httpx.get(f"{roles_stamen.url}/api/workers", auth=admin).json()
        ),
        timeout=30,
        what="the worker inspected",
    )
    paths = {
        "worker": f"/worker/{quote(c.worker.hostname, safe='')}",
        "task": f"/task/{failed}",
        "broker": "/broker",
        "tasks": "/tasks",
        "failures": "/failures",
    }
    for user, password in (admin, ("watcher", "pw-watch")):
        context = browser.new_context(
            viewport={"width": 1280, "height": 900},
            http_credentials={"username": user, "password": password},
        )
        try:
            page = WatchedPage(context.new_page(), screenshots_dir)
            for name, path in paths.items():
                response = page.page.goto(roles_stamen.url + path, wait_until="load")
                assert response is not None and response.status == 200, (user, path)
                # Every action button is in the server-rendered page, scripts add none.
                buttons = page.page.locator(ACTIONS).count()
                if user == "boss":
                    assert buttons > 0, (user, path)
                else:
                    assert buttons == 0, (user, path, page.page.locator(ACTIONS).all_inner_texts())
                page.shot(f"roles-{user}-{name}")
                if name == "worker" and user != "boss":
                    _enter_in_the_limits_forms(page)
            audit_links = page.page.locator("nav a[href$='/audit']").count()
            assert audit_links == (1 if user == "boss" else 0), user
            assert page.errors == [], (user, page.errors)
        finally:
            context.close()


def test_failures_page_retries_a_group_after_a_dry_run(
    page: WatchedPage, redis_cluster: Cluster
) -> None:
    c = redis_cluster
    failed = [c.send("itest.fail", f"group {n}") for n in range(2)]
    for task_id in failed:
        c.wait_state(task_id, "FAILURE")
    page.page.goto(c.stamen.url + "/failures?range=15m", wait_until="load")
    retry = page.page.locator("tr:has(a:text-is('itest.fail')) button[data-retry-group]")
    asked: list[str] = []

    def ask(accept: bool) -> str:
        """Click, answer the question the dry run leads to, and return it."""
        page.page.once(
            "dialog", lambda d: (asked.append(d.message), d.accept() if accept else d.dismiss())
        )
        before = len(asked)
        retry.click()
        for _ in range(150):  # Playwright delivers the dialog only while it is called
            if len(asked) > before:
                return asked[-1]
            page.page.wait_for_timeout(100)
        raise AssertionError("the dry run asked nothing")

    # The dry run asks first; declining sends nothing.
    question = ask(accept=False)
    assert question.startswith("Retry ") and "failed itest.fail task(s) received since" in question
    links = [c.stamen.get(f"/api/task/retries/{t}").json() for t in failed]
    assert all(link["retried_as"] == [] for link in links)

    ask(accept=True)
    page.page.wait_for_selector(".toast:not(.error):has-text('Retried')", timeout=15_000)
    for task_id in failed:
        wait_until(
            lambda t=task_id: c.stamen.get(f"/api/task/retries/{t}").json()["retried_as"],
            timeout=15,
            what=f"a retry of {task_id}",
        )
    page.shot("failures-retried")
    assert page.errors == []
