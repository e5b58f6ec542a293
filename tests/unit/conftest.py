"""In-process app fixtures: a real store fed with Celery-shaped events, no broker needed."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from fastapi.testclient import TestClient

from stamen.config import Settings
from stamen.services import Services
from stamen.web.app import create_app


@dataclasses.dataclass
class AppHarness:
    services: Services
    client: TestClient

    def feed(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.services.ingester.add(event)
        self.services.ingester.flush()


def make_harness(tmp_path: Path, **overrides: Any) -> Iterator[AppHarness]:
    backend = overrides.pop("backend", None)
    settings = dataclasses.replace(
        Settings(),
        persistent=True,
        db=str(tmp_path / "history.sqlite3"),
        enable_events=False,
        **{"inspect_timeout": 50.0, "unauthenticated_api": True, **overrides},
    )
    app = Celery("unit", broker="memory://", backend=backend)
    services = Services(settings, app, ingest=False)
    with TestClient(create_app(services)) as client:
        yield AppHarness(services, client)


@contextlib.contextmanager
def many_harnesses(
    tmp_path: Path, setup: Callable[[AppHarness], None] | None = None
) -> Iterator[Callable[..., AppHarness]]:
    """A builder of apps for tests that compare settings (one app each): every app gets its
    own folder under ``tmp_path`` and ``setup`` (extra test routes), and all close at exit."""
    gens: list[Iterator[AppHarness]] = []

    def build(**overrides: Any) -> AppHarness:
        path = tmp_path / str(len(gens))
        path.mkdir()
        gen = make_harness(path, **overrides)
        gens.append(gen)
        harness = next(gen)
        if setup is not None:
            setup(harness)
        return harness

    try:
        yield build
    finally:
        for gen in gens:
            gen.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[AppHarness]:
    yield from make_harness(tmp_path)
