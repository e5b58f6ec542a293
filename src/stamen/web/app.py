"""The ASGI application: one route table for Flower's API and pages plus our own.

``create_app`` builds everything from its arguments (no globals), so tests can run two
apps in one process. The lifespan starts the services and stops them in reverse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

import stamen
from stamen.metrics import CONTENT_TYPE, Metrics
from stamen.services import Services
from stamen.web import actions, api, apidocs, control, live, pages
from stamen.web.auth import install_auth
from stamen.web.errors import ApiError, api_error_handler, plain
from stamen.web.extensions import install_extensions
from stamen.web.gate import metrics_gate, metrics_protected

log = logging.getLogger(__name__)


def create_app(services: Services, *, manage_services: bool = True) -> FastAPI:
    """The app serving ``services``; with ``manage_services`` its lifespan starts/stops them."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_services:
            services.start()
        first_inspection = asyncio.create_task(_inspect_quietly(services))
        try:
            yield
        finally:
            first_inspection.cancel()
            if manage_services:
                await asyncio.to_thread(services.stop)

    app = FastAPI(
        title="Stamen",
        version=stamen.__version__,
        description="Monitor and administer Celery clusters (Flower-compatible API).",
        lifespan=lifespan,
        docs_url=None,  # stamen.web.apidocs serves it without a CDN
        redoc_url=None,
        openapi_url="/api/openapi.json",
        redirect_slashes=False,
    )
    app.state.services = services
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(api.router)
    install_auth(app)  # login/logout, identity + CSRF middlewares (stamen.web.auth)
    app.include_router(control.router)
    app.include_router(actions.router)
    pages.install(app)  # HTML pages, /static, /live, error and logout pages
    apidocs.install(app)
    app.include_router(live.router)

    metrics = Metrics(services)
    metrics.attach()
    app.state.metrics = metrics

    _warn_about_metrics_protection(services.settings)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_gate)])
    async def prometheus_metrics() -> Response:
        """Flower's /metrics: ``text/plain`` exactly (spec 3.7); no auth unless the config
        file protects it as Flower's docs show (``stamen.web.gate.metrics_gate``)."""
        return Response(await metrics.scrape(), headers={"Content-Type": CONTENT_TYPE})

    @app.get("/healthcheck", include_in_schema=True, summary="Is Stamen healthy?")
    async def healthcheck(request: Request) -> Response:
        return api.healthcheck_response(services)

    @app.middleware("http")
    async def common_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    install_extensions(app, services)  # flowerconfig.py's stamen_routes, last: see there
    return app


def _warn_about_metrics_protection(settings: Any) -> None:
    """The config file protects /metrics (Flower's recipe): say when that cannot work."""
    if not getattr(settings, "protect_metrics", False):
        return
    if not metrics_protected(settings):
        log.warning(
            "%s wraps Metrics.get in tornado.web.authenticated, which has no effect without "
            "--basic_auth or --auth: /metrics stays open",
            settings.config_file or "The config file",
        )
    elif settings.auth and not settings.api_tokens:
        log.warning(
            "/metrics requires a login (tornado.web.authenticated in %s), which with --auth "
            "only a browser can get: give Prometheus a bearer token with --api_tokens",
            settings.config_file or "the config file",
        )


async def _inspect_quietly(services: Services) -> None:
    """Flower inspects every worker once at start; a failure only means an empty cache."""
    try:
        await services.inspector.inspect()
    except Exception as exc:
        log.warning("First worker inspection failed: %s", exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return pages.error_page(request, 404, "Error, page not found")
    return plain(exc.status_code, str(exc.detail or ""))
