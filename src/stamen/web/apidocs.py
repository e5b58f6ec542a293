"""The interactive API reference at ``/api/docs``.

FastAPI's own page loads Swagger UI from a CDN, which a monitor behind a firewall cannot
reach and which Stamen's pages promise never to do. This one serves the Swagger UI that
the ``fastapi-offline`` package ships, and turns off Swagger UI's online validator, its
only other outside request.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from stamen.web.pages import base_url

#: Where Swagger UI's files are served (a path of their own: ``/static`` is Stamen's).
ASSETS = "/api/docs/assets"


def install(app: FastAPI) -> None:
    """Serve ``/api/docs`` and its assets (create the app with ``docs_url=None``)."""
    app.mount(ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="apidocs")

    @app.get("/api/docs", include_in_schema=False)
    async def api_docs(request: Request) -> HTMLResponse:
        base = base_url(request)
        return get_swagger_ui_html(
            openapi_url=f"{base}{app.openapi_url}",
            title=f"{app.title} API",
            swagger_js_url=f"{base}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{base}/static/favicon.svg",
            swagger_ui_parameters={"validatorUrl": None},
        )
