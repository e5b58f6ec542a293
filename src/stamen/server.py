"""Running Stamen: logging, the services, the banner and uvicorn.

The sockets are bound first (``stamen.listen``) and handed to uvicorn, so a port or socket
file that cannot be used stops Stamen before anything else starts, with one line and exit
status 3. Uvicorn owns the signals: SIGTERM or Ctrl-C ends the server, the lifespan stops
the services, and the receiver commits what it holds before we exit.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from typing import Any

import uvicorn
from celery import Celery
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from stamen.listen import BACKLOG, EXIT_CANNOT_LISTEN, ListenError, describe, listen
from stamen.services import Services
from stamen.web import live, pages
from stamen.web.app import create_app

log = logging.getLogger("stamen")


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
