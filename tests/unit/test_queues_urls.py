"""Pure parts of queue-length monitoring: Redis key naming, broker URL parsing, management API
URLs and credentials, queue-name selection, the unsupported-broker message. No network."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu import Queue

from stamen.cluster.queues import (
    DEFAULT_SEP,
    QueueLengths,
    UnsupportedBroker,
    management_credentials,
    management_queues_url,
    management_ssl_context,
    parse_redis_db,
    redis_queue_keys,
    redis_target,
)


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery(broker="redis://localhost:6379/0", set_as_current=False)
    yield app
    app.close()


# -- Redis key naming -------------------------------------------------------------------------


def test_default_priority_keys() -> None:
    assert DEFAULT_SEP == "\x06\x16"
    assert redis_queue_keys("celery") == [
        "celery",
        "celery\x06\x163",
        "celery\x06\x166",
        "celery\x06\x169",
    ]


def test_custom_steps_sep_and_prefix() -> None:
    keys = redis_queue_keys("q", priority_steps=[0, 5, 5, 9], sep=":", prefix="app:")
    assert keys == ["app:q", "app:q:5", "app:q:9"]  # a repeated step is counted once


def test_steps_without_zero() -> None:
    assert redis_queue_keys("q", priority_steps=["2", "7"]) == [
        f"q{DEFAULT_SEP}2",
        f"q{DEFAULT_SEP}7",
    ]


# -- Redis URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "db"), [("", 0), ("/", 0), ("//", 0), ("/3", 3), ("3", 3), ("//4", 4)]
)
def test_parse_redis_db(path: str, db: int) -> None:
    assert parse_redis_db(path) == db


def test_parse_redis_db_rejects_non_integers_with_flowers_message() -> None:
    with pytest.raises(ValueError, match=r"^Database is int between 0 and limit - 1, not abc$"):
        parse_redis_db("/abc")


def test_plain_redis_defaults_and_timeouts() -> None:
    # kombu's as_uri() renders 'redis://' like this.
    target = redis_target(["redis://localhost:6379//"])
    assert target.kind == "tcp"
    assert target.kwargs == {
        "host": "localhost",
        "port": 6379,
        "db": 0,
        "username": None,
        "password": None,
        "socket_connect_timeout": 1.0,
        "socket_timeout": 2.0,
    }


def test_transport_options_override_timeouts() -> None:
    options = {"socket_connect_timeout": 0.25, "socket_timeout": 7}
    target = redis_target(["redis://h/1"], transport_options=options)
    assert target.kwargs["socket_connect_timeout"] == 0.25
    assert target.kwargs["socket_timeout"] == 7.0
    assert target.kwargs["port"] == 6379


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:p%40ss%3Aw@%3A%3A1:6380/3",  # kombu's as_uri() encodes an IPv6 host
        "redis://user:p%40ss%3Aw@[::1]:6380/3",
    ],
)
def test_credentials_and_ipv6_are_decoded(url: str) -> None:
    kwargs = redis_target([url]).kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("::1", 6380, 3)
    assert (kwargs["username"], kwargs["password"]) == ("user", "p@ss:w")


def test_rediss_is_tls_with_broker_use_ssl_merged() -> None:
    use_ssl = {"ssl_cert_reqs": "CERT_NONE", "ssl_ca_certs": "/ca.pem"}
    target = redis_target(["rediss://h:6390/2"], ssl_options=use_ssl)
    assert target.kind == "tls"
    assert target.kwargs["ssl"] is True
    assert target.kwargs["ssl_cert_reqs"] == ssl.CERT_NONE
    assert target.kwargs["ssl_ca_certs"] == "/ca.pem"
    assert redis_target(["rediss://h"]).kwargs["ssl"] is True


def test_redis_scheme_with_broker_use_ssl_is_tls() -> None:
    assert redis_target(["redis://h"], ssl_options=True).kind == "tls"
    assert redis_target(["redis://h"], ssl_options={}).kind == "tcp"  # falsy, as in Flower


def test_unix_socket() -> None:
    target = redis_target(["redis+socket://:secret@/run/redis/redis.sock?virtual_host=5"])
    assert target.kind == "socket"
    assert target.kwargs == {
        "unix_socket_path": "/run/redis/redis.sock",
        "password": "secret",
        "db": 5,
        "socket_timeout": 2.0,
    }
    assert redis_target(["redis+socket:///tmp/r.sock"]).kwargs["db"] == 0


def test_sentinel_uses_every_host_and_the_db() -> None:
    target = redis_target(
        ["sentinel://u:pw@s1:26380/2", "sentinel://s1:26380/2", "sentinel://s2/2"],
        transport_options={"master_name": "mymaster", "sentinel_kwargs": {"password": "sp"}},
        ssl_options={"ssl_cert_reqs": ssl.CERT_REQUIRED},
    )
    assert target.kind == "sentinel"
    assert target.master_name == "mymaster"
    assert target.sentinels == (("s1", 26380), ("s1", 26380), ("s2", 26379))
    assert target.kwargs["db"] == 2  # Flower ignored it
    assert (target.kwargs["username"], target.kwargs["password"]) == ("u", "pw")
    assert target.kwargs["ssl"] is True  # TLS to the master
    assert target.sentinel_kwargs == {
        "socket_connect_timeout": 1.0,
        "socket_timeout": 2.0,
        "password": "sp",
    }


def test_sentinel_requires_master_name() -> None:
    with pytest.raises(ValueError, match="'master_name' transport option must be specified"):
        redis_target(["sentinel://s1"])


# -- RabbitMQ management API ------------------------------------------------------------------


@pytest.mark.parametrize(
    "api",
    [
        "http://guest:guest@localhost:15672/api/",
        "http://guest:guest@localhost:15672/api",  # Flower's urljoin lost '/api' here
    ],
)
def test_management_url_keeps_the_base_path(api: str) -> None:
    assert management_queues_url(api, "/") == "http://localhost:15672/api/queues/%2F"


@pytest.mark.parametrize(
    ("vhost", "encoded"), [("/", "%2F"), ("", "%2F"), ("my/vh", "my%2Fvh"), ("a b", "a%20b")]
)
def test_management_url_encodes_the_vhost(vhost: str, encoded: str) -> None:
    url = management_queues_url("https://rabbit.example/prefix/api", vhost)
    assert url == f"https://rabbit.example/prefix/api/queues/{encoded}"


def test_management_url_ipv6_host() -> None:
    assert (
        management_queues_url("http://[::1]:15672/api/", "v") == "http://[::1]:15672/api/queues/v"
    )


def test_management_credentials() -> None:
    assert management_credentials("http://a%40b:p%2Fw@h/api/", "x", "y") == ("a@b", "p/w")
    assert management_credentials("http://h/api/", "broker", "secret") == ("broker", "secret")
    assert management_credentials("http://h/api/", None, None) == ("guest", "guest")


def test_management_tls_verifies_by_default() -> None:
    context = management_ssl_context(None)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize(
    "options",
    [
        {"ssl_cert_reqs": ssl.CERT_NONE},
        {"cert_reqs": ssl.CERT_NONE},
        {"cert_reqs": "CERT_NONE"},
        {"ssl_cert_reqs": "none"},
    ],
)
def test_management_tls_cert_none_disables_verification(options: dict[str, Any]) -> None:
    context = management_ssl_context(options)
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


# -- QueueLengths without I/O -----------------------------------------------------------------


def test_queue_names_union_of_active_queues(app: Celery) -> None:
    workers = {
        "w1": {"active_queues": [{"name": "x"}, {"name": "celery"}], "timestamp": 1.0},
        "w2": {"active_queues": [{"name": "c"}], "timestamp": 1.0},
        "w3": {"stats": {}, "timestamp": 1.0},  # never answered active_queues
    }
    assert QueueLengths(app).queue_names(workers) == ["c", "celery", "x"]


def test_queue_names_fall_back_to_configuration(app: Celery) -> None:
    app.conf.task_default_queue = "dflt"
    app.conf.task_queues = [Queue("b"), Queue("a")]
    assert QueueLengths(app).queue_names({}) == ["a", "b", "dflt"]
    app.conf.task_queues = None
    assert QueueLengths(app).queue_names({"w": {"timestamp": 1.0}}) == ["dflt"]


@pytest.mark.parametrize(
    ("url", "scheme", "transport"),
    [
        ("redis://h", "redis", "redis"),
        ("rediss://h", "rediss", "redis"),
        ("redis+socket:///tmp/r.sock", "redis+socket", "redis"),
        ("sentinel://h", "sentinel", "redis"),
        ("pyamqp://h//", "amqp", "amqp"),
        ("amqps://h//", "amqps", "amqp"),
    ],
)
def test_transport_detection_without_connecting(url: str, scheme: str, transport: str) -> None:
    app = Celery(broker=url, set_as_current=False)
    lengths = QueueLengths(app)
    assert (lengths.scheme, lengths.transport, lengths.supported) == (scheme, transport, True)


@pytest.mark.parametrize(
    ("url", "transport"), [("memory://", "memory"), ("filesystem://", "filesystem")]
)
def test_unsupported_transports(url: str, transport: str) -> None:
    lengths = QueueLengths(Celery(broker=url, set_as_current=False))
    assert not lengths.supported
    with pytest.raises(UnsupportedBroker, match=f"^'{transport}' broker is not supported$"):
        lengths.lengths(["celery"])


def test_unsupported_broker_message() -> None:
    error = UnsupportedBroker("memory")
    assert str(error) == "'memory' broker is not supported"
    assert error.transport == "memory"


def test_empty_queue_list_needs_no_broker() -> None:
    # Nothing listens on port 1: asking for no queues must not try to connect.
    app = Celery(broker="redis://127.0.0.1:1/0", set_as_current=False)
    assert QueueLengths(app).lengths([]) == []
