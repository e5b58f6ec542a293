"""Flower's read API: workers, tasks, task types, task info and results, queue lengths.

Handlers are thin: they read arguments with Flower's rules, ask the store, the inspector
or the broker (blocking calls run in a thread, never on the event loop) and answer in
Flower's JSON shapes, with Flower's status codes and error texts.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
from celery import states
from celery.backends.base import DisabledBackend
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from stamen.cluster import control as rules
from stamen.cluster.queues import UnsupportedBroker
from stamen.events.merge import worker_alive
from stamen.search.parser import SearchError, parse_query
from stamen.services import Services
from stamen.store.reader import TaskQuery
from stamen.web.args import Args
from stamen.web.blocking import blocking
from stamen.web.docs import params
from stamen.web.errors import ApiError, FlowerJSON, plain
from stamen.web.gate import api_gate

router = APIRouter(dependencies=[Depends(api_gate)], default_response_class=FlowerJSON)

API_SORT_KEYS = ("name", "received", "started", "state")
_DATE_FORMAT = "%Y-%m-%d %H:%M"
#: How the date filters are written (Flower's form, or Stamen's epoch seconds).
DATE_HELP = "YYYY-MM-DD HH:MM in the server's local time, or seconds since the epoch"
_EPOCH = re.compile(r"\d{1,11}(\.\d{1,6})?")


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def _filter(args: Args, name: str) -> str | None:
    """Flower's filters: empty or ``All`` means no filter."""
    value = args.get(name)
    return None if value in (None, "", "All") else value


def _local_time(value: str | None) -> float | None:
    """Flower reads these dates in the server's local time zone; so do we. Stamen also takes
    seconds since the epoch, which mean the same wherever the client is (the tasks page
    sends those, having read the date in the zone it shows times in)."""
    if not value:
        return None
    if _EPOCH.fullmatch(value):
        return float(value)
    return time.mktime(time.strptime(value, _DATE_FORMAT))


def task_query_from(args: Args) -> TaskQuery:
    """Parse ``/api/tasks`` arguments; every bad value is a 400 with Flower's text."""
    limit = args.get("limit", int)
    offset = args.get("offset", int, 0) or 0
    sort_by = args.get("sort_by")
    descending = False
    if sort_by:
        descending = sort_by.startswith("-")
        key = sort_by.lstrip("-")
        if key not in API_SORT_KEYS:
            raise ApiError(
                400, f"Invalid sort_by '{sort_by}', expected one of {', '.join(API_SORT_KEYS)}"
            )
        sort_by = key
    dates = {}
    for kind in ("received", "started"):
        try:
            dates[f"{kind}_start"] = _local_time(args.get(f"{kind}_start"))
            dates[f"{kind}_end"] = _local_time(args.get(f"{kind}_end"))
        except ValueError:
            raise ApiError(
                400,
                f"Invalid {kind}_start or {kind}_end, expected format 'YYYY-MM-DD HH:MM'",
            ) from None
    try:
        search = parse_query(args.raw("search") or "")
    except SearchError as exc:
        raise SearchRejected(str(exc)) from None
    return TaskQuery(
        workername=_filter(args, "workername"),
        taskname=_filter(args, "taskname"),
        state=_filter(args, "state"),
        search=search,
        sort_by=sort_by or None,
        descending=descending,
        offset=max(offset, 0),
        limit=limit,
        **dates,
    )


class SearchRejected(ApiError):
    """A query the search language rejects: Flower answers 400 with a JSON ``error``."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def api_task(task: dict[str, Any]) -> dict[str, Any]:
    """``/api/tasks`` moves ``worker`` to the end and drops it when there is none."""
    worker = task.pop("worker")
    if worker is not None:
        task["worker"] = worker
    return task


@router.get(
    "/api/workers",
    summary="List workers and their inspection data",
    openapi_extra=params(
        ("refresh", "boolean", "inspect the workers again before answering"),
        ("status", "boolean", "answer only {hostname: online} for every worker"),
        ("workername", "string", "only this worker"),
    ),
)
async def list_workers(request: Request) -> Any:
    svc = services(request)
    args = await Args.of(request)
    refresh = args.get("refresh", bool, False)
    status = args.get("status", bool, False)
    workername = args.get("workername") or None
    if refresh:
        try:
            await svc.inspector.inspect(workername)
        except Exception as exc:
            raise ApiError(503, f"Failed to update workers: {exc}") from None
    if status:
        workers = await run_in_threadpool(svc.reader.workers)
        now = time.time()
        return {host: worker_alive(w, now) for host, w in workers.items()}
    cache = svc.inspector.workers
    if workername:
        if workername not in cache:
            raise ApiError(404, f"Unknown worker '{workername}'")
        return {workername: cache[workername]}
    return dict(cache)


@router.get(
    "/api/tasks",
    summary="List tasks: filtered, searched, sorted and paged over the whole history",
    openapi_extra=params(
        ("limit", "integer", "page size; absent means all"),
        ("offset", "integer", "tasks to skip"),
        ("sort_by", "string", "name, received, started or state; a leading - reverses"),
        ("workername", "string", "exact worker hostname (case-insensitive)"),
        ("taskname", "string", "exact task name (case-insensitive)"),
        ("state", "string", "exact state (case-insensitive)"),
        ("received_start", "string", DATE_HELP + ", inclusive"),
        ("received_end", "string", DATE_HELP + ", inclusive"),
        ("started_start", "string", DATE_HELP + ", inclusive"),
        ("started_end", "string", DATE_HELP + ", inclusive"),
        ("search", "string", "query in Flower's search language"),
    ),
)
async def list_tasks(request: Request) -> Any:
    svc = services(request)
    args = await Args.of(request)
    try:
        query = task_query_from(args)
    except SearchRejected as exc:
        return FlowerJSON({"error": exc.message}, status_code=400)
    tasks = await run_in_threadpool(svc.reader.list_tasks, query)
    return {task["uuid"]: api_task(task) for task in tasks}


@router.get("/api/task/types", summary="Names of the task types seen")
async def task_types(request: Request) -> Any:
    names = await run_in_threadpool(services(request).reader.task_types)
    return {"task-types": names}


@router.get("/api/task/info/{taskid:path}", summary="One task, every field")
async def task_info(request: Request, taskid: str) -> Any:
    task = await run_in_threadpool(services(request).reader.get_task, taskid)
    if task is None:
        raise ApiError(404, f"Unknown task '{taskid}'")
    return task


def _safe_result(value: Any) -> Any:
    """A JSON-encodable result as it is; anything else as its repr (Flower's rule)."""
    try:
        orjson.dumps(value)
    except TypeError:
        return repr(value)
    return value


def _read_result(result: AsyncResult, timeout: float | None) -> dict[str, Any]:
    answer: dict[str, Any] = {"task-id": result.id, "state": result.state}
    if timeout:
        try:
            # Stamen never runs inside a task, but ``stamen demo`` hosts a worker in this
            # process, which makes Celery refuse every wait as if it did.
            result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeout:
            return answer
    elif not result.ready():
        return answer
    answer["state"] = result.state
    answer["result"] = _safe_result(result.result)
    if result.state == states.FAILURE:
        answer["traceback"] = result.traceback
    return answer


@router.get(
    "/api/task/result/{taskid:path}",
    summary="A task's state and result from the result backend",
    openapi_extra=params(("timeout", "number", "seconds to wait for the result")),
)
async def task_result(request: Request, taskid: str) -> Any:
    svc = services(request)
    args = await Args.of(request)
    try:
        # NaN or infinity would make the result backend wait for ever (a stuck request).
        timeout = rules.check_seconds(args.get("timeout", float), "timeout")
    except rules.InputError as exc:
        raise ApiError(400, str(exc)) from None
    if isinstance(svc.app.backend, DisabledBackend):
        return plain(503)
    result = AsyncResult(taskid, app=svc.app)
    return await blocking(svc, _read_result, result, timeout)


@router.get("/api/queues/length", summary="Messages waiting in each queue the workers consume")
async def queue_lengths(request: Request) -> Any:
    svc = services(request)
    if not svc.queues.supported:
        raise ApiError(404, str(UnsupportedBroker(svc.queues.transport)))
    names = svc.queues.queue_names(svc.inspector.workers)
    return {"active_queues": await blocking(svc, svc.queues.lengths, names)}


def healthcheck_response(svc: Services) -> Response:
    problems = svc.health.problems()
    if problems:
        return plain(503, "\n".join(problems))
    return Response("OK", media_type="text/html; charset=UTF-8")
