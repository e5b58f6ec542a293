"""Prometheus metrics for ``/metrics``: Flower's six families, our own, celery-exporter's.

Three kinds of series live in one :class:`~prometheus_client.CollectorRegistry` per app
(never the process-global one, so two apps in a process keep separate series; the process,
platform and GC collectors Flower's default registry carries are added to it):

* **Flower's six** (spec 9), updated from the ingest observer once per committed batch, in
  the flush thread, with Flower's rules applied event by event. Names, HELP strings, label
  names and order, types and buckets are Flower's, so its Grafana dashboard and alert rules
  keep working.
* **Ours**, computed at scrape time from the store and the live ingest state, because a
  cheap indexed query per scrape costs less than bookkeeping on every event: queue lengths,
  ingest lag and backlog, store size and span, workers online and tasks by state.
* **celery-exporter's family**, behind ``--celery_exporter_metrics``: its counters are
  event-driven like Flower's; its worker and queue gauges come from the same scrape-time
  sources as ours.

Flower's rules look at the task *after* each event was merged, but the observer only sees
the batch's final task records. :class:`_TaskView` rebuilds the few fields the rules read
(``name``, ``eta``, ``received``, ``started``) event by event: a field no event of the batch
touches is the final value; a field an event of the batch sets starts the batch unset. That
is exact unless the same task gets two events setting the same field within one batch and
out of order, which Flower itself handles inconsistently.

Event drops are not exported: the broker drops events from Stamen's event queue (TTL and
max-length) without telling any consumer, so there is nothing we can count honestly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from stamen.cluster.queues import UnsupportedBroker
from stamen.events.merge import worker_alive

if TYPE_CHECKING:
    from stamen.services import Services
    from stamen.store.writer import Batch

log = logging.getLogger(__name__)

#: Flower serves ``generate_latest()`` with exactly this header (spec 3.7).
CONTENT_TYPE = "text/plain"

#: celery-exporter's default buckets are prometheus_client's defaults.
EXPORTER_BUCKETS: tuple[float, ...] = tuple(Histogram.DEFAULT_BUCKETS)

#: How long scrape-time queue lengths are reused, and how long a scrape waits for them.
QUEUE_CACHE_SECONDS = 5.0
QUEUE_TIMEOUT_SECONDS = 3.0
#: Shortest reuse of the tasks-by-state counts: a GROUP BY over a million rows is the
#: most expensive part of a scrape, and state totals do not need sub-second freshness.
STATE_CACHE_SECONDS = 2.0
#: The tasks-by-state refresh waits this many times its own duration before the next one.
STATE_COST_FACTOR = 30.0
#: Bound on queue names learnt from task-sent events (each costs a broker call per refresh).
MAX_SEEN_QUEUES = 1000

_EXPORTER_EVENTS = (
    "task-sent",
    "task-received",
    "task-started",
    "task-succeeded",
    "task-failed",
    "task-rejected",
    "task-revoked",
    "task-retried",
)
_EXPORTER_HELP = {
    "task-sent": "Sent when a task message is published.",
    "task-received": "Sent when the worker receives a task.",
    "task-started": "Sent just before the worker executes the task.",
    "task-succeeded": "Sent if the task executed successfully.",
    "task-failed": "Sent if the execution of the task failed.",
    "task-rejected": "The task was rejected by the worker, possibly to be re-queued or moved "
    "to a dead letter queue.",
    "task-revoked": "Sent if the task has been revoked.",
    "task-retried": "Sent if the task failed, but will be retried in the future.",
}


def node_host(name: str) -> str:
    """celery-exporter's ``hostname`` label: the part of a node name after ``@``."""
    return name.partition("@")[2] if "@" in name else name


def exception_class(exception: Any) -> str:
    """celery-exporter's ``exception`` label: the class name of ``Foo('...')``."""
    text = str(exception or "")
    head, paren, _ = text.partition("(")
    if paren and head and head.replace("_", "a").isalnum():
        return head
    return "UnknownException"


class _TaskView:
    """The fields Flower's metric rules read, as they stood after each event of a batch."""

    __slots__ = ("eta", "name", "received", "started")

    def __init__(self, final: Mapping[str, Any] | None, events: Sequence[Mapping[str, Any]]):
        final = final or {}
        touched_name = any(e.get("name") for e in events)
        touched_eta = any("eta" in e for e in events)
        kinds = {e.get("type") for e in events}
        self.name: str | None = None if touched_name else final.get("name")
        self.eta: Any = None if touched_eta else final.get("eta")
        self.received: Any = None if "task-received" in kinds else final.get("received")
        self.started: Any = None if "task-started" in kinds else final.get("started")

    def apply(self, event: Mapping[str, Any]) -> None:
        """Celery sets ``<state>`` to the event time for every known event type."""
        kind = event.get("type")
        if kind == "task-received":
            self.received = event.get("timestamp")
        elif kind == "task-started":
            self.started = event.get("timestamp")
        if event.get("name"):
            self.name = event["name"]
        if "eta" in event:
            self.eta = event["eta"]


class FlowerMetrics:
    """Flower 2.2's six metric families, with its update rules (spec 9)."""

    def __init__(self, registry: CollectorRegistry, buckets: Iterable[float]) -> None:
        self.events = Counter(
            "flower_events", "Number of events", ["worker", "type", "task"], registry=registry
        )
        self.runtime = Histogram(
            "flower_task_runtime_seconds",
            "Task runtime",
            ["worker", "task"],
            buckets=list(buckets),
            registry=registry,
        )
        self.prefetch_time = Gauge(
            "flower_task_prefetch_time_seconds",
            "The time the task spent waiting at the celery worker to be executed.",
            ["worker", "task"],
            registry=registry,
        )
        self.number_of_prefetched_tasks = Gauge(
            "flower_worker_prefetched_tasks",
            "Number of tasks of given type prefetched at a worker",
            ["worker", "task"],
            registry=registry,
        )
        self.worker_online = Gauge(
            "flower_worker_online", "Worker online status", ["worker"], registry=registry
        )
        self.worker_number_of_currently_executing_tasks = Gauge(
            "flower_worker_number_of_currently_executing_tasks",
            "Number of tasks currently executing at a worker",
            ["worker"],
            registry=registry,
        )

    @property
    def all(self) -> tuple[Any, ...]:
        return (
            self.events,
            self.runtime,
            self.prefetch_time,
            self.number_of_prefetched_tasks,
            self.worker_online,
            self.worker_number_of_currently_executing_tasks,
        )

    def observe(self, events: Sequence[Mapping[str, Any]], tasks: Mapping[str, Any]) -> None:
        """Apply one committed batch: counts and gauge deltas are summed, then applied once."""
        counts: dict[tuple[str, str, str], int] = {}
        runtimes: list[tuple[str, str, float]] = []
        prefetch_set: dict[tuple[str, str], float] = {}
        prefetched_delta: dict[tuple[str, str], int] = {}
        online: dict[str, int] = {}
        executing: dict[str, Any] = {}
        views = _views(events, tasks)
        for event in events:
            kind = event.get("type") or ""
            worker = event.get("hostname")
            if kind.startswith("task-"):
                view = views.get(event.get("uuid") or "")
                if view is None:
                    continue
                view.apply(event)
                worker = str(worker)
                name = event.get("name") or view.name or ""
                key3 = (worker, kind, name)
                counts[key3] = counts.get(key3, 0) + 1
                runtime = event.get("runtime") or 0
                if runtime:
                    runtimes.append((worker, name, float(runtime)))
                if view.eta or not view.received:
                    continue
                key = (worker, name)
                if kind == "task-received":
                    prefetched_delta[key] = prefetched_delta.get(key, 0) + 1
                elif kind == "task-started" and view.started:
                    prefetch_set[key] = float(view.started) - float(view.received)
                    prefetched_delta[key] = prefetched_delta.get(key, 0) - 1
                elif kind in ("task-succeeded", "task-failed") and view.started:
                    prefetch_set[key] = 0.0
                elif kind in ("task-revoked", "task-rejected") and not view.started:
                    prefetched_delta[key] = prefetched_delta.get(key, 0) - 1
            elif worker is not None:
                if kind in ("worker-online", "worker-heartbeat"):
                    online[worker] = 1
                    if kind == "worker-heartbeat" and event.get("active") is not None:
                        executing[worker] = event["active"]
                elif kind == "worker-offline":
                    online[worker] = 0
        for triple, n in counts.items():
            self.events.labels(*triple).inc(n)
        for worker, name, runtime in runtimes:
            self.runtime.labels(worker, name).observe(runtime)
        for labels, value in prefetch_set.items():
            self.prefetch_time.labels(*labels).set(value)
        for labels, delta in prefetched_delta.items():
            self.number_of_prefetched_tasks.labels(*labels).inc(delta)
        for worker, up in online.items():
            self.worker_online.labels(worker).set(up)
        for worker, active in executing.items():
            self.worker_number_of_currently_executing_tasks.labels(worker).set(active)

    def label_workers(self) -> set[str]:
        """Every worker that has at least one series (the first label of each set)."""
        found: set[str] = set()
        for metric in self.all:
            found.update(labels[0] for labels in _label_sets(metric))
        return found

    def remove_worker(self, worker: str) -> None:
        """Drop every label set whose first label is ``worker``, from all six families."""
        for metric in self.all:
            for labels in _label_sets(metric):
                if labels[0] == worker:
                    with contextlib.suppress(KeyError):  # removed concurrently
                        metric.remove(*labels)


def _views(events: Sequence[Mapping[str, Any]], tasks: Mapping[str, Any]) -> dict[str, _TaskView]:
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for event in events:
        if (event.get("type") or "").startswith("task-") and event.get("uuid"):
            by_task.setdefault(event["uuid"], []).append(event)
    return {uuid: _TaskView(tasks.get(uuid), evs) for uuid, evs in by_task.items()}


def _label_sets(metric: Any) -> list[tuple[str, ...]]:
    # prometheus_client has no public way to list a family's label sets; Flower and
    # celery-exporter read the same private mapping to purge.
    with metric._lock:
        return list(metric._metrics)


class ExporterMetrics:
    """celery-exporter's event-driven families (its counters and runtime histogram)."""

    def __init__(self, registry: CollectorRegistry, queue_memory: int = 50_000) -> None:
        self.counters: dict[str, Counter] = {}
        for kind in _EXPORTER_EVENTS:
            labels = ["name", "hostname", "queue_name"]
            if kind == "task-failed":
                labels = ["name", "hostname", "exception", "queue_name"]
            self.counters[kind] = Counter(
                "celery_" + kind.replace("-", "_"),
                _EXPORTER_HELP[kind],
                labels,
                registry=registry,
            )
        self.runtime = Histogram(
            "celery_task_runtime",
            "Histogram of task runtime measurements.",
            ["name", "hostname", "queue_name"],
            buckets=EXPORTER_BUCKETS,
            registry=registry,
        )
        # task-sent carries the queue, later events do not: remember it per task, bounded.
        self._queues: OrderedDict[str, str] = OrderedDict()
        self._queue_memory = queue_memory

    def observe(self, events: Sequence[Mapping[str, Any]], tasks: Mapping[str, Any]) -> None:
        queues = self._queues
        for event in events:
            kind = event.get("type")
            if kind not in self.counters:
                continue
            uuid = event.get("uuid") or ""
            task = tasks.get(uuid) or {}
            if kind == "task-sent" and event.get("queue"):
                queues[uuid] = str(event["queue"])
                queues.move_to_end(uuid)
                while len(queues) > self._queue_memory:
                    queues.popitem(last=False)
            name = str(task.get("name") or event.get("name") or "")
            host = node_host(str(event.get("hostname") or ""))
            queue = queues.get(uuid, "celery")
            for other, counter in self.counters.items():
                if other == kind:
                    amount = 1.0
                elif kind == "task-sent":
                    continue  # clients are many: do not spread their label sets
                else:
                    amount = 0.0  # celery-exporter makes every counter visible at 0
                if other == "task-failed":
                    exc = exception_class(task.get("exception")) if other == kind else ""
                    counter.labels(name, host, exc, queue).inc(amount)
                else:
                    counter.labels(name, host, queue).inc(amount)
            if kind == "task-succeeded":
                runtime = task.get("runtime") if task.get("runtime") is not None else 0.0
                self.runtime.labels(name, host, queue).observe(float(runtime or 0.0))
            if kind in ("task-succeeded", "task-failed", "task-revoked", "task-rejected"):
                queues.pop(uuid, None)


class _QueueCache:
    """Queue lengths from the broker, refreshed at most every few seconds, off the loop.

    The broker call blocks and may hang; a scrape waits for it only so long, and a refresh
    still running keeps the previous figures rather than stacking another call.
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.lengths: dict[str, float] = {}
        self.consumers: dict[str, float] = {}
        self.ages: dict[str, float] = {}
        self.fetched_at = 0.0
        self.unsupported = not services.queues.supported
        #: Queues named by task-sent events: the inspector cache only knows the queues of
        #: workers it has inspected, and a queue nobody consumes is the one to watch.
        self.seen: set[str] = set()
        self._running: asyncio.Future[Any] | None = None

    async def refresh(self) -> None:
        if self.unsupported or time.monotonic() - self.fetched_at < QUEUE_CACHE_SECONDS:
            return
        if self._running is None or self._running.done():
            names = self.services.queues.queue_names(self.services.inspector.workers)
            names = sorted({*names, *self.seen})
            loop = asyncio.get_running_loop()
            self._running = loop.run_in_executor(None, self._fetch, names)
        try:
            found, ages = await asyncio.wait_for(
                asyncio.shield(self._running), QUEUE_TIMEOUT_SECONDS
            )
        except TimeoutError:
            log.debug("Queue lengths took longer than %ss; reusing the last", QUEUE_TIMEOUT_SECONDS)
            return
        except UnsupportedBroker:
            self.unsupported = True
            return
        except Exception as exc:
            log.debug("Queue lengths for metrics failed: %s", exc)
            self.fetched_at = time.monotonic()
            return
        lengths: dict[str, float] = {}
        consumers: dict[str, float] = {}
        for queue in found or ():
            name = queue.get("name")
            if name is None or queue.get("messages") is None:
                continue
            lengths[str(name)] = float(queue["messages"])
            if queue.get("consumers") is not None:
                consumers[str(name)] = float(queue["consumers"])
        self.lengths, self.consumers, self.ages = lengths, consumers, ages
        self.fetched_at = time.monotonic()

    def _fetch(self, names: list[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """Blocking: lengths (raises like ``QueueLengths.lengths``), then ages (never raises)."""
        found = self.services.queues.lengths(names)
        try:
            ages = self._oldest_ages(names)
        except Exception as exc:
            log.debug("Oldest message ages for metrics failed: %s", exc)
            ages = {}
        return found, ages

    def _oldest_ages(self, names: Sequence[str]) -> dict[str, float]:
        """Age of the oldest waiting message per queue, where the broker lets us see it.

        Only Redis does: kombu pushes on the left and pops on the right, so the oldest
        message of each priority list is at index -1, readable without consuming it. Celery
        messages carry no publish time, so the age is the task's ``task-sent`` time from
        the store (clients need ``task_send_sent_event``). RabbitMQ exposes no message
        without consuming it (and ``head_message_timestamp`` needs a plugin and publisher
        timestamps Celery does not set), so it has no ages.
        """
        # The Redis backend of QueueLengths owns the client and kombu's key naming.
        backend = self.services.queues._get_backend()
        get_client = getattr(backend, "_get_client", None)
        keys_for = getattr(backend, "_keys_for", None)
        if not names or get_client is None or keys_for is None:
            return {}
        per_queue = [(name, keys_for(name)) for name in names]
        with get_client().pipeline(transaction=False) as pipe:
            for _, keys in per_queue:
                for key in keys:
                    pipe.lindex(key, -1)
            heads = iter(pipe.execute())
        ids: dict[str, list[str]] = {}
        for name, keys in per_queue:
            for _ in keys:
                raw = next(heads)
                if not raw:
                    continue
                try:
                    task_id = (json.loads(raw).get("headers") or {}).get("id")
                except (ValueError, AttributeError):
                    continue
                if task_id:
                    ids.setdefault(name, []).append(str(task_id))
        wanted = [i for found in ids.values() for i in found]
        if not wanted:
            return {}
        sent = self.services.reader.sent_times(wanted)
        now = time.time()
        ages: dict[str, float] = {}
        for name, found in ids.items():
            times = [float(sent[i]) for i in found if i in sent]
            if times:
                ages[name] = max(0.0, now - min(times))
        return ages


class ScrapeCollector(Collector):
    """Families computed when Prometheus scrapes, from the store and the live state."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._states: list[tuple[str, int]] = []
        self._states_at = -1.0
        self._states_ttl = STATE_CACHE_SECONDS
        self._states_busy = False
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []  # collected lazily: describing must not touch the store

    def collect(self) -> Iterator[Metric]:
        services = self.m.services
        reader = services.reader
        now = self.m.clock()
        yield from self._queues()

        pending = services.ingester.pending
        lag = 0.0
        try:
            first = pending[0]
        except IndexError:
            first = None
        if first is not None:
            received = first.get("local_received") or first.get("timestamp")
            if received is not None:
                lag = max(0.0, now - float(received))
        yield _gauge(
            "flower_ingest_lag_seconds",
            "Age of the oldest received event not yet stored (0 when ingest is caught up).",
            lag,
        )
        yield _gauge(
            "flower_ingest_pending_events",
            "Events received and waiting to be stored.",
            float(len(pending)),
        )
        yield _counter(
            "stamen_ingest_receive_pauses",
            "Times receiving waited for storing to catch up (--max_pending_events reached).",
            float(services.ingester.receive_pauses),
        )
        yield _gauge(
            "stamen_ingest_leader",
            "1 while this instance receives and stores events; 0 on a standby sharing a "
            "PostgreSQL database with the instance that does.",
            float(services.health.ingesting),
        )
        yield _counter(
            "flower_events_ingested",
            "Events stored since this process started.",
            float(services.ingester.events_ingested),
        )

        yield _gauge("flower_store_tasks", "Tasks kept in the history store.", reader.task_count())
        yield _gauge(
            "flower_store_size_bytes",
            "Size of the history on disk: the SQLite file with its write-ahead log, or the "
            "PostgreSQL schema's tables with their indexes.",
            reader.size_bytes(),
        )
        oldest, newest = reader.time_span()
        span = float(newest) - float(oldest) if oldest is not None and newest is not None else 0.0
        yield _gauge(
            "flower_store_history_span_seconds",
            "Time between the oldest and the newest task kept in the history store.",
            span,
        )
        yield _gauge(
            "flower_store_oldest_task_timestamp_seconds",
            "Time of the last event of the oldest task kept (0 when the store is empty).",
            float(oldest or 0.0),
        )

        workers = reader.workers()
        alive = {h: worker_alive(w, now) for h, w in workers.items()}
        yield _gauge(
            "flower_workers_online",
            "Workers whose last heartbeat is recent enough for Celery to call them online.",
            float(sum(alive.values())),
        )
        tasks = GaugeMetricFamily("flower_tasks", "Tasks kept, by state.", labels=["state"])
        for state, count in self._state_counts():
            tasks.add_metric([state], float(count))
        yield tasks

        if self.m.exporter is not None:
            yield from self._exporter_gauges(workers, alive)

    def _queues(self) -> Iterator[Metric]:
        cache = self.m.queue_cache
        family = GaugeMetricFamily(
            "flower_queue_length", "Messages waiting in a broker queue.", labels=["queue"]
        )
        for name, length in sorted(cache.lengths.items()):
            family.add_metric([name], length)
        yield family
        ages = GaugeMetricFamily(
            "flower_queue_oldest_message_age_seconds",
            "Time since the oldest message waiting in a queue was sent (Redis brokers only).",
            labels=["queue"],
        )
        for name, age in sorted(cache.ages.items()):
            ages.add_metric([name], age)
        yield ages
        if self.m.exporter is None:
            return
        exp = GaugeMetricFamily(
            "celery_queue_length", "The number of message in broker queue.", labels=["queue_name"]
        )
        for name, length in sorted(cache.lengths.items()):
            exp.add_metric([name], length)
        yield exp
        consumers = GaugeMetricFamily(
            "celery_active_consumer_count",
            "The number of active consumer in broker queue.",
            labels=["queue_name"],
        )
        for name, count in sorted(cache.consumers.items()):
            consumers.add_metric([name], count)
        yield consumers

    def _state_counts(self) -> list[tuple[str, int]]:
        """Tasks per state, never older than ``_states_ttl`` plus one query.

        The count walks the whole ``tasks_by_state`` index (about 0.3 s per million tasks
        on SQLite), so it runs in a background thread and scrapes read the last result:
        scrapes stay fast whatever the history size. Its refresh interval grows with its
        cost (``STATE_COST_FACTOR``), which caps it at a few percent of one core. Only the
        very first scrape waits for it.
        """
        with self._lock:
            first = self._states_at < 0
            stale = self.m.clock() - self._states_at >= self._states_ttl
            start = stale and not self._states_busy
            if start:
                self._states_busy = True
        if start and first:
            self._refresh_states()
        elif start:
            threading.Thread(
                target=self._refresh_states, name="stamen-metrics-states", daemon=True
            ).start()
        return self._states

    def _refresh_states(self) -> None:
        try:
            t0 = time.perf_counter()
            states = self.m.services.reader.state_counts()
            took = time.perf_counter() - t0
            with self._lock:
                self._states = states
                self._states_at = self.m.clock()
                self._states_ttl = max(STATE_CACHE_SECONDS, took * STATE_COST_FACTOR)
        except Exception:
            log.exception("Counting tasks by state failed")
        finally:
            with self._lock:
                self._states_busy = False

    def _exporter_gauges(
        self, workers: Mapping[str, Mapping[str, Any]], alive: Mapping[str, bool]
    ) -> Iterator[Metric]:
        up: dict[str, float] = {}
        active: dict[str, float] = {}
        for name, worker in workers.items():
            host = node_host(name)
            # celery-exporter keys by host; several nodes on one host add up.
            up[host] = max(up.get(host, 0.0), 1.0 if alive[name] else 0.0)
            count = float(worker.get("active") or 0) if alive[name] else 0.0
            active[host] = active.get(host, 0.0) + count
        fam = GaugeMetricFamily(
            "celery_worker_up",
            "Indicates if a worker has recently sent a heartbeat.",
            labels=["hostname"],
        )
        for host, value in sorted(up.items()):
            fam.add_metric([host], value)
        yield fam
        fam = GaugeMetricFamily(
            "celery_worker_tasks_active",
            "The number of tasks the worker is currently processing",
            labels=["hostname"],
        )
        for host, value in sorted(active.items()):
            fam.add_metric([host], value)
        yield fam


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))


class Metrics:
    """Everything ``/metrics`` serves for one app; built by the web app, fed by ingest."""

    def __init__(self, services: Services, clock: Callable[[], float] = time.time) -> None:
        settings = services.settings
        self.services = services
        self.clock = clock
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.flower = FlowerMetrics(self.registry, settings.task_runtime_metric_buckets)
        self.exporter = (
            ExporterMetrics(self.registry)
            if getattr(settings, "celery_exporter_metrics", False)
            else None
        )
        self.queue_cache = _QueueCache(services)
        self.collector = ScrapeCollector(self)
        self.registry.register(self.collector)
        self._observe_lock = threading.Lock()

    def attach(self) -> None:
        """Start receiving committed batches from ingest."""
        observers = self.services.ingester.observers
        if self.observe not in observers:
            observers.append(self.observe)

    def observe(self, events: list[Mapping[str, Any]], batch: Batch) -> None:
        """Ingest observer: runs in the flush thread after each commit.

        Backfilled events (made up from the result backend) are left out: these series
        count events heard from workers, and their gauges would move for tasks this
        process never saw start."""
        events = [e for e in events if e.get("stamen_backfilled") is not True]
        with self._observe_lock:
            self.flower.observe(events, batch.tasks)
            seen = self.queue_cache.seen
            if len(seen) < MAX_SEEN_QUEUES:
                seen.update(
                    str(e["queue"])
                    for e in events
                    if e.get("type") == "task-sent" and e.get("queue")
                )
            if self.exporter is not None:
                self.exporter.observe(events, batch.tasks)

    def purge_offline_workers(self, known: Mapping[str, Mapping[str, Any]]) -> int:
        """Flower's purge on scrape (spec 9.1) against the stored workers ``known``; returns
        how many workers were purged."""
        threshold = self.services.settings.purge_offline_workers
        if threshold is None:  # 0 is set: every offline worker goes at once
            return 0
        now = self.clock()
        purged = 0
        for name in self.flower.label_workers():
            worker = known.get(name)
            if worker is not None:
                if worker_alive(worker, now):
                    continue
                beats = worker.get("heartbeats") or []
                last_seen = beats[-1] if beats else worker.get("timestamp")
                if last_seen is not None and now - float(last_seen) < threshold:
                    continue
            self.flower.remove_worker(name)
            purged += 1
        if purged:
            log.debug("Purged metrics for %d offline workers", purged)
        return purged

    def sync_worker_online(self, known: Mapping[str, Mapping[str, Any]]) -> None:
        """Bring ``flower_worker_online`` in line with the shared history (``known``, the
        stored workers).

        The gauge follows the events this instance ingested, so with several instances a
        standby never set it and a new leader kept what it last saw. The store knows what
        every instance heard: a worker alive there is 1, one whose heartbeats an offline
        event cleared is 0. A worker whose heartbeats merely ran out (killed silently) is
        left as the events set it, as Flower leaves it, and one heard of only through task
        events (no ``sw_ident``, which worker events carry) gets no series, as in Flower.
        """
        now = self.clock()
        gauge = self.flower.worker_online
        for name, worker in known.items():
            if not worker.get("sw_ident"):
                continue
            if worker_alive(worker, now):
                gauge.labels(name).set(1)
            elif not worker.get("heartbeats"):
                gauge.labels(name).set(0)

    def render(self) -> bytes:
        """The exposition text; blocking (it queries the store), so call it in a thread."""
        known = self.services.reader.workers()  # one read serves both
        self.sync_worker_online(known)
        self.purge_offline_workers(known)
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """What ``GET /metrics`` returns: queue lengths refreshed, then the text."""
        await self.queue_cache.refresh()
        return await asyncio.to_thread(self.render)
