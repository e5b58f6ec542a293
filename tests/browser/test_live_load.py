"""The tasks page under a thousand events a second: it keeps up without reloading, its
main thread stays free, and the stream it receives is coalesced.

Its own Stamen on a Redis database of its own, fed by the benchmark's load generator
(``bench/events.py``, the frames a Celery worker publishes) in a subprocess, so the
publishing does not compete with the browser driver in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from statistics import median

import pytest
import redis

from tests.browser.conftest import WatchedPage
from tests.integration.conftest import ROOT, StamenProcess, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.integration]

BROKER = "redis://127.0.0.1:6379/5"
RATE = 1000  # events per second
SECONDS = 6
TASKS = RATE * SECONDS // 3  # three events a task

#: Runs before the page's own scripts: counts the live messages the page handles, and
#: measures how late a 50 ms timer fires (the main thread's responsiveness).
PROBE = """
window.__live = 0;
const add = EventSource.prototype.addEventListener;
EventSource.prototype.addEventListener = function (kind, fn, ...rest) {
  const counted = function (ev) {
    if (kind === "tasks") window.__live++;
    return fn.call(this, ev);
  };
  return add.call(this, kind, counted, ...rest);
};
window.__late = [];
let last = performance.now();
setInterval(() => {
  const now = performance.now();
  window.__late.push(now - last - 50);
  last = now;
}, 50);
"""


@pytest.fixture
def busy_stamen(tmp_path: Path) -> Iterator[StamenProcess]:
    redis.Redis.from_url(BROKER).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CELERY_"))}
    stamen = StamenProcess([f"--broker={BROKER}"], env).start(tmp_path / "stamen.log")
    try:
        yield stamen
    finally:
        stamen.stop()


def test_tasks_page_keeps_up_with_a_thousand_events_a_second(
    page: WatchedPage, busy_stamen: StamenProcess, tmp_path: Path
) -> None:
    page.page.add_init_script(PROBE)
    page.page.goto(busy_stamen.url + "/tasks", wait_until="load")
    page.page.wait_for_selector("#live-status[data-state=live]", timeout=15_000)
    page.page.evaluate("window.__sameDocument = true; window.__late = []")

    publisher = subprocess.run(
        [
            sys.executable,
            "bench/events.py",
            f"--broker={BROKER}",
            f"--tasks={TASKS}",
            f"--rate={RATE}",
            f"--duration={SECONDS + 10}",
            "--mode=single",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS + 30,
        check=True,
    )
    assert f" {TASKS} " in publisher.stdout, publisher.stdout

    summary = page.page.locator("#tasks-summary")
    wait_until(
        lambda: summary.inner_text().startswith(f"{TASKS:,} tasks"),
        timeout=20,
        what=f"the page counting {TASKS:,} tasks ({summary.inner_text()!r})",
    )
    assert page.page.evaluate("window.__sameDocument === true"), "the page reloaded"
    page.shot("tasks-live-load")

    late = page.page.evaluate("window.__late")
    messages = page.page.evaluate("window.__live")
    # Coalesced: a few messages a second (the hub sends at most one per 0.5 s), not one per
    # event or per task.
    assert 0 < messages <= 3 * (SECONDS + 20), messages
    # Responsive: a 50 ms timer fired on time through the load (medians, and no stall of
    # half a second).
    assert len(late) > SECONDS * 10
    assert median(late) < 25, sorted(late)[-10:]
    assert max(late) < 500, sorted(late)[-10:]
    assert page.errors == []
