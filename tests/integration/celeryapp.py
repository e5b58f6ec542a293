"""The Celery app the integration tests run real workers with.

Broker and backend come from the environment so one module serves Redis and RabbitMQ.
The task families mirror what production clusters do: plain successes, failures with
tracebacks, retries, long runs that get revoked, chains, and large payloads.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from celery.contrib.abortable import AbortableTask

app = Celery(
    "itest",
    broker=os.environ.get("STAMEN_TEST_BROKER", "redis://127.0.0.1:6379/7"),
    backend=os.environ.get("STAMEN_TEST_BACKEND", "redis://127.0.0.1:6379/8"),
)
app.conf.update(
    task_default_queue=os.environ.get("STAMEN_TEST_QUEUE", "itest"),
    worker_send_task_events=not os.environ.get("STAMEN_TEST_NO_EVENTS"),
    task_send_sent_event=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    # Control tests restart the pool of a worker of their own.
    worker_pool_restarts=os.environ.get("STAMEN_TEST_POOL_RESTARTS") == "1",
    # Retry tests run a worker of their own that keeps each call in the result backend.
    result_extended=os.environ.get("STAMEN_TEST_RESULT_EXTENDED") == "1",
)


@app.task(name="itest.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="itest.fail")
def fail(message: str) -> None:
    raise KeyError(message)


@app.task(name="itest.retry", bind=True, max_retries=2, default_retry_delay=0.1)
def retry(self, label: str) -> str:  # type: ignore[no-untyped-def]
    if self.request.retries < 2:
        raise self.retry(exc=ConnectionError(f"transient {label}"))
    return f"done {label}"


@app.task(name="itest.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="itest.echo")
def echo(payload: str, **kwargs: object) -> int:
    return len(payload)


@app.task(name="itest.abortable", bind=True, base=AbortableTask)
def abortable(self, seconds: float) -> str:  # type: ignore[no-untyped-def]
    """Runs until aborted through the result backend (or ``seconds`` pass)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if self.is_aborted():
            return "aborted"
        time.sleep(0.1)
    return "finished"
