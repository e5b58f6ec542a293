"""Pages that follow the cluster over the live stream: filters learn new names, the worker
page follows its worker's tasks and notices when it goes away, all without a reload."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

from tests.browser.conftest import SpareWorker, WatchedPage, wait_online
from tests.integration.conftest import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.integration]

HAS_OPTION = "([id, name]) => [...document.getElementById(id).options].some(o => o.value === name)"


def _open_live(page: WatchedPage, url: str) -> None:
    page.page.goto(url, wait_until="load")
    page.page.wait_for_selector("#live-status[data-state=live]", timeout=15_000)
    page.page.evaluate("window.__sameDocument = true")


def _same_document(page: WatchedPage) -> bool:
    return bool(page.page.evaluate("window.__sameDocument === true"))


def test_filters_learn_new_task_types_and_workers_without_reload(
    page: WatchedPage, redis_cluster: Any, spare_workers: Callable[[], SpareWorker]
) -> None:
    c = redis_cluster
    _open_live(page, c.stamen.url + "/tasks")
    spare = spare_workers()
    unseen = f"pages.unseen_{uuid.uuid4().hex[:8]}"
    assert not page.page.evaluate(HAS_OPTION, ["filter-type", unseen])
    assert not page.page.evaluate(HAS_OPTION, ["filter-worker", spare.hostname])

    page.page.wait_for_function(HAS_OPTION, arg=["filter-worker", spare.hostname], timeout=60_000)
    # The spare worker discards a task it does not know; the task-sent event names the type.
    c.client.send_task(unseen, queue=spare.queue)
    page.page.wait_for_function(HAS_OPTION, arg=["filter-type", unseen], timeout=20_000)
    assert _same_document(page), "the page reloaded"

    # The new entries filter like the others.
    page.page.select_option("#filter-type", unseen)
    names = page.page.locator("#tasks-body td[data-col=name]")
    wait_until(lambda: set(names.all_inner_texts()) == {unseen}, timeout=10, what="type filter")
    page.page.select_option("#filter-state", "SUCCESS")
    page.page.wait_for_selector("#tasks-body tr.empty", timeout=10_000)
    page.shot("tasks-filters-live")
    assert page.errors == []


def test_worker_page_follows_its_worker_until_it_goes_offline(
    page: WatchedPage, redis_cluster: Any, spare_workers: Callable[[], SpareWorker]
) -> None:
    c = redis_cluster
    spare = spare_workers()
    wait_online(c, spare)
    _open_live(page, c.stamen.url + f"/worker/{quote(spare.hostname, safe='')}")
    assert page.page.inner_text("#worker-status") == "Online"
    assert page.page.locator("#worker-offline").is_hidden()
    assert page.page.inner_text("#live-succeeded") == "0"

    result = c.client.send_task("itest.sleep", args=(2.5,), queue=spare.queue)
    running = page.page.locator(f'#running-body tr[data-uuid="{result.id}"]')
    running.wait_for(timeout=20_000)
    assert "itest.sleep" in running.inner_text()
    page.shot("worker-live-running")
    running.wait_for(state="detached", timeout=20_000)
    page.page.wait_for_selector("#live-succeeded:text-is('1')", timeout=10_000)
    assert page.page.inner_text("#live-received") == "1"

    spare.worker.stop()
    page.page.wait_for_selector("#worker-status:text-is('Offline')", timeout=20_000)
    assert page.page.locator("#worker-offline").is_visible()
    assert _same_document(page), "the page reloaded"
    page.shot("worker-live-offline")
    assert page.errors == []
