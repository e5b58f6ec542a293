"""Queue lengths read straight from the broker, for ``/broker`` and ``/api/queues/length``.

Place in the pipeline: cluster access (DESIGN.md, "Cluster access"). Events never carry queue
depths, so these figures come from the broker itself, on demand:

* Redis (``redis``, ``rediss``, ``redis`` + ``broker_use_ssl``, ``redis+socket``, ``sentinel``):
  one pipelined round trip of ``LLEN`` over every priority sub-list kombu may use for a queue.
* RabbitMQ (``amqp``, ``amqps``, ``pyamqp``): the management API when ``broker_api`` is given
  (Flower's behaviour and result shape), otherwise a passive ``queue.declare`` over AMQP itself,
  so no management plugin is needed.
* anything else raises :class:`UnsupportedBroker`.

Unlike Flower, which builds a new client for every page view (spec 12.6), one
:class:`QueueLengths` is built per Celery app and keeps its client between calls. Calls are
blocking and made from a thread pool, so every client here is either thread-safe (redis-py's
connection pool) or guarded by a lock (the HTTP and AMQP connections). Nothing connects in
the constructor: configuration errors (a bad Redis db number, Sentinel without
``master_name``) surface from :meth:`QueueLengths.lengths`, as they do in Flower, so a broken
broker setting costs the broker page, not the whole server.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PRIORITY_STEPS",
    "DEFAULT_SEP",
    "QueueLengths",
    "RedisTarget",
    "UnsupportedBroker",
    "management_credentials",
    "management_queues_url",
    "management_ssl_context",
    "parse_redis_db",
    "redis_queue_keys",
    "redis_target",
]

#: kombu's Redis transport defaults (``kombu.transport.redis``): a message with priority ``p``
#: goes to the list of the highest step ``<= p``; step 0 is the bare queue name.
DEFAULT_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
DEFAULT_SEP = "\x06\x16"

#: Flower's Redis client timeouts; ``broker_transport_options`` may override both.
DEFAULT_SOCKET_CONNECT_TIMEOUT = 1.0
DEFAULT_SOCKET_TIMEOUT = 2.0

#: Flower's management API timeouts.
MANAGEMENT_CONNECT_TIMEOUT = 1.0
MANAGEMENT_REQUEST_TIMEOUT = 2.0

#: Read/write socket timeout for the passive-declare AMQP connection, unless the transport
#: options set ``read_timeout``/``write_timeout``: a broker that accepts the TCP connection
#: and then stalls must not pin a thread-pool thread for ever.
AMQP_IO_TIMEOUT = 2.0

REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})
#: kombu renders ``pyamqp://`` URLs as ``amqp://``; both are listed for clarity.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
}


class UnsupportedBroker(Exception):
    """The broker's transport has no way to report queue lengths (e.g. ``memory``, ``sqs``).

    ``str()`` is Flower's message, which the web layer returns verbatim with a 404.
    """

    def __init__(self, transport: str) -> None:
        super().__init__(f"'{transport}' broker is not supported")
        self.transport = transport


# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without a broker)
# --------------------------------------------------------------------------------------------


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


def _credentials(parts: Any) -> tuple[str | None, str | None]:
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return user, password


def _ssl_kwargs(ssl_options: Any) -> dict[str, Any]:
    """``broker_use_ssl`` as redis-py keywords; ``'CERT_NONE'``-style strings become constants."""
    if not isinstance(ssl_options, Mapping):
        return {}
    out = dict(ssl_options)
    reqs = out.get("ssl_cert_reqs")
    if isinstance(reqs, str) and reqs.lower() in _CERT_REQS:
        out["ssl_cert_reqs"] = _CERT_REQS[reqs.lower()]
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
    user, password = _credentials(first)

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


def management_queues_url(api_url: str, vhost: str) -> str:
    """``GET`` URL for the queues of ``vhost`` under the management API base ``api_url``.

    Flower used ``urljoin``, which drops the last path segment of a base without a trailing
    slash (``http://h:15672/api`` → ``http://h:15672/queues/…``) and sent the default vhost
    as ``…/queues//``. Here the base always keeps its path and the vhost is always
    percent-encoded (``/`` → ``%2F``). Credentials are not part of the result; they travel in
    an ``Authorization`` header.
    """
    parts = urlsplit(api_url)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    path = f"{path}queues/{quote(vhost or '/', safe='')}"
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def management_credentials(
    api_url: str, broker_user: str | None, broker_password: str | None
) -> tuple[str, str]:
    """Basic-auth credentials: from the API URL if it has a user, else the broker's, else guest."""
    user, password = _credentials(urlsplit(api_url))
    if user:
        return user, password or ""
    return broker_user or "guest", broker_password if broker_password is not None else "guest"


def management_ssl_context(ssl_options: Any) -> ssl.SSLContext:
    """TLS context for an ``https`` management API, from ``broker_use_ssl``.

    Verification is on by default. ``cert_reqs``/``ssl_cert_reqs`` equal to ``CERT_NONE``
    turns it off; ``ca_certs``/``ssl_ca_certs`` names the CA bundle. Both the py-amqp and the
    redis-py spellings are accepted because the same dict configures the broker connection.
    """
    options = ssl_options if isinstance(ssl_options, Mapping) else {}
    cafile = options.get("ssl_ca_certs") or options.get("ca_certs")
    context = ssl.create_default_context(cafile=cafile)
    reqs = options.get("ssl_cert_reqs", options.get("cert_reqs"))
    if isinstance(reqs, str):
        reqs = _CERT_REQS.get(reqs.lower(), reqs)
    if reqs == ssl.CERT_NONE:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class _Backend(Protocol):
    def lengths(self, names: Sequence[str]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class _RedisQueues:
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


class _ManagementApiError(Exception):
    """A non-200 answer; ``str()`` is Tornado's ``HTTP <code>: <reason>``, as in Flower's log."""


class _ManagementApiQueues:
    """RabbitMQ management API ``GET /api/queues/<vhost>`` over one kept-alive HTTP connection."""

    def __init__(
        self,
        api_url: str,
        vhost: str,
        credentials: tuple[str, str],
        ssl_options: Any,
    ) -> None:
        parts = urlsplit(api_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._path = urlsplit(management_queues_url(api_url, vhost)).path
        token = base64.b64encode(":".join(credentials).encode()).decode("ascii")
        self._headers = {"Authorization": f"Basic {token}", "Accept": "application/json"}
        self._ssl_options = ssl_options
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            context = management_ssl_context(self._ssl_options)
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=MANAGEMENT_CONNECT_TIMEOUT, context=context
            )
        else:
            conn = http.client.HTTPConnection(
                self._host, self._port, timeout=MANAGEMENT_CONNECT_TIMEOUT
            )
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(MANAGEMENT_REQUEST_TIMEOUT)
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _fetch(self) -> Any:
        with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    self._conn.request("GET", self._path, headers=self._headers)
                    response = self._conn.getresponse()
                    body = response.read()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    # The server closed an idle keep-alive connection: the GET is idempotent,
                    # so retry once on a fresh one.
                    self._drop()
                    if reused and attempt == 1:
                        continue
                    raise
                except BaseException:
                    self._drop()
                    raise
                if response.will_close:
                    self._drop()
                if response.status != 200:
                    raise _ManagementApiError(f"HTTP {response.status}: {response.reason}")
                return json.loads(body)
        raise AssertionError("unreachable")  # pragma: no cover

    def lengths(self, names: Sequence[str]) -> list[dict[str, Any]]:
        try:
            queues = self._fetch()
        except Exception as exc:  # any socket, TLS, HTTP or JSON error: Flower returns []
            logger.error("RabbitMQ management API call failed: %s", exc)
            return []
        wanted = set(names)
        return [q for q in queues if isinstance(q, dict) and q.get("name") in wanted]

    def close(self) -> None:
        with self._lock:
            self._drop()


class _DeclareQueues:
    """Passive ``queue.declare`` over one AMQP connection: no management plugin needed.

    A passive declare never creates anything; the broker answers with the number of ready
    messages and of consumers. A queue that does not exist (404, or 405 for another
    connection's exclusive queue) is **omitted** from the result, the same as the management
    API path, where only existing queues are listed; the broker closes the channel on that
    error, so a new channel is opened for the next queue. A connection error on the kept
    connection drops it and the call is retried once on a new one; any other failure
    propagates (kombu ``OperationalError`` and friends, which the web layer maps to 503).
    """

    def __init__(self, make_connection: Callable[[], Any]) -> None:
        self._make_connection = make_connection
        self._lock = threading.Lock()
        self._conn: Any = None
        self._channel: Any = None

    def _reset(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            # collect() frees the socket without a (possibly hanging) close handshake; best
            # effort, the connection is already broken.
            with contextlib.suppress(Exception):
                conn.collect()

    def _connected(self) -> Any:
        if self._conn is None:
            self._conn = self._make_connection()
        if not self._conn.connected:
            self._channel = None
            # Try each failover host once, without kombu's sleeping retry loop.
            self._conn.ensure_connection(max_retries=max(len(self._conn.alt), 1) - 1)
        return self._conn

    def _declare_all(self, names: Sequence[str]) -> list[dict[str, Any]]:
        conn = self._connected()
        results: list[dict[str, Any]] = []
        for name in names:
            if not name:
                continue
            if self._channel is None or not getattr(self._channel, "is_open", True):
                self._channel = conn.channel()
            try:
                ok = self._channel.queue_declare(queue=name, passive=True)
            except conn.channel_errors as exc:
                logger.debug("Passive declare of queue %r failed: %s", name, exc)
                self._channel = None
                continue
            results.append(
                {"name": name, "messages": ok.message_count, "consumers": ok.consumer_count}
            )
        return results

    def lengths(self, names: Sequence[str]) -> list[dict[str, Any]]:
        if not names:
            return []
        with self._lock:
            # Only a connection kept from an earlier call earns a retry (the broker may have
            # closed it while idle); a fresh one that fails would just fail again.
            reused = self._conn is not None and self._conn.connected
            try:
                return self._declare_all(names)
            except Exception as exc:
                if not (reused and self._is_connection_error(exc)):
                    self._reset()
                    raise
                logger.info("AMQP connection for queue lengths lost, reconnecting: %s", exc)
                self._reset()
            try:
                return self._declare_all(names)
            except Exception:
                self._reset()
                raise

    def _is_connection_error(self, exc: Exception) -> bool:
        from kombu.exceptions import OperationalError

        if isinstance(exc, (OperationalError, OSError)):
            return True
        conn = self._conn
        if conn is None:
            return False
        errors = tuple(conn.connection_errors) + tuple(conn.recoverable_connection_errors)
        return isinstance(exc, errors)

    def close(self) -> None:
        with self._lock:
            conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:
                conn.collect()


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


class QueueLengths:
    """Queue lengths for one Celery app; build once, call :meth:`lengths` from a thread.

    ``broker_api`` is Flower's ``--broker_api`` (RabbitMQ management API base URL); it is
    only used for AMQP brokers, as in Flower. Without it, AMQP brokers are asked with a
    passive declare instead.

    Result shapes, per backend (each a list in queue-name order, except the management API,
    which keeps the API's order as Flower did):

    * Redis: ``[{"name", "messages"}]`` (a missing queue is 0: Redis cannot tell empty from
      missing);
    * RabbitMQ management API: the API's queue objects, unmodified, for the requested names;
      on any error, ``[]`` and one log line ``RabbitMQ management API call failed: <err>``;
    * RabbitMQ passive declare: ``[{"name", "messages", "consumers"}]``, missing queues omitted.
    """

    def __init__(self, celery_app: Any, broker_api: str | None = None) -> None:
        self._app = celery_app
        self.broker_api = broker_api
        self._lock = threading.Lock()
        self._backend: _Backend | None = None
        try:
            # app.connection() is the write URL, which is what Flower reads (spec 8).
            conn = celery_app.connection()
        except Exception:
            # The transport itself failed to load (e.g. sqs:// without boto3): it cannot
            # report lengths anyway; name it after the URL scheme.
            conn = None
        self._conn = conn
        if conn is None:
            url = str(celery_app.conf.broker_url or "")
            self.scheme = urlsplit(url).scheme or url
            self.transport = self.scheme
            return
        self.scheme = urlsplit(conn.as_uri(include_password=True)).scheme
        try:
            self.transport = str(conn.transport.driver_type)
        except Exception:
            self.transport = str(conn.transport_cls)

    @property
    def supported(self) -> bool:
        """Whether :meth:`lengths` can work for this broker (no I/O)."""
        return self.scheme in REDIS_SCHEMES or self.scheme in AMQP_SCHEMES

    def queue_names(self, inspector_workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Queue names to report, sorted (spec 8).

        The union of ``active_queues[].name`` over the inspector cache; when that is empty,
        ``task_default_queue`` plus the names in ``task_queues``. Cheap and without I/O: call
        it on the event loop, where the inspector cache lives, and hand the names to
        :meth:`lengths` in a thread.
        """
        names: set[str] = set()
        for info in list(inspector_workers.values()):
            for queue in info.get("active_queues") or ():
                if isinstance(queue, Mapping) and queue.get("name"):
                    names.add(str(queue["name"]))
        if not names:
            conf = self._app.conf
            if conf.task_default_queue:
                names.add(str(conf.task_default_queue))
            task_queues = conf.task_queues or ()
            if isinstance(task_queues, Mapping):
                task_queues = task_queues.values()
            for queue in task_queues:
                name = queue if isinstance(queue, str) else getattr(queue, "name", None)
                if name:
                    names.add(str(name))
        return sorted(names)

    def lengths(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """Blocking: the length of each queue in ``names`` (see the class docstring for shapes).

        Raises :class:`UnsupportedBroker` for transports without queue lengths, ``ValueError``
        for an invalid Redis configuration, and the client's own errors for Redis and AMQP
        failures (the management API path never raises, as in Flower).
        """
        return self._get_backend().lengths(list(names))

    def _get_backend(self) -> _Backend:
        with self._lock:
            if self._backend is None:
                self._backend = self._build_backend()
            return self._backend

    def _build_backend(self) -> _Backend:
        conn = self._conn
        if conn is None or not self.supported:
            raise UnsupportedBroker(self.transport)
        opts: Mapping[str, Any] = self._app.conf.broker_transport_options or {}
        if self.scheme in REDIS_SCHEMES:
            uri = conn.as_uri(include_password=True)
            alternates = [u for u in (conn.alt or ()) if isinstance(u, str)]
            target = redis_target(
                [uri, *alternates[1:]] if self.scheme == "sentinel" else [uri],
                ssl_options=conn.ssl,
                transport_options=opts,
            )
            steps = tuple(opts.get("priority_steps") or DEFAULT_PRIORITY_STEPS)
            sep = str(opts.get("sep") or DEFAULT_SEP)
            prefix = str(opts.get("global_keyprefix") or "")

            def keys_for(queue: str) -> list[str]:
                return redis_queue_keys(queue, priority_steps=steps, sep=sep, prefix=prefix)

            return _RedisQueues(target, keys_for)
        if self.broker_api:
            return _ManagementApiQueues(
                self.broker_api,
                conn.virtual_host or "/",
                management_credentials(self.broker_api, conn.userid, conn.password),
                conn.ssl,
            )
        timeouts = {
            "read_timeout": opts.get("read_timeout", AMQP_IO_TIMEOUT),
            "write_timeout": opts.get("write_timeout", AMQP_IO_TIMEOUT),
        }
        # heartbeat=0: the connection idles between page views and sends no heartbeats, so
        # it must not negotiate any (the server would drop it; a reconnect would follow).
        return _DeclareQueues(
            lambda: self._app.connection(heartbeat=0, transport_options={**opts, **timeouts})
        )

    def close(self) -> None:
        """Release the broker client (idempotent); a later call reconnects."""
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
