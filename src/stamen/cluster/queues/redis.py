"""Redis queue lengths: ``LLEN`` over every priority sub-list kombu may use for a queue, in
one pipelined round trip, for ``redis``, ``rediss``, ``redis`` + ``broker_use_ssl``,
``redis+socket`` and ``sentinel`` brokers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from stamen.cluster.queues.common import CERT_REQS, url_credentials

#: kombu's Redis transport defaults (``kombu.transport.redis``): a message with priority ``p``
#: goes to the list of the highest step ``<= p``; step 0 is the bare queue name.
DEFAULT_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
DEFAULT_SEP = "\x06\x16"

#: Flower's Redis client timeouts; ``broker_transport_options`` may override both.
DEFAULT_SOCKET_CONNECT_TIMEOUT = 1.0
DEFAULT_SOCKET_TIMEOUT = 2.0

REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})


def redis_queue_keys(
    queue: str,
    *,
    priority_steps: Iterable[int] = DEFAULT_PRIORITY_STEPS,
    sep: str = DEFAULT_SEP,
    prefix: str = "",
) -> list[str]:
    """Return the Redis list keys kombu uses for ``queue``, one per priority step.

    Step 0 is ``<prefix><queue>``; step ``n`` is ``<prefix><queue><sep><n>``, exactly as
    kombu's ``Channel._q_for_pri`` plus its ``global_keyprefix`` wrapper name them. Duplicate
    steps are dropped so a repeated step in the settings does not count a list twice.
    """
    keys: dict[str, None] = {}
    for step in priority_steps:
        step = int(step)
        keys[f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}"] = None
    return list(keys)


def parse_redis_db(path: str) -> int:
    """Turn a Redis URL path (or kombu ``virtual_host``) into a database number.

    ``''``, ``'/'`` and ``'//'`` mean 0, like kombu. Anything that is not an integer raises
    Flower's (and kombu's) ``ValueError`` message.
    """
    value = path[1:] if path.startswith("/") else path
    if not value or value == "/":
        return 0
    if value.startswith("/"):
        value = value[1:]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Database is int between 0 and limit - 1, not {value}") from None


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to reach a Redis broker, resolved from the broker URL(s).

    ``kind`` is ``"tcp"``, ``"tls"``, ``"socket"`` or ``"sentinel"``. ``kwargs`` are keyword
    arguments for ``redis.Redis`` (for Sentinel: for the master connection). For Sentinel,
    ``sentinels`` lists every sentinel host of the URL in order (Flower used only the first)
    and ``sentinel_kwargs`` configures the connections to the sentinels themselves.
    """

    kind: str
    kwargs: dict[str, Any]
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)


def _hostname(parts: Any) -> str | None:
    # urlsplit lower-cases and keeps percent-escapes ('%3a%3a1' for an IPv6 host as kombu's
    # as_uri renders it); brackets are already stripped for '[::1]'.
    host = parts.hostname
    return unquote(host) if host else None


def _ssl_kwargs(ssl_options: Any) -> dict[str, Any]:
    """``broker_use_ssl`` as redis-py keywords; ``'CERT_NONE'``-style strings become constants."""
    if not isinstance(ssl_options, Mapping):
        return {}
    out = dict(ssl_options)
    reqs = out.get("ssl_cert_reqs")
    if isinstance(reqs, str) and reqs.lower() in CERT_REQS:
        out["ssl_cert_reqs"] = CERT_REQS[reqs.lower()]
    return out


def redis_target(
    urls: Sequence[str],
    *,
    ssl_options: Any = None,
    transport_options: Mapping[str, Any] | None = None,
) -> RedisTarget:
    """Resolve the Redis connection settings for a broker.

    ``urls[0]`` is the broker URL (kombu ``as_uri(include_password=True)``); for Sentinel,
    every URL with the ``sentinel`` scheme in ``urls`` contributes a sentinel host.
    ``ssl_options`` is the resolved ``broker_use_ssl`` (``True`` or a dict of redis-py ``ssl_*``
    keywords). Unlike Flower, the Sentinel master honours the URL's database number.
    """
    opts = dict(transport_options or {})
    connect_timeout = float(opts.get("socket_connect_timeout") or DEFAULT_SOCKET_CONNECT_TIMEOUT)
    read_timeout = float(opts.get("socket_timeout") or DEFAULT_SOCKET_TIMEOUT)
    first = urlsplit(urls[0])
    scheme = first.scheme
    user, password = url_credentials(first)

    if scheme == "redis+socket":
        # kombu takes the db of a socket URL from '?virtual_host=N'; Flower always used 0.
        query = dict(parse_qsl(first.query))
        return RedisTarget(
            "socket",
            {
                "unix_socket_path": unquote(first.path),
                "password": password,
                "db": parse_redis_db(query.get("virtual_host", "")),
                "socket_timeout": read_timeout,
            },
        )

    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"not a Redis URL: {scheme}://")
    default_port = 26379 if scheme == "sentinel" else 6379
    kwargs: dict[str, Any] = {
        "db": parse_redis_db(first.path),
        "username": user,
        "password": password,
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": read_timeout,
    }
    tls = scheme == "rediss" or bool(ssl_options)
    if tls:
        kwargs["ssl"] = True
        kwargs.update(_ssl_kwargs(ssl_options))

    if scheme == "sentinel":
        master_name = opts.get("master_name")
        if not master_name:
            raise ValueError("'master_name' transport option must be specified.")
        sentinels: list[tuple[str, int]] = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme == "sentinel":
                sentinels.append((_hostname(parts) or "localhost", parts.port or default_port))
        sentinel_kwargs = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": read_timeout,
            **(opts.get("sentinel_kwargs") or {}),
        }
        return RedisTarget(
            "sentinel",
            kwargs,
            sentinels=tuple(sentinels),
            master_name=str(master_name),
            sentinel_kwargs=sentinel_kwargs,
        )

    kwargs["host"] = _hostname(first) or "localhost"
    kwargs["port"] = first.port or default_port
    return RedisTarget("tls" if tls else "tcp", kwargs)


class RedisQueues:
    """LLEN sums over kombu's priority lists, through one long-lived redis-py client."""

    def __init__(self, target: RedisTarget, keys_for: Callable[[str], list[str]]) -> None:
        self._target = target
        self._keys_for = keys_for
        self._lock = threading.Lock()
        self._client: Any = None
        self._sentinel: Any = None

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client

    def _build(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        target = self._target
        # One immediate retry: the client is reused, so a pooled connection the server has
        # since closed must not fail a request. No backoff: the caller is waiting.
        retry = Retry(NoBackoff(), 1)
        if target.kind == "sentinel":
            from redis.sentinel import Sentinel

            sentinel_kwargs = {"retry": Retry(NoBackoff(), 0), **target.sentinel_kwargs}
            # redis-py asks each sentinel in turn until one knows the master (Flower: first only).
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(target.sentinels), sentinel_kwargs=sentinel_kwargs
            )
            assert target.master_name is not None
            return self._sentinel.master_for(target.master_name, retry=retry, **target.kwargs)
        return redis.Redis(retry=retry, **target.kwargs)

    def lengths(self, names: Sequence[str]) -> list[dict[str, Any]]:
        if not names:
            return []
        client = self._get_client()
        per_queue = [self._keys_for(name) for name in names]
        # MULTI/EXEC like Flower: one round trip and a consistent snapshot across the lists.
        with client.pipeline(transaction=True) as pipe:
            for keys in per_queue:
                for key in keys:
                    pipe.llen(key)
            counts = iter(pipe.execute())
        return [
            {"name": name, "messages": sum(int(next(counts)) for _ in keys)}
            for name, keys in zip(names, per_queue, strict=True)
        ]

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            sentinel, self._sentinel = self._sentinel, None
        if client is not None:
            client.close()
        if sentinel is not None:
            for sentinel_client in sentinel.sentinels:
                sentinel_client.close()
