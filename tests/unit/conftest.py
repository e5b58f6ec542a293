"""In-process app fixtures: a real store fed with Celery-shaped events, no broker needed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
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


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[AppHarness]:
    yield from make_harness(tmp_path)
