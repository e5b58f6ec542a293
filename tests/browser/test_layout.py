"""Layout in a real browser: the pages fit a phone, follow the dark colour scheme and show
where the keyboard focus is."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.browser.conftest import WatchedPage

pytestmark = [pytest.mark.browser, pytest.mark.integration]

PHONE = {"width": 390, "height": 844}
#: How far the page is wider than the screen (tables scroll inside their own box).
OVERFLOW = "document.documentElement.scrollWidth - window.innerWidth"
#: What sticks out, for the failure message.
WIDE = """[...document.querySelectorAll('body *')]
  .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1)
  .slice(0, 8).map((e) => `${e.tagName}#${e.id}.${e.className}`)"""


def _paths(c: Any, task_id: str) -> dict[str, str]:
    return {
        "workers": "/workers",
        "worker": f"/worker/{quote(c.worker.hostname, safe='')}",
        "tasks": "/tasks",
        "task": f"/task/{task_id}",
        "broker": "/broker",
        "charts": "/charts",
        "failures": "/failures",
    }


def test_pages_fit_a_phone_in_light_and_dark(
    browser: Any, screenshots_dir: Path, redis_cluster: Any
) -> None:
    c = redis_cluster
    task_id = c.send("itest.add", 4, 4)
    c.wait_state(task_id, "SUCCESS")
    backgrounds: dict[str, set[str]] = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(viewport=PHONE, color_scheme=scheme, has_touch=True)
        try:
            page = WatchedPage(context.new_page(), screenshots_dir)
            for name, path in _paths(c, task_id).items():
                response = page.page.goto(c.stamen.url + path, wait_until="load")
                assert response is not None and response.status == 200, path
                page.page.wait_for_selector("main h1")
                wide = page.page.evaluate(OVERFLOW) > 0
                assert not wide, (scheme, path, page.page.evaluate(WIDE))
                backgrounds.setdefault(scheme, set()).add(
                    page.page.evaluate("getComputedStyle(document.body).backgroundColor")
                )
                page.shot(f"phone-{scheme}-{name}")
                if name == "tasks":  # the column chooser opens within the screen too
                    page.page.click("#columns-menu summary")
                    page.page.wait_for_selector("#columns-list", state="visible")
                    box = page.page.locator("#columns-menu .menu-panel").bounding_box()
                    assert box is not None and box["x"] >= 0, box
                    assert box["x"] + box["width"] <= PHONE["width"], box
                    assert page.page.evaluate(OVERFLOW) <= 0, page.page.evaluate(WIDE)
                    page.shot(f"phone-{scheme}-tasks-columns")
            assert page.errors == [], (scheme, page.errors)
        finally:
            context.close()
    assert len(backgrounds["light"]) == len(backgrounds["dark"]) == 1
    assert backgrounds["light"] != backgrounds["dark"]


def test_keyboard_focus_is_visible(page: WatchedPage, redis_cluster: Any) -> None:
    page.page.goto(redis_cluster.stamen.url + "/tasks", wait_until="load")
    outlines = []
    for _ in range(6):
        page.page.keyboard.press("Tab")
        outlines.append(
            page.page.evaluate(
                "(() => { const s = getComputedStyle(document.activeElement);"
                " return [document.activeElement.tagName, s.outlineStyle, s.outlineWidth]; })()"
            )
        )
    focused = [o for o in outlines if o[0] in ("A", "BUTTON", "INPUT", "SELECT")]
    assert len(focused) >= 5, outlines
    for tag, style, width in focused:
        assert style != "none" and width != "0px", (tag, style, width)
    assert page.errors == []
