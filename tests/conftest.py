"""Session-wide fixtures shared by the integration and browser suites.

They live here, at the top, so both packages get the same single Stamen and worker per
broker: two copies of a session fixture would start two workers with one hostname.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Cluster, start_cluster


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logs")
    print(f"\nprocess logs: {path}")  # noqa: T201 - where to look when a test fails
    return path


@pytest.fixture(scope="session")
def redis_cluster(logs_dir: Path) -> Iterator[Cluster]:
    yield from start_cluster(
        "redis", "redis://127.0.0.1:6379/7", "redis://127.0.0.1:6379/8", logs_dir
    )


@pytest.fixture(scope="session")
def rabbitmq_cluster(logs_dir: Path) -> Iterator[Cluster]:
    yield from start_cluster(
        "rabbitmq", "amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/9", logs_dir
    )
