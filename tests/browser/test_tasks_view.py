"""The tasks table's view in a real browser: columns chosen, dragged and remembered, the
search remembered, and a selection that never includes rows the user cannot see."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.browser.conftest import WatchedPage

pytestmark = [pytest.mark.browser, pytest.mark.integration]

DEFAULT = ["name", "uuid", "state", "received", "runtime", "worker"]
HEADER = "ths => ths.map((th) => th.dataset.column)"


def _header(page: WatchedPage) -> list[str]:
    return page.page.eval_on_selector_all("#tasks-table thead th[data-column]", HEADER)  # type: ignore[no-any-return]


def _wait_header(page: WatchedPage, expected: list[str]) -> None:
    page.page.wait_for_function(
        "(want) => JSON.stringify([...document.querySelectorAll("
        "'#tasks-table thead th[data-column]')].map((th) => th.dataset.column))"
        " === JSON.stringify(want)",
        arg=expected,
        timeout=10_000,
    )


def _wait_cells(page: WatchedPage, task_id: str, expected: list[str]) -> None:
    """Until the task's row has its cells in ``expected``'s order."""
    page.page.wait_for_function(
        '([id, want]) => { const tr = document.querySelector(`tr[data-uuid="${id}"]`);'
        " return !!tr && JSON.stringify([...tr.querySelectorAll('td[data-col]')]"
        ".map((td) => td.dataset.col)) === JSON.stringify(want); }",
        arg=[task_id, expected],
        timeout=10_000,
    )


def _datatable_query(request: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(request.url).query, keep_blank_values=True)


def _shown_columns(query: dict[str, list[str]]) -> list[str]:
    out, i = [], 0
    while f"columns[{i}][data]" in query:
        out.append(query[f"columns[{i}][data]"][0])
        i += 1
    return out


def test_columns_are_chosen_dragged_and_remembered(page: WatchedPage, redis_cluster: Any) -> None:
    c = redis_cluster
    task_id = c.send("itest.add", 3, 4)
    c.wait_state(task_id, "SUCCESS")
    p = page.page
    p.goto(c.stamen.url + "/tasks", wait_until="load")
    p.wait_for_selector("#tasks-body tr[data-uuid]")
    assert _header(page) == DEFAULT
    p.fill("#task-search", task_id)
    _wait_cells(page, task_id, DEFAULT)
    p.wait_for_selector("#tasks-body tr[data-uuid]:only-child")

    # Every column Flower allows is offered, the default ones ticked.
    p.click("#columns-menu summary")
    items = p.locator("#columns-list li")
    assert items.count() == 17
    ticked = p.eval_on_selector_all(
        "#columns-list input:checked", "boxes => boxes.map((b) => b.value)"
    )
    assert ticked == DEFAULT
    page.shot("tasks-columns-menu")

    # Sort by runtime, then hide it: the sort falls back to received.
    p.click("#columns-menu summary")
    with p.expect_request(
        lambda r: "order%5B0%5D%5Bdir%5D=desc" in r.url and "/datatable" in r.url
    ):
        p.click("th[data-column=runtime] button.sort")
    assert p.get_attribute("th[data-column=runtime]", "aria-sort") == "descending"
    p.click("#columns-menu summary")
    with p.expect_request(lambda r: "/tasks/datatable" in r.url) as hidden:
        p.uncheck("#columns-list input[value=runtime]")
    query = _datatable_query(hidden.value)
    assert _shown_columns(query) == ["name", "uuid", "state", "received", "worker"]
    assert query["order[0][column]"] == ["3"]  # received
    assert p.get_attribute("th[data-column=received]", "aria-sort") == "descending"

    # Show the result (it comes last), then drag the worker header onto the name's left half.
    p.check("#columns-list input[value=result]")
    _wait_header(page, ["name", "uuid", "state", "received", "worker", "result"])
    p.click("#columns-menu summary")  # closed: the headers are free to drag
    with p.expect_request(lambda r: "/tasks/datatable" in r.url) as dragged:
        p.locator("th[data-column=worker]").drag_to(
            p.locator("th[data-column=name]"), target_position={"x": 3, "y": 8}
        )
    expected = ["worker", "name", "uuid", "state", "received", "result"]
    assert _header(page) == expected
    assert _shown_columns(_datatable_query(dragged.value)) == expected
    assert _datatable_query(dragged.value)["order[0][column]"] == ["4"]  # still received
    _wait_cells(page, task_id, expected)
    assert p.locator(f'tr[data-uuid="{task_id}"] td[data-col=result]').inner_text() == "7"

    # The keyboard way: the menu's arrows; the focus stays on the moved column's button.
    p.click("#columns-menu summary")
    p.focus("#columns-list li[data-column=result] button[data-move='-1']")
    p.keyboard.press("Enter")
    expected = ["worker", "name", "uuid", "state", "result", "received"]
    _wait_header(page, expected)
    focused = p.evaluate(
        "[document.activeElement.closest('li').dataset.column, document.activeElement.dataset.move]"
    )
    assert focused == ["result", "-1"]
    assert "moved to position 5 of 6" in p.inner_text("#columns-status")
    _wait_cells(page, task_id, expected)
    page.shot("tasks-columns-chosen")

    # A reload keeps the columns, their order and the search.
    p.reload(wait_until="load")
    _wait_cells(page, task_id, expected)
    assert _header(page) == expected
    assert p.input_value("#task-search") == task_id
    assert p.get_attribute("th[data-column=received]", "aria-sort") == "descending"

    # Reset restores --tasks_columns, and that is remembered too.
    p.click("#columns-menu summary")
    p.click("#columns-reset")
    _wait_header(page, DEFAULT)
    _wait_cells(page, task_id, DEFAULT)
    p.reload(wait_until="load")
    _wait_cells(page, task_id, DEFAULT)
    assert _header(page) == DEFAULT
    assert page.errors == []


def test_saved_view_survives_bad_or_stale_entries(page: WatchedPage, redis_cluster: Any) -> None:
    """Unknown columns saved earlier are dropped, a broken entry is ignored, and a prefill
    from the URL wins over the remembered search."""
    c = redis_cluster
    p = page.page
    url = c.stamen.url + "/tasks"
    p.goto(url, wait_until="load")
    p.wait_for_selector("#tasks-body tr")
    key = p.evaluate("'stamen-tasks-view:v2:' + window.Stamen.base")
    stale = {
        "v": 2, "columns": ["state", "gone", "name", "state", 7], "sort": "gone",
        "dir": "sideways", "length": 31, "search": "name:itest.add",
    }  # fmt: skip
    p.evaluate("([k, v]) => localStorage.setItem(k, JSON.stringify(v))", [key, stale])
    with p.expect_request(lambda r: "/tasks/datatable" in r.url) as first:
        p.reload(wait_until="load")
    assert _header(page) == ["state", "name"]
    query = _datatable_query(first.value)
    assert _shown_columns(query) == ["state", "name"]
    # The saved sort is unknown: the first sortable column, descending; 31 rows is no choice.
    assert query["order[0][column]"] == ["0"] and query["order[0][dir]"] == ["desc"]
    assert query["length"] == ["15"]
    assert query["search[value]"] == ["name:itest.add"]
    assert p.input_value("#task-search") == "name:itest.add"

    # The URL's prefill wins over the remembered search.
    p.goto(url + "?state=FAILURE", wait_until="load")
    assert p.input_value("#task-search") == "state:FAILURE"

    p.evaluate("(k) => localStorage.setItem(k, '{not json')", key)
    p.goto(url, wait_until="load")
    p.wait_for_selector("#tasks-body tr[data-uuid]")
    assert _header(page) == DEFAULT
    assert page.errors == []


def test_selection_keeps_only_visible_tasks(page: WatchedPage, redis_cluster: Any) -> None:
    c = redis_cluster
    needle, other = f"sel{uuid.uuid4().hex[:10]}", f"sel{uuid.uuid4().hex[:10]}"
    mine = [c.send("itest.echo", f"{needle} {n}") for n in range(17)]
    theirs = c.send("itest.echo", other)
    for task_id in [*mine, theirs]:
        c.wait_state(task_id, "SUCCESS")
    p = page.page
    p.goto(c.stamen.url + "/tasks", wait_until="load")
    p.fill("#task-search", f"args:{needle}")
    p.wait_for_function("document.getElementById('tasks-summary').textContent.startsWith('17 ')")
    p.wait_for_function("document.querySelectorAll('#tasks-body tr[data-uuid]').length === 15")

    # Everything on the first page, then the next page: nothing stays selected.
    p.check("#select-all")
    assert p.inner_text("#bulk-count") == "15 selected"
    p.click("#page-next")
    p.wait_for_function("document.querySelectorAll('#tasks-body tr[data-uuid]').length === 2")
    p.wait_for_selector("#bulk-actions", state="hidden")
    assert not p.is_checked("#select-all")
    assert p.inner_text("#bulk-count") == "0 selected"
    page.shot("tasks-selection-next-page")

    # A row chosen, then a search it does not match: unselected.
    p.click("#page-prev")
    p.wait_for_function("document.querySelectorAll('#tasks-body tr[data-uuid]').length === 15")
    assert not p.is_checked("#select-all")
    first = p.locator("#tasks-body tr[data-uuid]").first
    first.locator("td.select input").check()
    assert p.inner_text("#bulk-count") == "1 selected"
    assert p.evaluate("document.getElementById('select-all').indeterminate")
    p.fill("#task-search", f"args:{other}")
    p.wait_for_selector(f'tr[data-uuid="{theirs}"]')
    p.wait_for_selector("#bulk-actions", state="hidden")
    p.locator(f'tr[data-uuid="{theirs}"] td.select input').check()
    assert p.inner_text("#bulk-count") == "1 selected"
    assert p.is_checked("#select-all")  # the one row shown is selected
    assert page.errors == []
