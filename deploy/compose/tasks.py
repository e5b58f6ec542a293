"""A small Celery app for the docker-compose demo: an ETL family of tasks (the family the
example custom page, deploy/examples/flowerconfig_custom_page.py, shows) and a beat that
sends them, so the dashboards have something to show."""

import os
import random
import time

from celery import Celery, chain

app = Celery("tasks", broker=os.environ.get("CELERY_BROKER_URL", "redis://redis:6379/0"))
app.conf.update(
    result_backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://redis:6379/1"),
    worker_send_task_events=True,
    task_send_sent_event=True,
    beat_schedule={"etl": {"task": "etl.run", "schedule": 10.0}},
)


@app.task(name="etl.extract")
def extract(source: str) -> list[int]:
    time.sleep(random.uniform(0.1, 1.0))
    return [random.randint(0, 100) for _ in range(10)]


@app.task(name="etl.transform")
def transform(rows: list[int]) -> list[int]:
    if random.random() < 0.1:
        raise ValueError("bad row")
    return sorted(rows)


@app.task(name="etl.load")
def load(rows: list[int]) -> int:
    time.sleep(random.uniform(0.1, 0.5))
    return len(rows)


@app.task(name="etl.run")
def run() -> None:
    chain(extract.s("db"), transform.s(), load.s()).delay()
