"""``--event_queue_ttl`` and ``--event_queue_max_length`` shape our RabbitMQ event queue.

Celery declares the monitor's queue with a 5 s message TTL, so a monitor that lags longer
loses events; these options let an operator give Stamen's own queue more room, bounded.
The check reads the queue RabbitMQ really declared.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import StamenProcess, cluster_env, wait_until

pytestmark = pytest.mark.integration


def event_queue_arguments() -> list[str]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "arguments"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return [line for line in out.splitlines() if line.startswith("celeryev.")]


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl not installed")
def test_event_queue_gets_the_configured_ttl_and_bound(logs_dir: Path) -> None:
    broker = "amqp://guest:guest@127.0.0.1:5672//"
    env = cluster_env(broker, "redis://127.0.0.1:6379/9", "unused")
    stamen = StamenProcess(
        ["-A", "tests.integration.celeryapp", "--event_queue_ttl=61.5",
         "--event_queue_max_length=4321"],
        env,
    ).start(logs_dir / "stamen-event-queue.log")  # fmt: skip
    try:
        line = wait_until(
            lambda: next((q for q in event_queue_arguments() if "4321" in q), None),
            timeout=30,
            what="our event queue declared",
        )
        assert "x-message-ttl" in line and "61500" in line
        assert "x-max-length" in line
    finally:
        stamen.stop()
    wait_until(
        lambda: not any("4321" in q for q in event_queue_arguments()),
        timeout=30,
        what="the auto-delete event queue gone after stop",
    )
