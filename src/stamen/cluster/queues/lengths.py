"""``QueueLengths``: picks the backend for a Celery app's broker and keeps it between calls."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from stamen.cluster.queues.amqp import AMQP_IO_TIMEOUT, AMQP_SCHEMES, DeclareQueues
from stamen.cluster.queues.common import Backend, UnsupportedBroker
from stamen.cluster.queues.management import ManagementApiQueues, management_credentials
from stamen.cluster.queues.redis import (
    DEFAULT_PRIORITY_STEPS,
    DEFAULT_SEP,
    REDIS_SCHEMES,
    RedisQueues,
    redis_queue_keys,
    redis_target,
)


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
        self._backend: Backend | None = None
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

    def _get_backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                self._backend = self._build_backend()
            return self._backend

    def _build_backend(self) -> Backend:
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

            return RedisQueues(target, keys_for)
        if self.broker_api:
            return ManagementApiQueues(
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
        return DeclareQueues(
            lambda: self._app.connection(heartbeat=0, transport_options={**opts, **timeouts})
        )

    def close(self) -> None:
        """Release the broker client (idempotent); a later call reconnects."""
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
