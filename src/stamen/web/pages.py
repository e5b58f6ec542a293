"""The HTML pages (Flower spec sections 3 and 10) plus the JSON the pages themselves read.

Server-rendered with Jinja2 (autoescape on: values are escaped where they are shown, never
on input). Blocking store reads run in the thread pool. Every page works without
JavaScript for reading; scripts add live updates (``/live``, see :mod:`stamen.web.live`),
paging/sorting of the tasks table and the action buttons.

Authentication and roles belong to :mod:`stamen.web.gate` / :mod:`stamen.web.roles`;
:func:`viewer` is the single hook through which pages ask who is looking and whether that
person may press buttons.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import timezone, tzinfo
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, Response

from stamen.cluster.queues import UnsupportedBroker
from stamen.search.parser import SearchError, parse_query
from stamen.services import Services
from stamen.store.reader import SORTABLE, TaskQuery
from stamen.store.sqlite import StoreError
from stamen.web import gate, present, roles, stats
from stamen.web.api import _local_time
from stamen.web.args import Args
from stamen.web.errors import ApiError, FlowerJSON

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"
SEARCH_DOCS_URL = "https://flower.readthedocs.io/en/latest/tasks_filter.html"
CONFIG_DOCS_URL = "https://docs.celeryq.dev/en/latest/userguide/configuration.html#"
#: ``stats`` keys the worker page shows in their own tabs; the rest go to "Other".
_STATS_SHOWN = frozenset(
    {"pool", "pid", "prefetch_count", "autoscaler", "consumer", "broker", "clock", "total"}
    | {"rusage"}
)

router = APIRouter(include_in_schema=False)
_background: set[asyncio.Task[Any]] = set()


# -- who is looking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    """The person viewing a page, as far as the pages care."""

    user: str | None
    can_act: bool
    can_admin: bool
    csrf: str
    #: Whether "Log out" can end the session: only a login cookie (``--auth``) can be
    #: dropped; a browser keeps sending Basic credentials, and a bearer token is not ours to
    #: forget (Flower, too, shows the link for OAuth logins only).
    can_logout: bool = False


async def viewer(request: Request) -> Viewer:
    """The single auth hook of the pages: who is looking, and may they press buttons.

    ``gate.page_user`` refuses (401 challenge or a redirect to the login page) when pages
    need credentials; that propagates, which is the point. Buttons are shown to operators
    (admins for worker shutdown and the audit log) and never under ``--read_only``.
    """
    settings = request.app.state.services.settings
    identity = await gate.page_user(request)
    acting = not settings.read_only
    return Viewer(
        user=identity.name if identity.method in ("basic", "session") else None,
        can_act=acting and identity.can(roles.OPERATOR),
        can_admin=acting and identity.can(roles.ADMIN),
        csrf=gate.csrf_token(request),
        can_logout=identity.method == "session",
    )


# -- rendering --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.ChainableUndefined,
    )
    env.filters["duration"] = present.show_duration
    env.filters["label"] = present.field_label
    env.filters["count"] = lambda n: f"{n or 0:,}"
    env.filters["urlpart"] = lambda s: quote(str(s), safe="")
    return env


@lru_cache(maxsize=64)
def _static_version(path: str) -> str:
    """Content hash for cache-busting static URLs (the files only change on upgrade)."""
    try:
        return hashlib.sha256((STATIC_DIR / path).read_bytes()).hexdigest()[:12]
    except OSError:
        return "0"


def base_url(request: Request) -> str:
    """Where the app is mounted: ``""`` or ``/<url_prefix>``."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def app_zone(svc: Services) -> tzinfo:
    zone = getattr(svc.app, "timezone", None)
    return zone if isinstance(zone, tzinfo) else timezone.utc


def render(
    request: Request, template: str, *, status: int = 200, nav: str = "", **context: Any
) -> HTMLResponse:
    svc: Services = request.app.state.services
    base = base_url(request)
    who = context.pop("who", None) or Viewer(None, False, False, "")
    html = (
        _env()
        .get_template(template)
        .render(
            request=request,
            base=base,
            static=lambda p: f"{base}/static/{p}?v={_static_version(p)}",
            nav=nav,
            who=who,
            settings=svc.settings,
            **context,
        )
    )
    return HTMLResponse(html, status_code=status)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    """Flower's 404/403 page in our layout; never asks for credentials."""
    title = "Page not found" if status == 404 else ("Forbidden" if status == 403 else "Error")
    return render(request, "error.html", status=status, title=title, message=message)


class PageError(Exception):
    """Raised by a page to answer with the error page (status + message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def page_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PageError)
    return error_page(request, exc.status, exc.message)


def _svc(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


# -- workers ----------------------------------------------------------------------------------


async def current_worker_records(svc: Services) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        return present.worker_records(
            svc.reader.counters(),
            svc.reader.workers(),
            purge_offline_after=svc.settings.purge_offline_workers,
        )

    return await run_in_threadpool(read)


def _fire_and_forget(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _inspect_logged(svc: Services, workername: str | None = None) -> None:
    try:
        await svc.inspector.inspect(workername)
    except Exception as exc:
        log.error("Failed to inspect workers: %s", exc)


@router.get("/")
@router.get("/workers")
async def workers_page(request: Request) -> Response:
    who = await viewer(request)
    svc = _svc(request)
    args = await Args.of(request)
    if args.get("refresh", bool, False):
        _fire_and_forget(_inspect_logged(svc))
    records = await current_worker_records(svc)
    if args.get("json", bool, False):
        return FlowerJSON({"data": records})
    return render(
        request,
        "workers.html",
        nav="workers",
        who=who,
        title="Workers",
        workers=records,
        autorefresh=1 if svc.settings.auto_refresh else 0,
    )


@router.get("/worker/{name:path}")
async def worker_page(request: Request, name: str) -> Response:
    who = await viewer(request)
    svc = _svc(request)
    args = await Args.of(request)
    limit = args.get("limit", int, 50)
    entry = svc.inspector.workers.get(name)
    if entry is None or any(m not in entry for m in svc.inspector.WORKER_METHODS):
        await _inspect_logged(svc, name)
    else:
        _fire_and_forget(_inspect_logged(svc, name))
    entry = svc.inspector.workers.get(name)
    if entry is None:
        raise PageError(404, f"Unknown worker '{name}'")
    if "stats" not in entry:
        raise PageError(404, f"Unable to get stats for '{name}' worker")
    cut = {
        k: (v[:limit] if isinstance(v, list) and limit is not None else v) for k, v in entry.items()
    }
    stats_ = cut["stats"] or {}
    broker = stats_.get("broker") or (stats_.get("consumer") or {}).get("broker") or {}
    conf = {k: v for k, v in sorted((cut.get("conf") or {}).items()) if v is not None}
    other = {k: v for k, v in stats_.items() if k not in _STATS_SHOWN}
    registered = [str(t).split(" ", 1)[0] for t in cut.get("registered") or []]
    record, running = await run_in_threadpool(_worker_now, svc, name)
    return render(
        request,
        "worker.html",
        nav="workers",
        who=who,
        title=name,
        name=name,
        entry=cut,
        stats=stats_,
        broker=broker,
        conf=conf,
        other=other,
        registered=registered,
        online=bool(record.get("status")),
        record=record,
        running=running,
        time_kind=_time_kind(svc),
        zone=app_zone(svc),
        show_time=present.show_time,
        config_docs=CONFIG_DOCS_URL,
    )


#: How many running tasks the worker page lists (its live script asks for the same).
RUNNING_SHOWN = 50


def _worker_now(svc: Services, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The worker's live record (as ``/workers?json=1`` has it, ``{}`` when unknown) and the
    tasks its events say are running now: what the page's live script keeps up to date."""
    records = present.worker_records(svc.reader.counters(), svc.reader.workers())
    record = next((r for r in records if r["hostname"] == name), {})
    query = TaskQuery(
        workername=name, state="STARTED", sort_by="started", descending=True, limit=RUNNING_SHOWN
    )
    return record, svc.reader.list_tasks(query)


# -- tasks ------------------------------------------------------------------------------------


def _zone_name(svc: Services) -> str:
    """The IANA name of the zone the pages show times in (Celery's ``timezone``, UTC by
    default as in Celery), for the browser's formatter."""
    zone = app_zone(svc)
    return str(getattr(zone, "key", None) or getattr(zone, "zone", None) or "UTC")


def _time_kind(svc: Services) -> str:
    """Flower's ``time[-Zone]``/``natural-time[-Zone]``: the live tables format times in the
    zone the task and worker pages use, and read the date filters in it too."""
    kind = "natural-time" if svc.settings.natural_time else "time"
    return f"{kind}-{_zone_name(svc)}"


@router.get("/tasks")
async def tasks_page(request: Request) -> Response:
    who = await viewer(request)
    svc = _svc(request)
    args = await Args.of(request)
    prefill = " ".join(
        f"{key}:{value}"
        for key in ("state", "worker", "name")
        if (value := args.raw(key)) and value != "All"
    )
    columns = [(c, present.TASK_COLUMN_LABELS.get(c, c)) for c in svc.settings.tasks_columns]
    # The column chooser offers every column Flower allows: the default ones first, in
    # their order (``--tasks_columns``), then the rest.
    shown = {c for c, _ in columns}
    choices = columns + [
        (c, label) for c, label in present.TASK_COLUMN_LABELS.items() if c not in shown
    ]
    task_types, workers, states = await run_in_threadpool(
        lambda: (svc.reader.task_types(), sorted(svc.reader.workers()), svc.reader.states())
    )
    return render(
        request,
        "tasks.html",
        nav="tasks",
        who=who,
        title="Tasks",
        columns=columns,
        column_choices=choices,
        time_kind=_time_kind(svc),
        zone_name=_zone_name(svc),
        prefill=prefill,
        task_types=task_types,
        worker_names=workers,
        states=states,
        search_docs=SEARCH_DOCS_URL,
    )


def _datatable_query(args: Args) -> tuple[int, TaskQuery | str]:
    """The datatable's arguments as a query, or the search error message."""
    draw = args.get("draw", int, required=True)
    start = args.get("start", int, required=True)
    length = args.get("length", int, required=True)
    column = args.get("order[0][column]", int, required=True)
    sort_key = args.raw(f"columns[{column}][data]") or None
    descending = args.raw("order[0][dir]") == "desc"
    assert draw is not None and start is not None and length is not None
    try:
        search = parse_query(args.raw("search[value]") or "")
    except SearchError as exc:
        return draw, str(exc)
    try:
        received_start = _local_time(args.raw("received_start"))
        received_end = _local_time(args.raw("received_end"))
    except ValueError:
        raise ApiError(
            400, "Invalid received_start or received_end, expected format 'YYYY-MM-DD HH:MM'"
        ) from None
    # Beyond Flower: exact type/worker/state filters, as ``/api/tasks`` names them.
    exact = {
        key: value
        for key in ("workername", "taskname", "state")
        if (value := args.raw(key)) not in (None, "", "All")
    }
    return draw, TaskQuery(
        **exact,
        search=search,
        sort_by=sort_key if sort_key in SORTABLE else None,
        descending=descending,
        offset=max(start, 0),
        limit=length,
        received_start=received_start,
        received_end=received_end,
    )


@router.api_route("/tasks/datatable", methods=["GET", "POST"])
async def tasks_datatable(request: Request) -> Response:
    await viewer(request)
    svc = _svc(request)
    args = await Args.of(request)
    draw, query = _datatable_query(args)
    if isinstance(query, str):
        total = await run_in_threadpool(svc.reader.task_count)
        return FlowerJSON(
            {
                "draw": draw,
                "data": [],
                "recordsTotal": total,
                "recordsFiltered": 0,
                "searchError": query,
            }
        )

    def read() -> tuple[list[dict[str, Any]], int, int]:
        return (
            svc.reader.list_tasks(query),
            svc.reader.count_tasks(query),
            svc.reader.task_count(),
        )

    tasks, filtered, total = await run_in_threadpool(read)
    formatter = svc.settings.format_task
    rows = [present.apply_format_task(formatter, t) for t in tasks]
    return FlowerJSON(
        {"draw": draw, "data": rows, "recordsTotal": total, "recordsFiltered": filtered}
    )


@router.get("/task/{taskid:path}")
async def task_page(request: Request, taskid: str) -> Response:
    who = await viewer(request)
    svc = _svc(request)
    raw = await run_in_threadpool(svc.reader.get_task, taskid)
    if raw is None:
        raise PageError(404, f"Unknown task '{taskid}'")
    task = present.apply_format_task(svc.settings.format_task, raw)
    shown = {"name", "uuid", "state", "args", "kwargs", "result", "root", "parent", "backfilled"}
    zone = app_zone(svc)
    fields: list[tuple[str, str, Any]] = []
    for key, value in task.items():
        if key in shown or value is None or value == [] or key == "traceback":
            continue
        if key in present.TIME_FIELDS:
            kind, value = "time", present.show_time(value, zone)
        elif key == "runtime":
            kind, value = "text", present.show_duration(value)
        elif key in ("worker", "parent_id", "root_id", "children"):
            kind = key
        else:
            kind = "text"
        fields.append((key, kind, value))
    steps = [(state, present.show_time(at, zone), at) for state, at in present.timeline(raw)]
    name = task.get("name")
    return render(
        request,
        "task.html",
        nav="tasks",
        who=who,
        title=f"{name or 'Task'} {taskid[:8]}",
        task=task,
        fields=fields,
        steps=steps,
        workflow_root=raw.get("root_id") or (taskid if raw.get("children") else None),
    )


# -- broker -----------------------------------------------------------------------------------


@router.get("/broker")
async def broker_page(request: Request) -> Response:
    """The queues and their lengths; ``?json=1`` gives the same data to the page's graph."""
    who = await viewer(request)
    svc = _svc(request)
    args = await Args.of(request)
    if not svc.queues.supported:
        raise PageError(404, f"'{svc.queues.transport}' broker is not supported")
    paused = await run_in_threadpool(svc.actions.paused)
    # A paused queue has no consumer left to report it: list it anyway, to resume it.
    names = sorted({*svc.queues.queue_names(svc.inspector.workers), *paused})
    queues: list[dict[str, Any]] = []
    try:
        queues = await run_in_threadpool(svc.queues.lengths, names)
    except UnsupportedBroker as exc:
        raise PageError(404, str(exc)) from None
    except ValueError:
        raise  # a broken Redis setting: a 500, as in Flower
    except Exception as exc:
        log.error("Unable to get queues: '%s'", exc)
    if args.get("json", bool, False):
        return FlowerJSON({"queues": queues, "paused": sorted(paused), "at": time.time()})
    return render(
        request,
        "broker.html",
        nav="broker",
        who=who,
        title="Broker",
        broker_url=svc.app.connection().as_uri(),
        queues=queues,
        paused=paused,
        zone=app_zone(svc),
        show_time=present.show_time,
    )


# -- charts, failures, workflows ---------------------------------------------------------------


@router.get("/charts")
async def charts_page(request: Request) -> Response:
    who = await viewer(request)
    return render(
        request, "charts.html", nav="charts", who=who, title="Charts", ranges=stats.RANGES
    )


@router.get("/charts/data")
async def charts_data(request: Request) -> Response:
    await viewer(request)
    svc = _svc(request)
    args = await Args.of(request)
    span = args.raw("range") or "1h"
    if span not in stats.RANGES:
        raise ApiError(400, f"Invalid range '{span}', expected one of {', '.join(stats.RANGES)}")
    data = await run_in_threadpool(stats.chart_data, svc.reader, span, time.time())
    return FlowerJSON(data)


@router.get("/failures")
async def failures_page(request: Request) -> Response:
    who = await viewer(request)
    svc = _svc(request)
    args = await Args.of(request)
    span = args.raw("range") or "1d"
    if span not in stats.RANGES:
        span = "1d"
    now = time.time()
    groups = await run_in_threadpool(stats.failure_groups, svc.reader, span, now)
    return render(
        request,
        "failures.html",
        nav="failures",
        who=who,
        title="Failures",
        groups=groups,
        span=span,
        # The bulk API reads dates in the server's local time, to the minute (as Flower).
        since=time.strftime("%Y-%m-%d %H:%M", time.localtime(now - stats.RANGES[span][0])),
        ranges=stats.RANGES,
        zone=app_zone(svc),
        show_time=present.show_time,
    )


@router.get("/workflow/{taskid:path}")
async def workflow_page(request: Request, taskid: str) -> Response:
    who = await viewer(request)
    svc = _svc(request)
    tree = await run_in_threadpool(stats.workflow, svc.reader, taskid)
    if tree is None:
        raise PageError(404, f"Unknown task '{taskid}'")
    return render(
        request, "workflow.html", nav="tasks", who=who, title="Workflow", tree=tree, taskid=taskid
    )


@router.get("/audit")
async def audit_page(request: Request) -> Response:
    """Who did what: the control actions' audit log, newest first (admins only)."""
    who = await viewer(request)
    if not who.can_admin:
        raise PageError(403, "Only administrators can read the audit log")
    svc = _svc(request)
    args = await Args.of(request)
    page_size = 100
    offset = max(args.get("offset", int, 0) or 0, 0)
    filters = {key: args.raw(key) or None for key in ("action", "target", "user")}
    entries = await run_in_threadpool(
        lambda: svc.actions.entries(limit=page_size + 1, offset=offset, **filters)
    )
    # Paging keeps the rest of the query (the filters): only the offset changes.
    kept = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"]

    def page_url(at: int) -> str:
        return "?" + urlencode([*kept, ("offset", str(max(at, 0)))])

    return render(
        request,
        "audit.html",
        nav="audit",
        who=who,
        title="Audit log",
        entries=entries[:page_size],
        more=len(entries) > page_size,
        offset=offset,
        newer_url=page_url(offset - page_size),
        older_url=page_url(offset + page_size),
        filters=filters,
        zone=app_zone(svc),
        show_time=present.show_time,
    )


# -- wiring -----------------------------------------------------------------------------------


def logout_page(request: Request) -> Response:
    return render(request, "logout.html", title="Logged out")


async def server_error(request: Request, exc: Exception) -> Response:
    """An unexpected error: our 500 page for pages, an empty 500 for the API (as Flower).

    An unavailable history database is a 503 instead, which a load balancer or a script
    may retry, with one line in the log rather than a traceback."""
    if isinstance(exc, StoreError):  # the history database cannot answer now
        log.warning("History database unavailable for %s: %s", request.url.path, exc)
        message = "The history database is unavailable; try again shortly."
        if request.url.path.startswith("/api/"):
            return Response(message, status_code=503, media_type="text/plain")
        return render(request, "error.html", status=503, title="Error 503", message=message)
    log.error("Error handling %s %s", request.method, request.url.path, exc_info=exc)
    if request.url.path.startswith("/api/"):
        return Response(status_code=500)
    return render(
        request,
        "error.html",
        status=500,
        title="Error 500",
        message=("Something went wrong on our side. The details are in Stamen's log."),
    )


def install(app: Any) -> None:
    """Add the pages, their static files and the error/logout renderers to ``app``."""
    from starlette.staticfiles import StaticFiles

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.add_exception_handler(PageError, page_error_handler)
    # Registered for StoreError itself too: a handler of Exception answers from Starlette's
    # outermost middleware, which then re-raises, so the server logs a traceback as well.
    app.add_exception_handler(StoreError, server_error)
    app.add_exception_handler(Exception, server_error)
    app.state.render_page_error = error_page
    app.state.render_logout = logout_page
