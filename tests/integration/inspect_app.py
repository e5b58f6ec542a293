"""A tiny Celery app for the worker subprocess of the inspector tests.

Configured from the environment so each test run gets its own broker key prefix and queue
(``STAMEN_TEST_BROKER``, ``STAMEN_TEST_QUEUE``, ``STAMEN_TEST_KEYPREFIX``): with a unique
``global_keyprefix`` even the remote-control broadcasts are private to the run, so workers of
other test runs on the shared Redis neither answer nor consume anything.
"""

from __future__ import annotations

import os

from celery import Celery


def make_app(broker: str, queue: str, keyprefix: str) -> Celery:
    """The app the worker runs; the tests build the same one to talk to it."""
    app = Celery("stamen_inspect_test", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options={"global_keyprefix": keyprefix},
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    app.task(name="stamen_test.add")(add)
    return app


def add(x: int, y: int) -> int:
    return x + y


app = make_app(
    os.environ.get("STAMEN_TEST_BROKER", "redis://127.0.0.1:6379/0"),
    os.environ.get("STAMEN_TEST_QUEUE", "stamen-inspect-test"),
    os.environ.get("STAMEN_TEST_KEYPREFIX", "stamen-inspect-test:"),
)
