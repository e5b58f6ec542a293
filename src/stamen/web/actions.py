"""Stamen's own actions beyond Flower: retry, bulk revoke/retry, purge, pause/resume, audit.

Same conventions as ``stamen.web.control``: arguments in the query string or a form body,
read-only mode and roles checked first, broker calls in a thread with a deadline, every call
audited. Bulk actions select tasks with exactly the filters and search language of
``/api/tasks``, offer a dry run (count and a sample) and never touch more than
:data:`BULK_CAP` tasks per request.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from kombu.exceptions import ChannelError, EncodeError
from starlette.concurrency import run_in_threadpool

from stamen.cluster import control as rules
from stamen.cluster.pause import consumers_of
from stamen.events.backfill import backfill_unavailable, fetch_metas
from stamen.services import Services
from stamen.web.api import DATE_HELP, SearchRejected, task_query_from
from stamen.web.args import Args
from stamen.web.control import (
    ADMIN,
    OPERATOR,
    _args,
    audited,
    broker_call,
    check_role,
    invalid,
    services,
    who,
)
from stamen.web.docs import params
from stamen.web.errors import ApiError, FlowerJSON
from stamen.web.gate import api_gate

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(api_gate)], default_response_class=FlowerJSON)

#: Most tasks one bulk request may touch; ``limit`` may lower it, never raise it.
BULK_CAP = 1000
#: Tasks shown by a dry run.
SAMPLE_SIZE = 10
#: Header a retried task carries, naming the task it retries.
RETRY_HEADER = "stamen_retry_of"

_FILTERS = (
    ("search", "string", "query in the /api/tasks search language"),
    ("workername", "string", "exact worker hostname"),
    ("taskname", "string", "exact task name"),
    ("state", "string", "exact state"),
    ("received_start", "string", DATE_HELP),
    ("received_end", "string", DATE_HELP),
    ("started_start", "string", DATE_HELP),
    ("started_end", "string", DATE_HELP),
    ("dry_run", "boolean", "only count the matching tasks and show a sample"),
    (
        "limit",
        "integer",
        f"touch at most this many, newest first (1-{BULK_CAP}, default {BULK_CAP})",
    ),
)


# --- retry ----------------------------------------------------------------------------------


StoredCall = tuple[tuple[Any, ...], dict[str, Any]]


def _backend_calls(svc: Services, task_ids: list[str]) -> dict[str, StoredCall]:
    """The calls the result backend kept (``result_extended``) for ``task_ids``, in one
    lookup (one round trip on Redis); blocking.

    Exact where the events' reprs may be cut short (or masked with ``argsrepr``), so a
    retry prefers them. A backend that cannot answer leaves the events to decide.
    """
    if not task_ids or backfill_unavailable(svc.app) is not None:
        return {}
    try:
        metas = fetch_metas(svc.app.backend, task_ids)
    except Exception as exc:
        log.warning("Result backend lookup for retrying %d task(s) failed: %r", len(task_ids), exc)
        return {}
    calls = {}
    for task_id, meta in metas.items():
        args, kwargs = meta.get("args"), meta.get("kwargs")
        if isinstance(args, list | tuple) and isinstance(kwargs, dict | None):
            calls[task_id] = (tuple(args), dict(kwargs or {}))
    return calls


def _resend(svc: Services, task: dict[str, Any], stored: StoredCall | None) -> str:
    """Send a stored task again (``stored``: its call from the result backend, if kept);
    blocking. Returns the new task id."""
    limits = (svc.app.amqp.argsrepr_maxsize, svc.app.amqp.kwargsrepr_maxsize)
    try:
        name, args, kwargs, routing = rules.retry_call(task, stored, limits)
    except rules.InputError as exc:
        raise invalid(exc) from None
    try:
        result = svc.app.send_task(
            name, args=args, kwargs=kwargs, headers={RETRY_HEADER: task["uuid"]}, **routing
        )
    except EncodeError as exc:  # a literal the serializer cannot carry (a set, bytes in JSON)
        raise ApiError(400, f"the task's arguments cannot be serialized: {exc}") from None
    svc.actions.link_retry(result.id, task["uuid"])
    return str(result.id)


@router.post("/api/task/retry/{taskid:path}", summary="Send a task again with the same call")
@audited("task.retry", "taskid")
async def task_retry(request: Request, taskid: str) -> Any:
    check_role(request, OPERATOR, "task.retry")
    await _args(request)
    svc = services(request)
    task = await run_in_threadpool(svc.reader.get_task, taskid)
    if task is None:
        raise ApiError(404, f"Unknown task '{taskid}'")
    stored = await broker_call(svc, _backend_calls, svc, [taskid])
    new_id = await broker_call(svc, _resend, svc, task, stored.get(taskid))
    return {"message": f"Retrying '{taskid}' as '{new_id}'", "task-id": new_id, "retry-of": taskid}


@router.get("/api/task/retries/{taskid:path}", summary="Which task a retry re-sent, and back")
async def task_retries(request: Request, taskid: str) -> Any:
    return await run_in_threadpool(services(request).actions.retry_links, taskid)


# --- bulk -----------------------------------------------------------------------------------


_SELECTORS = (
    "search",
    "workername",
    "taskname",
    "state",
    "received_start",
    "received_end",
    "started_start",
    "started_end",
)


def _selection(args: Args) -> tuple[Any, int, bool]:
    """The task query, the cap and dry-run flag of a bulk request."""
    try:
        query = task_query_from(args)
    except SearchRejected as exc:
        raise ApiError(400, exc.message) from None
    if not any(getattr(query, f) is not None for f in _SELECTORS):
        raise ApiError(400, "A search query or filter is required for a bulk action")
    limit = args.get("limit", int, BULK_CAP)
    assert limit is not None
    if not 1 <= limit <= BULK_CAP:
        raise ApiError(400, f"Invalid argument 'limit': must be between 1 and {BULK_CAP}")
    dry_run = bool(args.get("dry_run", bool, False))
    return dataclasses.replace(query, limit=limit, offset=0), limit, dry_run


def _brief(task: dict[str, Any]) -> dict[str, Any]:
    return {k: task.get(k) for k in ("uuid", "name", "state", "worker", "received")}


async def _bulk(request: Request, action: str) -> Any:
    check_role(request, OPERATOR, f"tasks.bulk_{action}")
    args = await _args(request)
    query, limit, dry_run = _selection(args)
    svc = services(request)
    matched = await run_in_threadpool(
        svc.reader.count_tasks, dataclasses.replace(query, limit=None)
    )
    tasks = await run_in_threadpool(svc.reader.list_tasks, query)
    answer: dict[str, Any] = {
        "action": action,
        "dry_run": dry_run,
        "matched": matched,
        "count": len(tasks),
        "limit": limit,
    }
    if dry_run:
        answer["sample"] = [_brief(t) for t in tasks[:SAMPLE_SIZE]]
        answer["message"] = f"Would {action} {len(tasks)} of {matched} matching tasks"
        return answer
    if action == "revoke":
        terminate = bool(args.get("terminate", bool, False))
        try:
            signame = rules.parse_signal(args.get("signal"))
        except rules.InputError as exc:
            raise invalid(exc) from None
        ids = [t["uuid"] for t in tasks]
        if ids:
            await broker_call(
                svc, lambda: svc.app.control.revoke(ids, terminate=terminate, signal=signame)
            )
        answer["task_ids"] = ids
        answer["message"] = f"Revoked {len(ids)} of {matched} matching tasks"
        return answer
    retried: dict[str, str] = {}
    failed: dict[str, str] = {}
    stored = await broker_call(svc, _backend_calls, svc, [t["uuid"] for t in tasks])
    for task in tasks:
        try:
            call = stored.get(task["uuid"])
            retried[task["uuid"]] = await broker_call(svc, _resend, svc, task, call)
        except ApiError as exc:
            if exc.status == 503:
                raise
            failed[task["uuid"]] = exc.message
    answer["retried"] = retried
    answer["failed"] = failed
    answer["message"] = f"Retried {len(retried)} of {matched} matching tasks"
    return answer


@router.post(
    "/api/tasks/bulk/revoke",
    summary="Revoke every task matching a search (dry run first)",
    openapi_extra=params(
        *_FILTERS,
        ("terminate", "boolean", "also kill running ones"),
        ("signal", "string", "signal for terminate (default SIGTERM)"),
    ),
)
@audited("tasks.bulk_revoke")
async def bulk_revoke(request: Request) -> Any:
    return await _bulk(request, "revoke")


@router.post(
    "/api/tasks/bulk/retry",
    summary="Retry every task matching a search (dry run first)",
    openapi_extra=params(*_FILTERS),
)
@audited("tasks.bulk_retry")
async def bulk_retry(request: Request) -> Any:
    return await _bulk(request, "retry")


# --- queues ---------------------------------------------------------------------------------


def _queue_name(queue: str) -> str:
    try:
        return rules.check_name(queue, "queue")
    except rules.InputError as exc:
        raise invalid(exc) from None


def _purge(svc: Services, queue: str) -> int:
    """Delete every waiting message of ``queue``; blocking."""
    with svc.app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=2)
        # The transport's own channel errors: amqp raises NotFound (code 404) for a
        # queue the broker does not have; Redis simply purges nothing.
        try:
            return int(conn.default_channel.queue_purge(queue) or 0)
        except (ChannelError, *conn.channel_errors) as exc:
            if getattr(exc, "code", None) == 404:
                raise ApiError(404, f"Unknown queue '{queue}'") from None
            raise


@router.post("/api/queue/purge/{queue:path}", summary="Delete every waiting message of a queue")
@audited("queue.purge", "queue")
async def queue_purge(request: Request, queue: str) -> Any:
    check_role(request, OPERATOR, "queue.purge")
    await _args(request)
    svc = services(request)
    count = await broker_call(svc, _purge, svc, _queue_name(queue))
    return {"message": f"Purged {count} messages from '{queue}'", "purged": count}


def _pause(svc: Services, queue: str, user: str) -> dict[str, Any]:
    pauser = svc.pauser
    workers = consumers_of(pauser.active_queues(), queue)
    svc.actions.pause(queue, user, workers)
    replies = pauser.cancel(queue, workers)
    failed = {
        w: rules.reply_error(replies, w) for w in workers if rules.reply_ok(replies, w) is None
    }
    return {
        "message": f"Paused queue '{queue}' on {len(workers) - len(failed)} workers",
        "workers": workers,
        "failed": failed,
    }


def _resume(svc: Services, queue: str) -> dict[str, Any]:
    workers = svc.actions.resume(queue)
    if workers is None:
        raise ApiError(404, f"Queue '{queue}' is not paused")
    replies = svc.pauser.add(queue, workers)
    resumed = [w for w in workers if rules.reply_ok(replies, w) is not None]
    return {
        "message": f"Resumed queue '{queue}' on {len(resumed)} workers",
        "workers": resumed,
        # Workers that did not answer have gone; they consume it again when they restart.
        "missing": sorted(set(workers) - set(resumed)),
    }


@router.post(
    "/api/queue/pause/{queue:path}",
    summary="Stop every worker consuming a queue, including workers that start later",
)
@audited("queue.pause", "queue")
async def queue_pause(request: Request, queue: str) -> Any:
    check_role(request, OPERATOR, "queue.pause")
    await _args(request)
    svc = services(request)
    return await broker_call(svc, _pause, svc, _queue_name(queue), who(request))


@router.post("/api/queue/resume/{queue:path}", summary="Undo a pause: consume the queue again")
@audited("queue.resume", "queue")
async def queue_resume(request: Request, queue: str) -> Any:
    check_role(request, OPERATOR, "queue.resume")
    await _args(request)
    svc = services(request)
    return await broker_call(svc, _resume, svc, _queue_name(queue))


@router.get("/api/queues/paused", summary="Queues paused across the cluster")
async def queues_paused(request: Request) -> Any:
    return {"paused": await run_in_threadpool(services(request).actions.paused)}


# --- audit ----------------------------------------------------------------------------------


@router.get(
    "/api/audit",
    summary="The audit log of control and task actions, newest first",
    openapi_extra=params(
        ("limit", "integer", "entries (1-1000, default 100)"),
        ("offset", "integer", "entries to skip"),
        ("action", "string", "only this action, e.g. worker.shutdown"),
        ("target", "string", "only this worker, task, task type or queue"),
        ("user", "string", "only this user"),
    ),
)
async def audit_log(request: Request) -> Any:
    check_role(request, ADMIN, "audit.read", write=False)
    args = await Args.of(request)
    limit = args.get("limit", int, 100)
    offset = args.get("offset", int, 0)
    assert limit is not None and offset is not None
    if not 1 <= limit <= 1000:
        raise ApiError(400, "Invalid argument 'limit': must be between 1 and 1000")
    if offset < 0:
        raise ApiError(400, "Invalid argument 'offset': must not be negative")
    entries = await run_in_threadpool(
        functools.partial(
            services(request).actions.entries,
            limit=limit,
            offset=offset,
            action=args.get("action") or None,
            target=args.get("target") or None,
            user=args.get("user") or None,
        )
    )
    return {"entries": entries}
