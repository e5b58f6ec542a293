"""The Redis fast path receives exactly what kombu's EventReceiver receives.

Celery's own ``EventDispatcher`` publishes a varied stream of events, one per message and
in 24-event batches as a worker with ``buffer_group=['task']`` sends them. A kombu
``EventReceiver`` and a :class:`RedisEventStream` listen at the same time, each with an app
of its own, and must yield the same events in the same order, field by field, type by type,
key order included. Only ``local_received`` (the receiving moment) may differ.

The Lamport clock is compared too: each receiver has its own app and therefore its own
``app.clock``, starting at 0 and adjusted by the same events in the same order, so the
``clock`` Celery writes into ``task-sent`` events (the receiver's clock, not the client's)
must come out the same on both sides.

Also here: the subscription under each Redis transport option that names channels
(db number, ``global_keyprefix``, ``fanout_prefix``, ``fanout_patterns``), TLS and unix
sockets, the wake-up broadcast, and the receiver thread (choice of path, stop, reconnect).
Shared Redis databases 11 and 12 only; throw-away servers for TLS, sockets and reconnects.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import math
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.events.event import Event
from celery.utils.time import utcoffset
from kombu import Connection

from stamen.events.receiver import EventReceiverThread
from stamen.events.redis_fast import RedisEventStream, unsupported_reason
from stamen.health import Health
from tests.integration.conftest import wait_until
from tests.integration.servers import make_tls_files, start_redis

pytestmark = pytest.mark.integration

SHARED = "redis://127.0.0.1:6379"


def make_app(broker: str, **conf: Any) -> Celery:
    app = Celery(f"itest-fast-{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    app.conf.update(conf)
    return app


def strict(value: Any) -> Any:
    """Equal only if identical: types (1 vs 1.0 vs True), float bits, key order."""
    t = type(value)
    if t is dict:
        return ("dict", [(k, strict(v)) for k, v in value.items()])
    if t in (list, tuple):
        return (t.__name__, [strict(v) for v in value])
    if t is float:
        return ("float", repr(value))
    return (t.__name__, repr(value))


# ---------------------------------------------------------------------------------------
# The two receivers.


class KombuSide:
    """Celery's EventReceiver consuming in a thread (what Flower does)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as conn:
                self._receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
                for _ in self._receiver.consume(safety_interval=0.2, wakeup=False):
                    pass
        except BaseException as exc:
            self.error = exc

    def start(self) -> KombuSide:
        self._thread.start()
        return self

    def stop(self) -> None:
        wait_until(lambda: self._receiver is not None or self.error, 10, what="kombu receiver")
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)


class FastSide:
    """RedisEventStream in a thread."""

    def __init__(self, app: Celery, *, wakeup: bool = False) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self.conn = app.connection_for_read()
        self.conn.connect()
        self.stream = RedisEventStream(app, self.conn, self.events.append, wakeup=wakeup)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.stream.run(self._stop.is_set)
        except BaseException as exc:
            self.error = exc

    def start(self) -> FastSide:
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop; returns how long the loop took to notice."""
        started = time.monotonic()
        self._stop.set()
        self._thread.join(10)
        took = time.monotonic() - started
        self.conn.release()
        return took


def pubsub_subscribers(client: redis.Redis, db: int) -> int:
    return sum(
        1
        for c in client.client_list(_type="pubsub")
        if c.get("db") == str(db) and int(c.get("psub", 0))
    )


@contextlib.contextmanager
def both_receivers(
    broker: str, db: int, admin: redis.Redis, **conf: Any
) -> Iterator[tuple[KombuSide, FastSide]]:
    """Both receivers subscribed (checked in Redis) before anything is published."""
    before = pubsub_subscribers(admin, db)
    kombu_side = KombuSide(make_app(broker, **conf)).start()
    fast_side = FastSide(make_app(broker, **conf)).start()
    try:
        wait_until(
            lambda: pubsub_subscribers(admin, db) >= before + 2,
            30,
            interval=0.05,
            what="both receivers subscribed",
        )
        yield kombu_side, fast_side
    finally:
        fast_side.stop()
        kombu_side.stop()


# ---------------------------------------------------------------------------------------
# What gets published.

UNICODE_ARGS = "('héllo wörld', '☃ snow', '😀', 'ÆØÅ', 'ß∂ƒ©', '\\x00\\x1b[31m', 'tab\\there')"
NESTED_KWARGS = "{'a': {'b': [1, 2, {'c': None, 'd': (3, 4)}]}, 'e': 'ü', 'f': 1.5e-300}"
LARGE_ARGS = "(" + ", ".join(f"'{i:08d}-{'x' * 40}'" for i in range(3000)) + ",)"  # ~150 KB
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "celery/app/trace.py", line 453, in trace_task\n'
    "    R = retval = fun(*args, **kwargs)\n"
    "ValueError: ungültig: ☃\n"
)
SW = {"sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux"}


def publish_variety(app: Celery, tasks: int = 80) -> int:
    """Publish a realistic mixed stream through Celery's dispatchers; returns the count.

    - a client sends ``task-sent`` one per message;
    - worker 1 buffers task events 24 to a message (``buffer_group=['task']``), as
      ``celery worker`` does, and sends worker events one per message;
    - worker 2 sends everything one per message and reports ``utcoffset`` -5 (a host on
      US Eastern time), so the receivers must adjust its timestamps;
    - odd events exercise the fallbacks: typed values (kombu's ``__type__``), an integer
      beyond 64 bits, NaN, and escaped keys.
    """
    sent = 0
    with app.connection_for_write() as conn:
        client = app.events.Dispatcher(conn, hostname="client@itest-host")
        w1 = app.events.Dispatcher(
            conn, hostname="celery@itest-wörker-1", buffer_group=["task"], buffer_limit=24
        )
        w2 = app.events.Dispatcher(conn, hostname="celery@itest-east")

        def east_event(type: str, **fields: Any) -> dict[str, Any]:
            # The dispatcher writes its host's utcoffset(); claim US Eastern instead.
            fields["utcoffset"] = -5
            return Event(type, **fields)

        def send(dispatcher: Any, kind: str, **fields: Any) -> None:
            nonlocal sent
            if dispatcher is w2:
                fields["Event"] = east_event
            dispatcher.send(kind, **fields)
            sent += 1

        for w in (w1, w2):
            send(w, "worker-online", freq=2.0, active=0, processed=0, loadavg=[0.1, 0.1, 0.1], **SW)
        for i in range(tasks):
            worker = w1 if i % 2 == 0 else w2
            task_id = str(uuid.uuid4())
            args = LARGE_ARGS if i == 7 else UNICODE_ARGS
            send(
                client,
                "task-sent",
                uuid=task_id,
                name="itest.tasks.process",
                args=args,
                kwargs=NESTED_KWARGS,
                retries=0,
                eta=None,
                expires=None,
                queue="celery",
                exchange="",
                routing_key="celery",
                root_id=task_id,
                parent_id=None,
            )
            send(
                worker,
                "task-received",
                uuid=task_id,
                name="itest.tasks.process",
                args=args,
                kwargs=NESTED_KWARGS,
                root_id=task_id,
                parent_id=None,
                retries=0,
                eta=None,
                expires=None,
            )
            send(worker, "task-started", uuid=task_id)
            outcome = i % 5
            if outcome == 0:
                send(worker, "task-failed", uuid=task_id, exception="ValueError('☃')",
                     traceback=TRACEBACK)  # fmt: skip
            elif outcome == 1:
                send(worker, "task-retried", uuid=task_id, exception="Retry in 5s",
                     traceback=TRACEBACK)  # fmt: skip
            elif outcome == 2:
                send(worker, "task-revoked", uuid=task_id, terminated=True, signum="SIGTERM",
                     expired=False)  # fmt: skip
            else:
                send(worker, "task-succeeded", uuid=task_id, result="{'ok': True, 'n': None}",
                     runtime=0.001 * i)  # fmt: skip
            if i % 20 == 0:
                for w in (w1, w2):
                    send(w, "worker-heartbeat", freq=2.0, active=i % 4, processed=i,
                         loadavg=[0.42, 0.37, 0.31], **SW)  # fmt: skip
        # Odd but legal: kombu's JSON writes these in ways only its own loader reads back.
        send(w1, "task-custom", uuid=str(uuid.uuid4()), when=dt.datetime(2024, 5, 6, 7, 8, 9),
             amount=Decimal("12.50"), token=uuid.UUID(int=7), blob=b"\x00\xff")  # fmt: skip
        send(w2, "task-custom", uuid=str(uuid.uuid4()), big=2**70, neg=-(2**64), score=math.nan)
        send(w2, "worker-custom", note={"\u005f_type__": "not really"}, inf=math.inf)
        w1.flush()  # a worker flushes its buffer when idle
        for w in (client, w1, w2):
            w.close()
    return sent


def assert_same_events(kombu_events: list[dict[str, Any]], fast_events: list[dict]) -> None:
    assert len(fast_events) == len(kombu_events)
    for i, (k, f) in enumerate(zip(kombu_events, fast_events, strict=True)):
        assert "local_received" in k and "local_received" in f
        k = {key: v for key, v in k.items() if key != "local_received"}
        f = {key: v for key, v in f.items() if key != "local_received"}
        assert strict(f) == strict(k), f"event {i} differs:\nkombu: {k}\nfast:  {f}"


# ---------------------------------------------------------------------------------------
# Equivalence on the shared Redis.


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(SHARED)
    yield client
    client.close()


@pytest.mark.parametrize(
    ("db", "options"),
    [
        (11, {}),
        (12, {"global_keyprefix": "stamen-itest:"}),
        (12, {"fanout_patterns": False}),
        (11, {"fanout_prefix": "/stamen-itest-fanout."}),
    ],
    ids=["defaults", "global_keyprefix", "no_fanout_patterns", "fanout_prefix_string"],
)
def test_fast_path_yields_exactly_what_kombu_yields(
    admin: redis.Redis, db: int, options: dict[str, Any]
) -> None:
    broker = f"{SHARED}/{db}"
    conf = {"broker_transport_options": options}
    with both_receivers(broker, db, admin, **conf) as (kombu_side, fast_side):
        sent = publish_variety(make_app(broker, **conf))
        wait_until(
            lambda: len(kombu_side.events) >= sent and len(fast_side.events) >= sent,
            60,
            what=f"{sent} events on both sides "
            f"(kombu {len(kombu_side.events)}, fast {len(fast_side.events)})",
        )
        time.sleep(0.3)  # anything beyond `sent` would be a bug: give it a moment to show
    assert kombu_side.error is None and fast_side.error is None
    assert len(kombu_side.events) == sent
    assert_same_events(kombu_side.events, fast_side.events)

    # The stream really was what it claims: batches, adjusted clocks and timestamps.
    events = fast_side.events
    east = [e for e in events if e["hostname"] == "celery@itest-east"]
    assert east and all(e["utcoffset"] == -5 for e in east)
    # Worker 2 claims utcoffset -5 while stamping real time: Celery shifts its timestamps
    # by (5 + our own offset) hours, on both paths.
    shift = (5 + utcoffset()) * 3600
    assert all(abs(e["timestamp"] - e["local_received"] - shift) < 60 for e in east)
    sent_events = [e for e in events if e["type"] == "task-sent"]
    assert len({e["clock"] for e in sent_events}) == len(sent_events)  # the receiver's clock
    assert any(type(e.get("when")) is dt.datetime for e in events)  # kombu's __type__ hook
    assert any(e.get("big") == 2**70 and type(e["big"]) is int for e in events)
    assert any(len(e.get("args") or "") > 100_000 for e in events)


def test_subscription_pattern_is_kombus(admin: redis.Redis) -> None:
    """The pattern we PSUBSCRIBE is the one kombu's channel subscribes for the same queue."""
    for options in (
        {},
        {"global_keyprefix": "stamen-itest:"},
        {"fanout_patterns": False},
        {"fanout_prefix": False},
        {"fanout_prefix": "/custom."},
    ):
        app = make_app(f"{SHARED}/12", broker_transport_options=options)
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            receiver = app.events.Receiver(channel)
            queue = receiver.queue(channel)
            queue.declare()
            try:
                get_topics = getattr(channel, "_get_subscribe_topics", None)
                topics = (
                    get_topics(queue.name)
                    if get_topics
                    else [channel._get_subscribe_topic(queue.name)]
                )
                stream = RedisEventStream(app, conn, lambda e: None)
                assert [stream.pattern] == [channel.global_keyprefix + t for t in topics]
            finally:
                queue.delete()


def test_wakeup_broadcasts_heartbeat_request(admin: redis.Redis) -> None:
    """On connect the fast path asks every worker for a heartbeat, as Celery's receiver."""
    listener = admin.pubsub()
    listener.psubscribe("/11.celery.pidbox*")
    listener.get_message(timeout=1)
    side = FastSide(make_app(f"{SHARED}/11"), wakeup=True).start()
    try:
        methods = []
        deadline = time.monotonic() + 10
        while "heartbeat" not in methods and time.monotonic() < deadline:
            m = listener.get_message(timeout=0.5)
            if m and m["type"] == "pmessage":
                envelope = json.loads(m["data"])
                methods.append(json.loads(base64.b64decode(envelope["body"]))["method"])
        assert "heartbeat" in methods
    finally:
        side.stop()
        listener.close()


def test_stop_is_noticed_quickly(admin: redis.Redis) -> None:
    side = FastSide(make_app(f"{SHARED}/11")).start()
    wait_until(lambda: side.stream._redis is not None, 10, what="subscribed")
    time.sleep(0.3)
    assert side.stop() < 1.0  # poll_interval is 0.2 s


def test_which_brokers_get_the_fast_path() -> None:
    def reason(url: str, **conf: Any) -> str | None:
        app = make_app(url, **conf)
        return unsupported_reason(app, Connection(url))

    assert reason("redis://127.0.0.1:6379/11") is None
    assert reason("rediss://127.0.0.1:6379/11") is None
    assert reason("redis+socket:///tmp/redis.sock") is None
    assert "Sentinel" in (reason("sentinel://127.0.0.1:26379") or "")
    assert "not Redis" in (reason("amqp://guest@127.0.0.1//") or "")
    assert "not Redis" in (reason("memory://") or "")
    assert "serializer" in (
        reason("redis://127.0.0.1:6379/11", event_serializer="pickle", accept_content=["pickle"])
        or ""
    )


# ---------------------------------------------------------------------------------------
# TLS and unix sockets: the connection is made from kombu's own parameters.


def _small_equivalence(broker: str, admin: redis.Redis, **conf: Any) -> None:
    with both_receivers(broker, 0, admin, **conf) as (kombu_side, fast_side):
        sent = publish_variety(make_app(broker, **conf), tasks=10)
        wait_until(
            lambda: len(kombu_side.events) >= sent and len(fast_side.events) >= sent,
            30,
            what="events on both sides",
        )
    assert_same_events(kombu_side.events, fast_side.events)


def test_rediss_with_ca_verification(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    with start_redis(tmp_path, tls=tls) as server, server.client() as admin:
        use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tls.ca_cert)}
        _small_equivalence(server.url, admin, broker_use_ssl=use_ssl)


def test_redis_unix_socket(tmp_path: Path) -> None:
    with start_redis(tmp_path, unix_socket=True) as server, server.client() as admin:
        _small_equivalence(server.socket_url, admin)


def test_silent_connection_is_checked_with_pings(tmp_path: Path) -> None:
    """An idle subscription is PINGed every health_check_interval; no answer is an error."""
    with start_redis(tmp_path) as server, server.client() as admin:
        app = make_app(server.url, broker_transport_options={"health_check_interval": 1})
        side = FastSide(app).start()
        try:
            wait_until(lambda: pubsub_subscribers(admin, 0) == 1, 10, what="subscribed")
            pings = admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0)
            time.sleep(2.5)  # idle for more than two intervals: answered PINGs keep it alive
            assert side.error is None and side._thread.is_alive()
            assert admin.info("commandstats")["cmdstat_ping"]["calls"] >= pings + 1
            admin.execute_command("CLIENT", "PAUSE", "5000", "ALL")  # the server goes silent
            wait_until(lambda: side.error is not None, 10, what="the silence noticed")
            assert "PING" in str(side.error)
        finally:
            side.stop()


# ---------------------------------------------------------------------------------------
# The receiver thread: path choice, stop, reconnect.


class FakeIngester:
    """What the receiver and flush threads need of an Ingester: ``pending``, the batch
    bounds and ``flush`` (no bound on pending events)."""

    batch_size = 2000
    max_batch = 10_000
    full = False

    def __init__(self) -> None:
        self.pending: deque[Any] = deque()
        self.stored: list[Any] = []

    def flush(self, limit: int | None = None) -> int:
        n = len(self.pending) if limit is None else min(limit, len(self.pending))
        self.stored.extend(self.pending.popleft() for _ in range(n))
        return n


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "kombu"])
def test_receiver_thread_stores_everything_it_received_on_stop(
    admin: redis.Redis, fast_path: bool
) -> None:
    app = make_app(f"{SHARED}/11")
    ingester = FakeIngester()
    health = Health()
    before = pubsub_subscribers(admin, 11)
    thread = EventReceiverThread(app, ingester, health, commit_interval=5.0, fast_path=fast_path)  # type: ignore[arg-type]
    thread.start()
    try:
        wait_until(lambda: pubsub_subscribers(admin, 11) > before, 15, what="subscribed")
        assert thread.active_path == ("redis-fast" if fast_path else "kombu")
        sent = publish_variety(make_app(f"{SHARED}/11"), tasks=30)
        wait_until(
            lambda: len(ingester.pending) + len(ingester.stored) >= sent, 30, what="received"
        )
        assert health.broker_ok is True
    finally:
        started = time.monotonic()
        thread.stop()
        stop_took = time.monotonic() - started
    # commit_interval is 5 s: only the stop's own flush can have stored them.
    assert [e["type"] for e in ingester.stored].count("task-sent") == 30
    assert len(ingester.stored) == sent and not ingester.pending
    assert stop_took < 2.0
    assert thread.active_path is None


def test_receiver_thread_reconnects_after_losing_redis(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server, server.client() as admin:
        app = make_app(server.url)
        ingester = FakeIngester()
        health = Health()
        thread = EventReceiverThread(app, ingester, health, commit_interval=0.1)  # type: ignore[arg-type]
        thread.start()
        try:
            wait_until(lambda: pubsub_subscribers(admin, 0) == 1, 15, what="subscribed")
            assert thread.active_path == "redis-fast"
            first = publish_variety(make_app(server.url), tasks=5)
            wait_until(lambda: len(ingester.stored) >= first, 15, what="first batch")

            admin.client_kill_filter(_type="pubsub")
            wait_until(lambda: health.broker_ok is False, 10, what="broker reported down")
            wait_until(lambda: pubsub_subscribers(admin, 0) == 1, 15, what="resubscribed")
            wait_until(lambda: health.broker_ok is True, 10, what="broker reported up")
            assert thread.active_path == "redis-fast"
            second = publish_variety(make_app(server.url), tasks=5)
            wait_until(lambda: len(ingester.stored) >= first + second, 15, what="second batch")
        finally:
            thread.stop()
        assert len(ingester.stored) == first + second
