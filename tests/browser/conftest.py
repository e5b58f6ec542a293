"""Headless Chromium against the session's real Stamen and worker (Redis broker).

The cluster fixtures come from ``tests/conftest.py``, so both suites share one Stamen and
one worker per session. The browser is closed when this package's tests end: Playwright's
sync API keeps an event loop running on the main thread while it is open, which later
``asyncio.run`` calls would trip over. Chromium is Debian's
(``/usr/bin/chromium``) driven by Playwright; Playwright's own browser download is never
used, so nothing is fetched at test time.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Cluster, Worker, start_worker, wait_until

CHROMIUM = os.environ.get("STAMEN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


_SCREENSHOTS = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def screenshots_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Where the pages' screenshots go: kept with pytest's last few temporary folders, and
    named at the end of the run (a print here would be captured)."""
    path = tmp_path_factory.mktemp("screenshots")
    request.config.stash[_SCREENSHOTS] = path
    return path


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    path = config.stash.get(_SCREENSHOTS, None)
    if path is not None:
        shots = len(list(path.glob("*.png")))
        terminalreporter.write_line(f"browser screenshots ({shots}): {path}")


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class WatchedPage:
    """A page that records console errors, uncaught exceptions and every URL it asked for."""

    def __init__(self, page: Any, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.errors: list[str] = []
        self.requested: list[str] = []
        page.on("request", lambda r: self.requested.append(r.url))
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(browser: Any, screenshots_dir: Path) -> Iterator[WatchedPage]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield WatchedPage(context.new_page(), screenshots_dir)
    finally:
        context.close()


@dataclass
class SpareWorker:
    """A worker of the session's Redis cluster with a queue of its own, which a test may
    pause, purge or stop without touching the shared worker."""

    worker: Worker
    queue: str

    @property
    def hostname(self) -> str:
        return self.worker.hostname


@pytest.fixture
def spare_workers(redis_cluster: Cluster, logs_dir: Path) -> Iterator[Callable[[], SpareWorker]]:
    """Starts spare workers on demand (not before the test has opened its page); stops them."""
    started: list[SpareWorker] = []

    def start() -> SpareWorker:
        tag = uuid.uuid4().hex[:8]
        queue, hostname = f"itest-pages-{tag}", f"pages-{tag}@localhost"
        log = logs_dir / f"worker-pages-{tag}.log"
        spare = SpareWorker(start_worker(redis_cluster.env, hostname, queue, log), queue)
        started.append(spare)
        return spare

    try:
        yield start
    finally:
        for spare in started:
            spare.worker.stop()


def wait_online(cluster: Cluster, spare: SpareWorker) -> None:
    """Until Stamen lists the worker online and has inspected it (its queue, its stats)."""
    wait_until(
        lambda: cluster.stamen.get("/api/workers?status=1").json().get(spare.hostname),
        timeout=60,
        what=f"{spare.hostname} online in stamen",
    )
    wait_until(
        lambda: (
            spare.queue
            in str(cluster.stamen.get(f"/api/workers?workername={spare.hostname}&refresh=1").json())
        ),
        timeout=30,
        what=f"{spare.hostname} inspected",
    )
