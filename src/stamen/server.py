"""Running Stamen: logging, the listening sockets, the services, the banner and uvicorn.

The sockets are bound here, first, the way Flower's Tornado binds them (``bind_sockets``,
``bind_unix_socket``), and handed to uvicorn: ``--address=''`` listens on every IPv4 and
IPv6 interface, and a port or socket file that cannot be used stops Stamen before anything
else starts, with one line and exit status 3. Uvicorn owns the signals: SIGTERM or Ctrl-C
ends the server, the lifespan stops the services, and the receiver commits what it holds
before we exit.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import stat
import sys
from typing import Any

import uvicorn
from celery import Celery
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from stamen.services import Services
from stamen.web import live, pages
from stamen.web.app import create_app

log = logging.getLogger("stamen")

#: The exit status when Stamen cannot listen where it is told to (a port in use, a
#: ``--unix_socket`` path that is not a socket...): uvicorn's status for a failed start.
EXIT_CANNOT_LISTEN = 3
BACKLOG = 2048  # uvicorn's default


class ListenError(Exception):
    """Stamen cannot listen where it was told to; the message is one line for the user."""


def _where(host: str, port: int) -> str:
    """``host:port``, ``[v6]:port``, and ``*:port`` for every interface."""
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def bind_sockets(address: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening TCP sockets for ``--address``/``--port``, made as Tornado's ``bind_sockets``
    (so Flower) makes them: one per address the name resolves to, ``''`` meaning every
    interface of both families (``0.0.0.0`` and ``::``, the IPv6 one with ``IPV6_V6ONLY`` so
    that the two do not clash), and ``::`` IPv6 only. With port 0 every socket gets the port
    the first one was given. IPv6 is skipped for ``''`` and ``localhost`` when the host does
    not support it. Raises ``ListenError``."""
    host = address or None
    family = socket.AF_UNSPEC if socket.has_ipv6 else socket.AF_INET
    try:
        found = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ListenError(f"cannot listen on {_where(address, port)}: {reason}") from None
    infos = sorted(set(found), key=lambda info: (info[0], str(info[4])))
    attempts = 5 if port == 0 else 1  # port 0: the port IPv4 got may be taken on IPv6
    for attempt in range(attempts):
        sockets: list[socket.socket] = []
        try:
            _bind_each(infos, address, sockets, backlog)
        except _Taken:
            for sock in sockets:
                sock.close()
            if attempt + 1 < attempts:
                continue
            raise ListenError(f"cannot listen on {_where(address, port)}: no free port") from None
        except ListenError:
            for sock in sockets:
                sock.close()
            raise
        if not sockets:
            raise ListenError(f"cannot listen on {_where(address, port)}: no usable address")
        return sockets
    raise AssertionError("unreachable")  # pragma: no cover


class _Taken(Exception):
    """Port 0: the port the first socket was given is in use for another family."""


def _bind_each(infos: list[Any], address: str, sockets: list[socket.socket], backlog: int) -> None:
    bound_port: int | None = None
    for af, socktype, proto, _name, sockaddr in infos:
        if sys.platform == "darwin" and address == "localhost" and af == socket.AF_INET6:
            if sockaddr[3] != 0:  # macOS's link-local fe80::1%lo0, skipped as Tornado does
                continue
        any_port = sockaddr[1] == 0
        if any_port and bound_port is not None:
            sockaddr = (sockaddr[0], bound_port, *sockaddr[2:])
        sock: socket.socket | None = None
        try:
            sock = socket.socket(af, socktype, proto)
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError as exc:
            if sock is not None:
                sock.close()
            if (
                af == socket.AF_INET6
                and address in ("", "localhost")
                and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
            ):
                continue  # IPv6 off on this host (a default Docker network): IPv4 only
            if exc.errno == errno.EADDRINUSE and any_port and bound_port is not None:
                raise _Taken from None
            where = _where(sockaddr[0], sockaddr[1])
            raise ListenError(f"cannot listen on {where}: {_reason(exc)}") from None
        sock.setblocking(False)
        sockets.append(sock)
        bound_port = sock.getsockname()[1]


def bind_unix_socket(path: str, backlog: int = BACKLOG, mode: int = 0o777) -> socket.socket:
    """A listening Unix socket at ``path``, as Tornado's ``bind_unix_socket`` makes it for
    Flower's ``--unix_socket`` (mode 0o777): a socket file left by an earlier run is
    replaced, any other file there is an error; a name starting with a NUL byte is Linux's
    abstract namespace (no file). Raises ``ListenError``."""
    in_filesystem = not path.startswith("\0")
    if in_filesystem:
        _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if in_filesystem:
            os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on --unix_socket={path}: {_reason(exc)}") from None
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"cannot listen on --unix_socket={path}: {_reason(exc)}") from None
    if not stat.S_ISSOCK(existing.st_mode):
        raise ListenError(f"invalid value for --unix_socket: {path} exists and is not a socket")
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        reason = _reason(exc)
        raise ListenError(
            f"cannot replace the socket file --unix_socket={path}: {reason}"
        ) from None


def listen(settings: Any) -> list[socket.socket]:
    """The sockets ``settings`` asks for: ``--unix_socket`` if set, else TCP on
    ``--address``/``--port``. Raises ``ListenError``."""
    if settings.unix_socket:
        return [bind_unix_socket(settings.unix_socket)]
    return bind_sockets(settings.address or "", settings.port)


def describe(sockets: list[socket.socket]) -> str:
    """Where the sockets listen, for the log: ``0.0.0.0:5555, [::]:5555``."""
    names = []
    for sock in sockets:
        name = sock.getsockname()
        names.append(_where(name[0], name[1]) if isinstance(name, tuple) else f"unix socket {name}")
    return ", ".join(names)


class _Server(uvicorn.Server):
    """Uvicorn, but a SIGTERM ends with exit status 0 after a clean stop, as in Flower
    (uvicorn re-raises the signal once it has shut down, which kills with status -15)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            log.info("%d detected, shutting down", sig)
        live.shutting_down()  # end open SSE streams, or uvicorn waits for them for ever
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals.remove(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if sockets:  # uvicorn says where it listens only for sockets it bound itself
            log.info("Listening on %s (Press CTRL+C to quit)", describe(sockets))


def log_file_handler(settings: Any) -> logging.Handler:
    """The log file, rotated as Tornado's logging options say (Flower's, too)."""
    from logging.handlers import RotatingFileHandler, TimedRotatingFileHandler

    if settings.log_rotate_mode == "time":
        return TimedRotatingFileHandler(
            settings.log_file_prefix,
            when=settings.log_rotate_when,
            interval=settings.log_rotate_interval,
            backupCount=settings.log_file_num_backups,
            encoding="utf-8",
        )
    return RotatingFileHandler(
        settings.log_file_prefix,
        maxBytes=settings.log_file_max_size,
        backupCount=settings.log_file_num_backups,
        encoding="utf-8",
    )


def setup_logging(settings: Any) -> None:
    level_name = "DEBUG" if settings.debug else (settings.logging or "info").upper()
    level = logging.CRITICAL + 10 if level_name == "NONE" else getattr(logging, level_name)
    handlers: list[logging.Handler] = []
    if settings.log_file_prefix:
        handlers.append(log_file_handler(settings))
    if settings.log_to_stderr or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=level,
        format="[%(asctime)s %(levelname)s %(name)s] %(message)s",
        handlers=handlers,
        force=True,
    )


def build_asgi(services: Services) -> Any:
    """The app, mounted under ``--url_prefix`` when one is set (nothing outside it)."""
    app = create_app(services)
    prefix = services.settings.url_prefix
    if not prefix:
        return app

    async def not_found(request: Request) -> Response:
        # Flower's rewritten catch-all: "/<prefix>" itself and "/<prefix>x" get its HTML 404
        # page (in our layout, links under the prefix), not a redirect to "/<prefix>/".
        inner = Request({**request.scope, "app": app, "root_path": f"/{prefix}"})
        return pages.error_page(inner, 404, "Error, page not found")

    outer = Starlette(
        routes=[Mount(f"/{prefix}", app=app), Route(f"/{prefix}{{rest:path}}", not_found)],
        lifespan=_lifespan_of(app),
    )
    outer.router.redirect_slashes = False
    return outer


def _lifespan_of(app: Any) -> Any:
    return app.router.lifespan_context


def banner(settings: Any, app: Celery, port: int | None) -> None:
    prefix = f"/{settings.url_prefix}/" if settings.url_prefix else ""
    if settings.unix_socket:
        log.info("Visit me via unix socket file: %s", settings.unix_socket)
    else:
        scheme = "https" if settings.certfile and settings.keyfile else "http"
        log.info("Visit me at %s://%s:%s%s", scheme, settings.address or "127.0.0.1", port, prefix)
    log.info("Broker: %s", app.connection().as_uri())
    log.info("Registered tasks: \n%s", "\n".join(sorted(app.tasks)))


def serve(settings: Any, app: Celery, *, quiet: bool = False) -> int:
    """Run until stopped; returns the process exit status."""
    setup_logging(settings)
    try:
        sockets = listen(settings)  # first: a port in use stops us before anything starts
    except ListenError as exc:
        sys.stderr.write(f"stamen: error: {exc}\n")
        return EXIT_CANNOT_LISTEN
    try:
        app.loader.import_default_modules()
        services = Services(settings, app)
        asgi = build_asgi(services)
        config = uvicorn.Config(
            asgi,
            ssl_certfile=settings.certfile,
            ssl_keyfile=settings.keyfile,
            ssl_ca_certs=settings.ca_certs,
            proxy_headers=bool(settings.xheaders),
            forwarded_allow_ips="*" if settings.xheaders else None,
            log_config=None,
            access_log=bool(settings.debug),
            lifespan="on",
            backlog=BACKLOG,
        )
        server = _Server(config)
        if not quiet:
            _announce_when_bound(server, settings, app)
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    return 0


def _announce_when_bound(server: uvicorn.Server, settings: Any, app: Celery) -> None:
    """Print the banner with the real port (``--port=0`` picks a free one)."""
    original = server.startup

    async def startup(sockets: Any = None) -> None:
        await original(sockets=sockets)
        port = None
        for srv in getattr(server, "servers", []):
            for sock in srv.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    port = name[1]
                    break
        banner(settings, app, port)

    server.startup = startup  # type: ignore[method-assign]
