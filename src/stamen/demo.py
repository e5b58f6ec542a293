"""``stamen demo``: a whole cluster in one process, with nothing else installed.

A Celery app on kombu's in-memory transport, a worker running in a thread, and a
producer that keeps submitting a mix of tasks (successes, failures with tracebacks,
retries, an ETA task, a long-running task, a chain), monitored by Stamen on port 5555.
It exists so a newcomer can see every page with live data in one command.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from typing import Any

from celery import Celery, chain

log = logging.getLogger("stamen.demo")

#: Seconds to wait for the in-process worker before serving without it.
WORKER_START_TIMEOUT = 15


def make_demo_app() -> Celery:
    app = Celery("demo", broker="memory://", backend="cache+memory://")
    app.conf.update(
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_extended=True,
    )

    @app.task(name="demo.add")
    def add(x: int, y: int) -> int:
        time.sleep(random.uniform(0.01, 0.3))
        return x + y

    @app.task(name="demo.divide")
    def divide(x: int, y: int) -> float:
        return x / y

    @app.task(name="demo.flaky", bind=True, max_retries=3, default_retry_delay=1)
    def flaky(self: Any, order_id: int) -> str:
        if self.request.retries < 2:
            raise self.retry(exc=ConnectionError(f"payment gateway timeout for {order_id}"))
        return f"order {order_id} paid"

    @app.task(name="demo.report")
    def report(customer: str, *, pages: int = 3) -> dict[str, Any]:
        time.sleep(random.uniform(2, 8))
        return {"customer": customer, "pages": pages}

    @app.task(name="demo.multiply")
    def multiply(x: int, y: int) -> int:
        return x * y

    # The thread pool runs tasks against the default app: without this, results go to
    # that app's (disabled) backend and the demo's result backend stays empty.
    app.set_default()
    return app


def _produce(app: Celery, stop: threading.Event) -> None:
    """Submit a steady, varied stream of work until ``stop`` is set."""
    customers = ["acme", "globex", "initech", "umbrella", "hooli"]
    n = 0
    while not stop.wait(random.uniform(0.3, 1.2)):
        n += 1
        roll = random.random()
        try:
            if roll < 0.45:
                app.send_task("demo.add", args=(n, random.randint(1, 100)))
            elif roll < 0.6:
                app.send_task("demo.divide", args=(n, random.choice([0, 1, 2])))
            elif roll < 0.7:
                app.send_task("demo.flaky", kwargs={"order_id": 1000 + n})
            elif roll < 0.8:
                app.send_task(
                    "demo.report",
                    args=(random.choice(customers),),
                    kwargs={"pages": random.randint(1, 9)},
                )
            elif roll < 0.9:
                app.send_task("demo.add", args=(n, n), countdown=10)
            else:
                chain(
                    app.signature("demo.add", args=(n, 1)),
                    app.signature("demo.multiply", args=(3,)),
                    app.signature("demo.add", args=(7,)),
                ).apply_async()
        except Exception as exc:  # keep producing through a transient failure
            log.warning("demo producer: %s", exc)


def _make_worker(app: Celery, ready: threading.Event) -> Any:
    """An in-process worker that sets ``ready`` once it consumes."""

    class DemoWorker(app.WorkController):  # type: ignore[name-defined,misc]
        def on_consumer_ready(self, consumer: Any) -> None:
            ready.set()

    return DemoWorker(
        hostname="demo-worker@stamen",
        pool_cls="threads",
        concurrency=4,
        send_events=True,
        loglevel=logging.WARNING,
        without_mingle=True,
        without_gossip=True,
    )


def run_demo(settings: Any) -> int:
    """Start the demo cluster and serve Stamen for it until interrupted."""
    from stamen.server import serve

    app = make_demo_app()
    settings = dataclasses.replace(
        settings,
        address=settings.address or "127.0.0.1",
        unauthenticated_api=True,
    )
    # The demo worker's per-task INFO lines would drown Stamen's own log, and the tasks
    # that fail on purpose are shown on the pages, not as tracebacks in the terminal.
    logging.getLogger("celery").setLevel(logging.WARNING)
    logging.getLogger("celery.app.trace").setLevel(logging.CRITICAL)
    # The in-memory transport has no host, and kombu says so at every new connection.
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    ready = threading.Event()
    worker = _make_worker(app, ready)
    thread = threading.Thread(target=worker.start, name="demo-worker", daemon=True)
    thread.start()
    # Serve once the worker answers, so the first inspection finds it.
    if not ready.wait(WORKER_START_TIMEOUT):
        log.warning("The demo worker is not ready after %d s; serving anyway", WORKER_START_TIMEOUT)
    stop = threading.Event()
    threading.Thread(target=_produce, args=(app, stop), name="demo-producer", daemon=True).start()
    try:
        return serve(settings, app)
    finally:
        stop.set()
        # Stopped here, not left to die with the interpreter (whose exit closes the thread
        # pools its tasks run in, under it).
        log.info("Stopping the demo worker (tasks it is running finish first)")
        worker.stop(in_sighandler=False)
        thread.join(WORKER_START_TIMEOUT)
