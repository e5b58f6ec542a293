"""Custom pages and API routes from ``flowerconfig.py``: Stamen's "custom dashboard" hook.

Flower's answer to "a page for my ETL tasks" was to subclass its Tornado handlers and patch
its route table. Stamen gives the config file one documented hook instead::

    # flowerconfig.py
    def stamen_routes(router, services):
        @router.get("/etl")
        async def etl(request):
            ...

``stamen_routes`` (a function, or a list of them) is called once when the app is built,
with a FastAPI ``APIRouter`` and the running ``Services`` (``services.reader`` for the task
history, ``services.settings``, ``services.app`` for the Celery app). Why a router rather
than the app itself: the router carries the authentication every Stamen page has — paths
under ``/api/`` go through the API gate (credentials, API tokens,
``FLOWER_UNAUTHENTICATED_API``), every other path through the page gate (Basic challenge
or OAuth login) — so an extension cannot forget it, and its routes are kept ahead of any
catch-all route and cannot silently replace a built-in path (that stops startup).

``render_page`` shows an extension's HTML inside Stamen's own layout (navigation, styles),
so a custom dashboard looks like the rest of the UI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import HTMLResponse

from stamen.config import ConfigError
from stamen.web import gate

log = logging.getLogger(__name__)

#: The name looked up in the executed config file.
HOOK_NAME = "stamen_routes"

RoutesHook = Callable[[APIRouter, Any], Any]


async def extension_gate(request: Request) -> None:
    """The API gate for ``/api/...`` paths, the page gate for the rest (see the module
    docstring for why extensions do not get to choose)."""
    path = request.url.path
    root = str(request.scope.get("root_path", "")).rstrip("/")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path.startswith("/api/"):
        await gate.api_gate(request)
    else:
        await gate.page_user(request)


def hooks_from(namespace: dict[str, Any]) -> list[RoutesHook]:
    """The hook(s) named ``stamen_routes`` in a config namespace; ``ConfigError`` when the
    name is there but is not a function or a list of functions."""
    value = namespace.get(HOOK_NAME)
    if value is None:
        return []
    hooks = list(value) if isinstance(value, (list, tuple)) else [value]
    for hook in hooks:
        if not callable(hook):
            raise ConfigError(
                f"{HOOK_NAME} in the config file must be a function (router, services) or a "
                f"list of them, not {type(hook).__name__}"
            )
    return hooks


def install_extensions(app: FastAPI, services: Any) -> int:
    """Call the config file's ``stamen_routes`` hooks and add their routes to ``app``.

    Called last in ``create_app``, when every built-in route exists, so that clashes can be
    detected. Returns the number of routes added. A hook that raises, or a route that
    would shadow a built-in one, is a ``ConfigError``: the server does not start half
    configured.
    """
    settings = services.settings
    hooks = hooks_from(getattr(settings, "config_namespace", None) or {})
    if not hooks:
        return 0
    where = getattr(settings, "config_file", None) or "the config file"
    router = APIRouter(dependencies=[Depends(extension_gate)])
    for hook in hooks:
        name = getattr(hook, "__name__", HOOK_NAME)
        try:
            hook(router, services)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"error in {name} from {where}: {type(exc).__name__}: {exc}"
            ) from None
    taken = set(_route_keys(app.router.routes))
    for key in _route_keys(router.routes):
        if key in taken:
            method, path = key
            raise ConfigError(
                f"{HOOK_NAME} in {where} adds {method} {path}, which Stamen already serves"
            )
    before = len(app.router.routes)
    app.include_router(router)
    added = app.router.routes[before:]
    del app.router.routes[before:]
    position = _first_catch_all(app.router.routes)
    app.router.routes[position:position] = added
    count = len(router.routes)
    log.info("Added %d route(s) from %s in %s", count, HOOK_NAME, where)
    app.openapi_schema = None  # rebuilt with the new API routes on next request
    return count


def _first_catch_all(routes: list[Any]) -> int:
    """Where extension routes go: before the first ``{...:path}`` route, else at the end."""
    for index, route in enumerate(routes):
        if ":path}" in str(getattr(route, "path", "")):
            return index
    return len(routes)


def _route_keys(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(method, path)`` for every route, looking into included routers and mounts (FastAPI
    keeps included routers as objects of their own in recent versions)."""
    for route in routes:
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None)
        if path is not None and methods:
            for method in methods:
                yield method, prefix + path
            continue
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from _route_keys(inner.routes, prefix + getattr(context, "prefix", ""))
        elif path is not None and getattr(route, "routes", None):
            yield from _route_keys(route.routes, prefix + path)


# --- rendering inside Stamen's layout -----------------------------------------------------------


def render_page(
    request: Request, title: str, body: str, *, status: int = 200, **context: Any
) -> HTMLResponse:
    """``body`` (a Jinja2 template, autoescaped, with ``context``) inside Stamen's page
    layout, with ``base`` (the ``url_prefix`` root) available for links.

    Falls back to a bare HTML page if the layout cannot be loaded, so an extension keeps
    working whatever the built-in templates become.
    """
    try:
        from stamen.web import pages

        env = pages._env()
        base = pages.base_url(request)
        source = '{% extends "base.html" %}{% block content %}' + body + "{% endblock %}"
        html = env.from_string(source).render(
            request=request,
            base=base,
            static=lambda p: f"{base}/static/{p}?v={pages._static_version(p)}",
            nav=context.pop("nav", ""),
            who=context.pop("who", None) or pages.Viewer(None, False, False, ""),
            settings=request.app.state.services.settings,
            title=title,
            **context,
        )
    except Exception as exc:  # the layout changed or is missing: still show the content
        log.debug("Stamen layout unavailable for an extension page: %s", exc)
        import jinja2
        from markupsafe import Markup

        env = jinja2.Environment(autoescape=True)
        base = str(request.scope.get("root_path", "")).rstrip("/")
        inner = env.from_string(body).render(request=request, base=base, **context)
        html = env.from_string(
            "<!doctype html><html><head><meta charset='utf-8'><title>{{ title }}</title>"
            "</head><body>{{ inner }}</body></html>"
        ).render(title=title, inner=Markup(inner))
    return HTMLResponse(html, status_code=status)
