"""RabbitMQ queue lengths from the management API (Flower's ``--broker_api``): Flower's
behaviour and result shape, over one kept-alive HTTP connection."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from stamen.cluster.queues.common import CERT_REQS, url_credentials

logger = logging.getLogger(__name__)


#: Flower's management API timeouts.
MANAGEMENT_CONNECT_TIMEOUT = 1.0
MANAGEMENT_REQUEST_TIMEOUT = 2.0


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
    user, password = url_credentials(urlsplit(api_url))
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
        reqs = CERT_REQS.get(reqs.lower(), reqs)
    if reqs == ssl.CERT_NONE:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _ManagementApiError(Exception):
    """A non-200 answer; ``str()`` is Tornado's ``HTTP <code>: <reason>``, as in Flower's log."""


class ManagementApiQueues:
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
