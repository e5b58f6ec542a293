"""Queue lengths against real brokers: the shared Redis and RabbitMQ, plus throw-away Redis
servers for TLS, Unix sockets and Sentinel.

Messages are published with Celery's own ``send_task`` to queues unique to each test, so no
worker consumes them and kombu, not the test, decides which priority list each one lands in.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from stamen.cluster import QueueLengths, UnsupportedBroker
from tests.integration.servers import (
    RedisServer,
    TlsFiles,
    free_port,
    make_tls_files,
    start_redis,
    start_sentinel,
)

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("STAMEN_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("STAMEN_TEST_AMQP", "pyamqp://guest:guest@127.0.0.1:5672//")
MANAGEMENT_URL = "http://127.0.0.1:15672/api"
SEP = "\x06\x16"


def unique(label: str) -> str:
    return f"stamen-test-{label}-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def celery_app(broker: str, **conf: Any) -> Iterator[Celery]:
    app = Celery(broker=broker, set_as_current=False)
    app.conf.update(conf)
    try:
        yield app
    finally:
        app.close()


def publish(app: Celery, queue: str, priorities: list[int]) -> None:
    for priority in priorities:
        app.send_task("stamen_test.never_runs", queue=queue, priority=priority)


@contextlib.contextmanager
def queue_lengths(app: Celery, broker_api: str | None = None) -> Iterator[QueueLengths]:
    lengths = QueueLengths(app, broker_api)
    try:
        yield lengths
    finally:
        lengths.close()


def delete_keys(client: redis.Redis, pattern: str) -> None:
    keys = list(client.scan_iter(match=pattern))
    if keys:
        client.delete(*keys)


# --------------------------------------------------------------------------------------------
# Redis: shared server
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("db", "options", "expected_keys"),
    [
        # kombu's defaults: priorities 0..9 land in steps 0, 3, 6, 9.
        (0, {}, {"": 2, f"{SEP}3": 2, f"{SEP}6": 1, f"{SEP}9": 3}),
        # Custom steps and separator, on another database.
        (
            3,
            {"priority_steps": list(range(10)), "sep": ":"},
            {"": 2, ":3": 1, ":5": 1, ":7": 1, ":9": 3},
        ),
    ],
    ids=["default-steps", "custom-steps-sep-db3"],
)
def test_redis_sums_priority_lists_under_global_keyprefix(
    db: int, options: dict[str, Any], expected_keys: dict[str, int]
) -> None:
    prefix, queue = unique("prefix") + ":", unique("q")
    url = REDIS_URL.rsplit("/", 1)[0] + f"/{db}"
    transport_options = {"global_keyprefix": prefix, **options}
    with (
        celery_app(url, broker_transport_options=transport_options) as app,
        redis.Redis.from_url(url) as raw,
    ):
        try:
            publish(app, queue, [0, 0, 3, 5, 7, 9, 9, 9])
            # The messages really are spread over several prefixed priority lists...
            for suffix, count in expected_keys.items():
                assert raw.llen(f"{prefix}{queue}{suffix}") == count, repr(suffix)
            assert raw.llen(queue) == 0
            # ... and the lengths add them up, in the requested order.
            with queue_lengths(app) as lengths:
                assert lengths.transport == "redis"
                result = lengths.lengths([queue, "stamen-test-absent"])
            assert result == [
                {"name": queue, "messages": 8},
                {"name": "stamen-test-absent", "messages": 0},
            ]
        finally:
            delete_keys(raw, f"{prefix}*")


# --------------------------------------------------------------------------------------------
# Redis: throw-away servers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[RedisServer]:
    with start_redis(tmp_path_factory.mktemp("tls-redis"), tls=tls_files) as server:
        yield server


def test_redis_client_is_reused_and_thread_safe(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server, celery_app(server.url) as app, server.client() as raw:
        publish(app, "q1", [0] * 3)
        publish(app, "q2", [9] * 5)
        raw.ping()
        before = int(raw.info("stats")["total_connections_received"])
        with queue_lengths(app) as lengths:
            results: list[Any] = []

            def ask() -> None:
                for _ in range(5):
                    results.append(lengths.lengths(["q1", "q2"]))

            threads = [threading.Thread(target=ask) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        after = int(raw.info("stats")["total_connections_received"])
    assert results == [[{"name": "q1", "messages": 3}, {"name": "q2", "messages": 5}]] * 40
    # One client and its pool: at most one connection per concurrent caller, not per call.
    assert 1 <= after - before <= 8


def test_redis_errors_propagate(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    with celery_app(server.url) as app, queue_lengths(app) as lengths:
        assert lengths.lengths(["q"]) == [{"name": "q", "messages": 0}]
        server.stop()
        with pytest.raises(redis.ConnectionError):
            lengths.lengths(["q"])


def test_rediss_verifies_against_ca(tls_redis: RedisServer, tls_files: TlsFiles) -> None:
    queue = unique("tls")
    use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tls_files.ca_cert)}
    with celery_app(tls_redis.url, broker_use_ssl=use_ssl) as app, queue_lengths(app) as lengths:
        publish(app, queue, [0, 6, 9])
        assert lengths.lengths([queue]) == [{"name": queue, "messages": 3}]


def test_rediss_without_ca_fails_verification(tls_redis: RedisServer) -> None:
    use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    with (
        celery_app(tls_redis.url, broker_use_ssl=use_ssl) as app,
        queue_lengths(app) as lengths,
        pytest.raises(redis.ConnectionError, match="certificate verify failed"),
    ):
        lengths.lengths(["q"])


def test_redis_scheme_with_broker_use_ssl_speaks_tls(tls_redis: RedisServer) -> None:
    queue = unique("tls")
    url = tls_redis.url.replace("rediss://", "redis://")
    use_ssl = {"ssl_cert_reqs": ssl.CERT_NONE}
    with celery_app(url, broker_use_ssl=use_ssl) as app, queue_lengths(app) as lengths:
        publish(app, queue, [3, 3])
        assert lengths.lengths([queue]) == [{"name": queue, "messages": 2}]


def test_redis_unix_socket_honours_virtual_host(tmp_path: Path) -> None:
    with start_redis(tmp_path, unix_socket=True) as server:
        url = f"{server.socket_url}?virtual_host=2"
        with celery_app(url) as app, queue_lengths(app) as lengths, server.client(db=2) as raw:
            publish(app, "sockq", [0, 9, 9, 9])
            assert raw.llen("sockq") == 1  # kombu itself put them in db 2
            assert lengths.lengths(["sockq"]) == [{"name": "sockq", "messages": 4}]


def test_sentinel_tries_each_host_and_honours_db(tmp_path: Path) -> None:
    with (
        start_redis(tmp_path) as master,
        start_sentinel(tmp_path, master, "stamenmaster") as sentinel,
        master.client(db=2) as raw,
    ):
        options = {"master_name": "stamenmaster"}
        with celery_app(f"{sentinel.url}/2", broker_transport_options=options) as app:
            publish(app, "sentq", [0, 0, 5])
        assert raw.llen("sentq") == 2
        # The first sentinel is down: Flower would give up; we ask the next one.
        dead = f"sentinel://127.0.0.1:{free_port()}/2"
        with (
            celery_app(f"{dead};{sentinel.url}/2", broker_transport_options=options) as app,
            queue_lengths(app) as lengths,
        ):
            assert lengths.lengths(["sentq"]) == [{"name": "sentq", "messages": 3}]


# --------------------------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------------------------


@pytest.fixture
def amqp_app() -> Iterator[Celery]:
    with celery_app(AMQP_URL) as app:
        try:
            with app.connection() as conn:
                conn.ensure_connection(max_retries=0)
        except Exception as exc:
            pytest.skip(f"RabbitMQ not reachable at {AMQP_URL}: {exc}")
        yield app


@contextlib.contextmanager
def amqp_queues(app: Celery, *names: str) -> Iterator[None]:
    """Delete the named queues, and the same-named exchanges Celery declared, afterwards."""
    try:
        yield
    finally:
        with app.connection() as conn:
            channel = conn.channel()
            for name in names:
                for delete in ("queue_delete", "exchange_delete"):
                    with contextlib.suppress(Exception):  # a 404 closes the channel
                        getattr(channel, delete)(name)
                    if not channel.is_open:
                        channel = conn.channel()
            channel.close()


def test_amqp_passive_declare_counts_messages_and_consumers(amqp_app: Celery) -> None:
    waiting, consumed, missing = unique("waiting"), unique("consumed"), unique("missing")
    with amqp_queues(amqp_app, waiting, consumed):
        publish(amqp_app, waiting, [0] * 7)
        with amqp_app.connection() as conn:
            channel = conn.channel()
            channel.queue_declare(consumed, auto_delete=False)
            channel.basic_consume(consumed, callback=lambda message: None)
            with queue_lengths(amqp_app) as lengths:
                assert lengths.transport == "amqp"
                # The missing queue's 404 closes the channel; the next queue still works.
                result = lengths.lengths([missing, waiting, consumed])
                assert result == [
                    {"name": waiting, "messages": 7, "consumers": 0},
                    {"name": consumed, "messages": 0, "consumers": 1},
                ]
                # A dropped connection is replaced on the next call.
                lengths._backend._conn.connection.sock.close()  # type: ignore[union-attr]
                assert lengths.lengths([waiting])[0]["messages"] == 7


def test_amqp_broker_down_raises_operational_error() -> None:
    from kombu.exceptions import OperationalError

    url = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    with celery_app(url) as app, queue_lengths(app) as lengths:
        started = time.monotonic()
        with pytest.raises(OperationalError):
            lengths.lengths(["q"])
        assert time.monotonic() - started < 5


def _management_get(path: str) -> Any:
    token = base64.b64encode(b"guest:guest").decode()
    request = urllib.request.Request(
        f"{MANAGEMENT_URL}/{path}", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=2) as response:
        return json.load(response)


def _management_up() -> bool:
    try:
        _management_get("overview")
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def management_api() -> str:
    """The management API base URL, enabling ``rabbitmq_management`` if needed (or skip)."""
    if _management_up():
        return MANAGEMENT_URL
    plugins = shutil.which("rabbitmq-plugins")
    if plugins is None:
        pytest.skip("RabbitMQ management API not reachable and rabbitmq-plugins not installed")
    try:
        subprocess.run(
            [plugins, "enable", "rabbitmq_management"], check=True, capture_output=True, timeout=90
        )
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"could not enable rabbitmq_management: {exc} {detail.decode()[-500:]}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _management_up():
            return MANAGEMENT_URL
        time.sleep(0.2)  # polling interval, bounded by the deadline
    pytest.skip("rabbitmq_management enabled but the API did not come up on :15672 within 60 s")


#: Fields of a management API queue object Flower's users read.
MANAGEMENT_FIELDS = {"consumers", "messages_ready", "messages_unacknowledged", "durable"}


@pytest.fixture(scope="module")
def management_queue(management_api: str) -> Iterator[str]:
    """A queue with 4 waiting messages, once the management API's statistics show them.

    RabbitMQ refreshes queue statistics every 5 s (``collect_statistics_interval``), so the
    wait is paid once per module, not per test.
    """
    queue = unique("mgmt")
    with celery_app(AMQP_URL) as app, amqp_queues(app, queue):
        publish(app, queue, [0] * 4)
        deadline = time.monotonic() + 20

        def shown() -> bool:
            # The counts and the rest of the statistics ("consumers" among them) do not
            # always arrive in the same refresh.
            found = _management_get(f"queues/%2F/{queue}")
            return found.get("messages") == 4 and set(found) >= MANAGEMENT_FIELDS

        while not shown():
            if time.monotonic() > deadline:
                pytest.fail("the management API never showed the 4 messages")
            time.sleep(0.2)  # polling interval, bounded by the deadline
        yield queue


@pytest.mark.parametrize("suffix", ["", "/"], ids=["no-trailing-slash", "trailing-slash"])
def test_amqp_management_api_returns_management_objects(
    amqp_app: Celery, management_queue: str, suffix: str
) -> None:
    # Flower's urljoin dropped the '/api' of a base without a trailing slash; both work here.
    api = "http://guest:guest@127.0.0.1:15672/api" + suffix
    with queue_lengths(amqp_app, api) as lengths:
        result = lengths.lengths([management_queue, "stamen-test-absent"])
        assert lengths.lengths([management_queue]) == result  # the kept-alive connection
    assert [q["name"] for q in result] == [management_queue]
    assert result[0]["messages"] == 4
    assert result[0]["vhost"] == "/"
    assert set(result[0]) >= MANAGEMENT_FIELDS


def test_amqp_management_api_errors_are_logged_and_empty(
    amqp_app: Celery, management_api: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="stamen.cluster.queues")
    with queue_lengths(amqp_app, "http://guest:wrong@127.0.0.1:15672/api/") as lengths:
        assert lengths.lengths(["q"]) == []
    with queue_lengths(amqp_app, f"http://127.0.0.1:{free_port()}/api/") as lengths:
        assert lengths.lengths(["q"]) == []
    assert caplog.messages[0] == "RabbitMQ management API call failed: HTTP 401: Unauthorized"
    assert caplog.messages[1].startswith("RabbitMQ management API call failed: ")
    assert "refused" in caplog.messages[1]
    assert len(caplog.messages) == 2


# --------------------------------------------------------------------------------------------
# Unsupported
# --------------------------------------------------------------------------------------------


def test_memory_broker_is_unsupported() -> None:
    with celery_app("memory://") as app:
        lengths = QueueLengths(app)
        assert not lengths.supported
        with pytest.raises(UnsupportedBroker) as info:
            lengths.lengths(["celery"])
    assert str(info.value) == "'memory' broker is not supported"
