"""Running Stamen: logging, the services, the banner and uvicorn.

Uvicorn owns the sockets and the signals: SIGTERM or Ctrl-C ends the server, the
lifespan stops the services, and the receiver commits what it holds before we exit.
"""

from __future__ import annotations

import logging
import signal
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


def setup_logging(settings: Any) -> None:
    level_name = "DEBUG" if settings.debug else (settings.logging or "info").upper()
    level = logging.CRITICAL + 10 if level_name == "NONE" else getattr(logging, level_name)
    handlers: list[logging.Handler] = []
    if settings.log_file_prefix:
        from logging.handlers import RotatingFileHandler

        handlers.append(
            RotatingFileHandler(
                settings.log_file_prefix,
                maxBytes=settings.log_file_max_size,
                backupCount=settings.log_file_num_backups,
            )
        )
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
    app.loader.import_default_modules()
    services = Services(settings, app)
    asgi = build_asgi(services)
    config = uvicorn.Config(
        asgi,
        host=settings.address or "0.0.0.0",
        port=settings.port,
        uds=settings.unix_socket or None,
        ssl_certfile=settings.certfile,
        ssl_keyfile=settings.keyfile,
        ssl_ca_certs=settings.ca_certs,
        proxy_headers=bool(settings.xheaders),
        forwarded_allow_ips="*" if settings.xheaders else None,
        log_config=None,
        access_log=bool(settings.debug),
        lifespan="on",
    )
    server = _Server(config)
    if not quiet:
        _announce_when_bound(server, settings, app)
    server.run()
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
