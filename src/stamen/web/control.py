"""Flower's control and execution API (spec 4.2-4.4): workers, task control, task execution.

Paths, parameters (query string or form body; a JSON body for execution), reply messages,
status codes and error texts are Flower 2.2's. Every broker round trip runs in a thread with
a deadline (a broker that does not answer is a 503, never a stuck request), and every call is
written to the audit log (``stamen.audit``) with who made it and how it went.

Deliberate differences from Flower: bad input that Flower turned into a 500 (a ``kwargs`` that
is not an object, a bad signal name, a pool size of -3) is a 400 with a clear message; a worker
that is not in the inspector cache is inspected once before answering ``Unknown worker``
(spec 12.14); ``apply`` never waits for ever, and refuses (503) instead of publishing when
there is no result backend to wait on.

Check order, as Flower: read-only mode, then the worker (404), then the arguments (400);
for the task endpoints the required arguments, then the task, then the worker.

Who may do what: ``read_only`` refuses every action (403 ``Read only mode is enabled``), then
:func:`check_role` asks ``stamen.web.gate.require_role`` when the auth module provides it, or
the :func:`allowed` hook otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from celery.backends.base import DisabledBackend
from celery.contrib.abortable import AbortableAsyncResult
from celery.result import AsyncResult
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from stamen.cluster import control as rules
from stamen.services import Services
from stamen.web import gate
from stamen.web.api import _read_result
from stamen.web.args import Args
from stamen.web.blocking import blocking
from stamen.web.docs import params
from stamen.web.errors import ApiError, FlowerJSON, plain
from stamen.web.gate import api_gate

log = logging.getLogger(__name__)
T = TypeVar("T")

router = APIRouter(dependencies=[Depends(api_gate)], default_response_class=FlowerJSON)

#: Seconds to wait for a control reply. Flower waits Celery's default 1 s; every command
#: here names its workers, so Celery stops waiting as soon as they all replied, and the
#: longer bound only spares a busy worker from being reported as ``Unknown reason``.
REPLY_TIMEOUT_S = 3.0
#: Longest a publish or broadcast may take before the request answers 503.
BROKER_DEADLINE_S = 10.0
#: How long ``apply`` waits for the result when the body gives no ``timeout``.
APPLY_DEFAULT_WAIT_S = 60.0
#: Roles (``stamen.web.roles``): ``admin`` for worker shutdown and the audit log,
#: ``operator`` for every other action.
OPERATOR, ADMIN = "operator", "admin"

_JSON_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "args": {"type": "array", "items": {}},
                        "kwargs": {"type": "object"},
                        "eta": {"type": "string", "example": "2030-01-01 12:00:00.000000"},
                        "countdown": {"type": "number"},
                        "expires": {"type": ["number", "string"]},
                    },
                    "additionalProperties": True,
                    "description": "other keys are passed to apply_async/send_task as options",
                }
            }
        },
    }
}


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def who(request: Request) -> str:
    """The authenticated user the auth layer put on the request, else ``anonymous``."""
    user = getattr(request.state, "user", None)
    return str(user) if user else "anonymous"


def allowed(request: Request, action: str) -> bool:
    """Hook for role checks while ``gate.require_role`` does not exist: allow everything.

    ``action`` is the audit action name (``worker.shutdown``, ``task.revoke``, ...).
    """
    return True


def check_role(request: Request, role: str, action: str, *, write: bool = True) -> None:
    """Refuse read-only mode (Flower's 403 text) for actions, and callers without ``role``.

    ``gate.require_role`` (the auth module's check, which also enforces read-only mode) is
    used when it exists; otherwise read-only mode here and the :func:`allowed` hook. A read
    (``write=False``, e.g. the audit log) is not an action, so read-only mode does not
    refuse it: only the caller's role is checked.
    """
    if not write:
        identity = getattr(request.state, "identity", None)
        can = getattr(identity, "can", None)
        if can is not None and not can(role):
            raise ApiError(403, f"Forbidden: this needs the {role} role")
        if can is None and not allowed(request, action):
            raise ApiError(403, "Forbidden")
        return
    require_role = getattr(gate, "require_role", None)
    if require_role is not None:
        if require_role(request, role) is False:
            raise ApiError(403, "Forbidden")
        return
    if services(request).settings.read_only:
        raise ApiError(403, "Read only mode is enabled")
    if not allowed(request, action):
        raise ApiError(403, "Forbidden")


def audited(action: str, target: str | None = None) -> Callable[[Any], Any]:
    """Record every call of the wrapped handler in the audit log, whatever its outcome.

    ``target`` names the path parameter the action is about. A handler may put
    ``request.state.audit_params`` (what it acted with) and ``request.state.audit_target``.
    Failing to write the log never fails the action: it is logged instead.
    """

    def wrap(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def run(request: Request, **kwargs: Any) -> Any:
            status, message = 500, ""
            try:
                response = await handler(request, **kwargs)
            except ApiError as exc:
                status, message = exc.status, exc.message
                raise
            else:
                if isinstance(response, Response):
                    status = response.status_code
                    message = bytes(response.body or b"")[:500].decode("utf-8", "replace")
                else:
                    status = 200
                    if isinstance(response, dict):
                        message = str(response.get("message", ""))
                return response
            finally:
                await _audit(
                    request, action, kwargs.get(target) if target else None, status, message
                )

        return run

    return wrap


async def _audit(
    request: Request, action: str, target: str | None, status: int, message: str
) -> None:
    svc = services(request)
    state = request.state
    params = getattr(state, "audit_params", None)
    if params is None:
        params = dict(request.query_params)
    target = getattr(state, "audit_target", target)
    try:
        await run_in_threadpool(
            svc.actions.record,
            user=who(request),
            action=action,
            target=target,
            params=params,
            status=status,
            message=message,
        )
    except Exception:
        log.exception("Could not write the audit log for %s %s", action, target)


async def broker_call(svc: Services, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread; a broker that does not answer in time is a 503."""
    try:
        return await asyncio.wait_for(blocking(svc, fn, *args), BROKER_DEADLINE_S)
    except TimeoutError:
        log.warning("Broker call %s took longer than %.0f s", fn, BROKER_DEADLINE_S)
        raise ApiError(503, "Broker or result backend unavailable") from None


def invalid(exc: rules.InputError) -> ApiError:
    return ApiError(400, str(exc))


async def require_worker(svc: Services, workername: str) -> None:
    """404 ``Unknown worker`` unless the inspector knows it (inspecting it once if not)."""
    if svc.inspector.known(workername):
        return
    try:
        await asyncio.wait_for(svc.inspector.inspect(workername), BROKER_DEADLINE_S)
    except Exception as exc:
        log.info("Inspecting unknown worker %s failed: %s", workername, exc)
    if not svc.inspector.known(workername):
        raise ApiError(404, f"Unknown worker '{workername}'")


def require_task(svc: Services, taskname: str) -> Any:
    """The task registered in Stamen's own Celery app, else Flower's 404."""
    task = svc.app.tasks.get(taskname)
    if task is None:
        raise ApiError(404, f"Unknown task '{taskname}'")
    return task


async def _args(request: Request) -> Args:
    """The request's arguments, also kept for the audit row."""
    args = await Args.of(request)
    # ``_xsrf`` is the UI's anti-forgery token: a credential, not a parameter.
    request.state.audit_params = {k: v for k, v in args._values.items() if k != "_xsrf"}
    return args


# --- worker control (spec 4.2) ------------------------------------------------------------


async def _worker_command(
    request: Request,
    workername: str,
    command: Callable[[Services], Any],
    success: Callable[[str], str],
    failure: str,
) -> dict[str, str]:
    """Send one reply-expecting command to ``workername``; Flower's success/403 rules."""
    svc = services(request)
    await require_worker(svc, workername)
    replies = await broker_call(svc, command, svc)
    ok = rules.reply_ok(replies, workername)
    if ok is None:
        raise ApiError(403, f"{failure}: {rules.reply_error(replies, workername)}")
    return {"message": success(ok)}


@router.post("/api/worker/shutdown/{workername:path}", summary="Shut a worker down")
@audited("worker.shutdown", "workername")
async def worker_shutdown(request: Request, workername: str) -> Any:
    check_role(request, ADMIN, "worker.shutdown")
    await _args(request)
    svc = services(request)
    await require_worker(svc, workername)
    await broker_call(svc, lambda: svc.app.control.broadcast("shutdown", destination=[workername]))
    return {"message": "Shutting down!"}


@router.post("/api/worker/pool/restart/{workername:path}", summary="Restart a worker's pool")
@audited("worker.pool_restart", "workername")
async def pool_restart(request: Request, workername: str) -> Any:
    check_role(request, OPERATOR, "worker.pool_restart")
    await _args(request)
    return await _worker_command(
        request,
        workername,
        lambda svc: svc.app.control.broadcast(
            "pool_restart",
            arguments={"reload": False},
            destination=[workername],
            reply=True,
            timeout=REPLY_TIMEOUT_S,
        ),
        lambda ok: f"Restarting '{workername}' worker's pool",
        f"Failed to restart the '{workername}' pool",
    )


async def _pool_size(request: Request, workername: str, grow: bool) -> Any:
    action = "worker.pool_grow" if grow else "worker.pool_shrink"
    check_role(request, OPERATOR, action)
    args = await _args(request)
    await require_worker(services(request), workername)  # Flower: the worker, then n
    try:
        n = rules.check_count(args.get("n", int, 1), "n")
    except rules.InputError as exc:
        raise invalid(exc) from None
    verb = "grow" if grow else "shrink"
    method = "pool_grow" if grow else "pool_shrink"
    return await _worker_command(
        request,
        workername,
        lambda svc: getattr(svc.app.control, method)(
            n=n, reply=True, destination=[workername], timeout=REPLY_TIMEOUT_S
        ),
        lambda ok: f"{'Growing' if grow else 'Shrinking'} '{workername}' worker's pool by {n}",
        f"Failed to {verb} '{workername}' worker's pool",
    )


@router.post(
    "/api/worker/pool/grow/{workername:path}",
    summary="Add processes to a worker's pool",
    openapi_extra=params(("n", "integer", "how many (1-1000, default 1)")),
)
@audited("worker.pool_grow", "workername")
async def pool_grow(request: Request, workername: str) -> Any:
    return await _pool_size(request, workername, grow=True)


@router.post(
    "/api/worker/pool/shrink/{workername:path}",
    summary="Remove processes from a worker's pool",
    openapi_extra=params(("n", "integer", "how many (1-1000, default 1)")),
)
@audited("worker.pool_shrink", "workername")
async def pool_shrink(request: Request, workername: str) -> Any:
    return await _pool_size(request, workername, grow=False)


@router.post(
    "/api/worker/pool/autoscale/{workername:path}",
    summary="Set a worker's autoscale range",
    openapi_extra=params(
        ("min", "integer", "fewest pool processes"),
        ("max", "integer", "most pool processes"),
        required=("min", "max"),
    ),
)
@audited("worker.autoscale", "workername")
async def pool_autoscale(request: Request, workername: str) -> Any:
    check_role(request, OPERATOR, "worker.autoscale")
    args = await _args(request)
    await require_worker(services(request), workername)
    low = args.get("min", int, required=True)
    high = args.get("max", int, required=True)
    assert low is not None and high is not None
    try:
        rules.check_count(low, "min", minimum=0)
        rules.check_count(high, "max")
    except rules.InputError as exc:
        raise invalid(exc) from None
    if low > high:
        raise ApiError(400, "Invalid arguments: min must not be greater than max")
    return await _worker_command(
        request,
        workername,
        lambda svc: svc.app.control.broadcast(
            "autoscale",
            arguments={"min": low, "max": high},
            destination=[workername],
            reply=True,
            timeout=REPLY_TIMEOUT_S,
        ),
        lambda ok: f"Autoscaling '{workername}' worker (min={low}, max={high})",
        f"Failed to autoscale '{workername}' worker",
    )


async def _consumer(request: Request, workername: str, add: bool) -> Any:
    action = "worker.add_consumer" if add else "worker.cancel_consumer"
    check_role(request, OPERATOR, action)
    args = await _args(request)
    await require_worker(services(request), workername)
    queue = args.get("queue", required=True)
    assert queue is not None
    try:
        rules.check_name(queue, "queue")
    except rules.InputError as exc:
        raise invalid(exc) from None
    command = "add_consumer" if add else "cancel_consumer"
    failure = (
        f"Failed to add '{queue}' consumer to '{workername}' worker"
        if add
        else f"Failed to cancel '{queue}' consumer from '{workername}' worker"
    )
    return await _worker_command(
        request,
        workername,
        lambda svc: svc.app.control.broadcast(
            command,
            arguments={"queue": queue},
            destination=[workername],
            reply=True,
            timeout=REPLY_TIMEOUT_S,
        ),
        lambda ok: ok,
        failure,
    )


@router.post(
    "/api/worker/queue/add-consumer/{workername:path}",
    summary="Make a worker consume a queue",
    openapi_extra=params(("queue", "string", "queue name"), required=("queue",)),
)
@audited("worker.add_consumer", "workername")
async def add_consumer(request: Request, workername: str) -> Any:
    return await _consumer(request, workername, add=True)


@router.post(
    "/api/worker/queue/cancel-consumer/{workername:path}",
    summary="Make a worker stop consuming a queue",
    openapi_extra=params(("queue", "string", "queue name"), required=("queue",)),
)
@audited("worker.cancel_consumer", "workername")
async def cancel_consumer(request: Request, workername: str) -> Any:
    return await _consumer(request, workername, add=False)


# --- task control (spec 4.3) --------------------------------------------------------------


@router.post(
    "/api/task/revoke/{taskid:path}",
    summary="Revoke a task, optionally terminating it if it runs",
    openapi_extra=params(
        ("terminate", "boolean", "also kill the process running it"),
        ("signal", "string", "signal for terminate (default SIGTERM)"),
    ),
)
@audited("task.revoke", "taskid")
async def task_revoke(request: Request, taskid: str) -> Any:
    check_role(request, OPERATOR, "task.revoke")
    args = await _args(request)
    terminate = bool(args.get("terminate", bool, False))
    try:
        signame = rules.parse_signal(args.get("signal"))
    except rules.InputError as exc:
        raise invalid(exc) from None
    svc = services(request)
    await broker_call(
        svc, lambda: svc.app.control.revoke(taskid, terminate=terminate, signal=signame)
    )
    return {"message": f"Revoked '{taskid}'"}


async def _task_worker_args(request: Request) -> tuple[Args, str]:
    args = await _args(request)
    workername = args.get("workername", required=True)
    assert workername is not None
    return args, workername


@router.post(
    "/api/task/timeout/{taskname:path}",
    summary="Set a task type's soft and hard time limits on a worker",
    openapi_extra=params(
        ("workername", "string", "worker to change"),
        ("hard", "number", "hard time limit, seconds"),
        ("soft", "number", "soft time limit, seconds"),
        required=("workername",),
    ),
)
@audited("task.timeout", "taskname")
async def task_timeout(request: Request, taskname: str) -> Any:
    check_role(request, OPERATOR, "task.timeout")
    args, workername = await _task_worker_args(request)
    try:
        hard = rules.check_seconds(args.get("hard", float), "hard")
        soft = rules.check_seconds(args.get("soft", float), "soft")
    except rules.InputError as exc:
        raise invalid(exc) from None
    svc = services(request)
    require_task(svc, taskname)
    await require_worker(svc, workername)
    replies = await broker_call(
        svc,
        lambda: svc.app.control.time_limit(
            taskname,
            soft=soft,
            hard=hard,
            reply=True,
            destination=[workername],
            timeout=REPLY_TIMEOUT_S,
        ),
    )
    ok = rules.reply_ok(replies, workername)
    if ok is None:
        raise ApiError(403, f"Failed to set timeouts: '{rules.reply_error(replies, workername)}'")
    return {"message": ok}


@router.post(
    "/api/task/rate-limit/{taskname:path}",
    summary="Set a task type's rate limit on a worker",
    openapi_extra=params(
        ("workername", "string", "worker to change"),
        ("ratelimit", "string", "e.g. 10/m, 2/s, 100/h; 0 or empty disables"),
        required=("workername", "ratelimit"),
    ),
)
@audited("task.rate_limit", "taskname")
async def task_rate_limit(request: Request, taskname: str) -> Any:
    check_role(request, OPERATOR, "task.rate_limit")
    args, workername = await _task_worker_args(request)
    ratelimit = args.get("ratelimit", required=True)
    svc = services(request)
    require_task(svc, taskname)
    await require_worker(svc, workername)
    replies = await broker_call(
        svc,
        lambda: svc.app.control.rate_limit(
            taskname,
            ratelimit,
            reply=True,
            destination=[workername],
            timeout=REPLY_TIMEOUT_S,
        ),
    )
    ok = rules.reply_ok(replies, workername)
    if ok is None:
        raise ApiError(403, f"Failed to set rate limit: '{rules.reply_error(replies, workername)}'")
    return {"message": ok}


@router.post("/api/task/abort/{taskid:path}", summary="Abort an AbortableTask")
@audited("task.abort", "taskid")
async def task_abort(request: Request, taskid: str) -> Any:
    check_role(request, OPERATOR, "task.abort")
    await _args(request)
    svc = services(request)
    if isinstance(svc.app.backend, DisabledBackend):
        return plain(503)
    await broker_call(svc, lambda: AbortableAsyncResult(taskid, app=svc.app).abort())
    return {"message": f"Aborted '{taskid}'"}


# --- task execution (spec 4.4) ------------------------------------------------------------


async def _execution(
    request: Request, taskname: str, *, registered: bool
) -> tuple[Services, Any, list[Any], dict[str, Any], dict[str, Any]]:
    """Flower's check order: read-only, body, task lookup, then options."""
    check_role(request, OPERATOR, "task.execute")
    raw = await request.body()
    try:
        args, kwargs, options = rules.parse_body(raw)
    except rules.InputError as exc:
        raise invalid(exc) from None
    request.state.audit_params = {"args": args, "kwargs": kwargs, "options": options}
    svc = services(request)
    task = require_task(svc, taskname) if registered else None
    if not registered:
        try:
            rules.check_name(taskname, "task")
        except rules.InputError as exc:
            raise invalid(exc) from None
    return svc, task, args, kwargs, options


def _publish(publish: Callable[[], AsyncResult]) -> AsyncResult:
    """Publish in a thread; Celery's type complaints about options are the client's fault."""
    try:
        return publish()
    except (TypeError, ValueError) as exc:
        log.info("Publishing refused its options: %s", exc)
        raise ApiError(400, "Invalid option") from None


def _published(svc: Services, publish: Callable[[], AsyncResult]) -> dict[str, Any]:
    result = _publish(publish)
    answer: dict[str, Any] = {"task-id": result.id}
    if not isinstance(svc.app.backend, DisabledBackend):
        answer["state"] = result.state
    return answer


@router.post(
    "/api/task/apply/{taskname:path}",
    summary="Run a registered task and wait for its result",
    openapi_extra=_JSON_BODY,
)
@audited("task.apply", "taskname")
async def task_apply(request: Request, taskname: str) -> Any:
    svc, task, args, kwargs, options = await _execution(request, taskname, registered=True)
    try:
        wait = rules.pop_timeout(options)
        options = rules.normalise_options(options)
        rules.check_call(task, args, kwargs)
    except rules.InputError as exc:
        raise invalid(exc) from None
    if isinstance(svc.app.backend, DisabledBackend):
        raise ApiError(503, "No result backend is configured to wait on; use async-apply")
    result = await broker_call(
        svc, _publish, lambda: task.apply_async(args=args, kwargs=kwargs, **options)
    )
    wait = APPLY_DEFAULT_WAIT_S if wait is None else wait
    try:
        return await asyncio.wait_for(
            blocking(svc, _read_result, result, wait or None), wait + BROKER_DEADLINE_S
        )
    except TimeoutError:
        return {"task-id": result.id, "state": "PENDING"}


@router.post(
    "/api/task/async-apply/{taskname:path}",
    summary="Publish a registered task without waiting",
    openapi_extra=_JSON_BODY,
)
@audited("task.async_apply", "taskname")
async def task_async_apply(request: Request, taskname: str) -> Any:
    svc, task, args, kwargs, options = await _execution(request, taskname, registered=True)
    try:
        options = rules.normalise_options(options)
        rules.check_call(task, args, kwargs)
    except rules.InputError as exc:
        raise invalid(exc) from None
    return await broker_call(
        svc, _published, svc, lambda: task.apply_async(args=args, kwargs=kwargs, **options)
    )


@router.post(
    "/api/task/send-task/{taskname:path}",
    summary="Publish a task by name (it need not be registered here)",
    openapi_extra=_JSON_BODY,
)
@audited("task.send_task", "taskname")
async def task_send(request: Request, taskname: str) -> Any:
    svc, _, args, kwargs, options = await _execution(request, taskname, registered=False)
    try:
        options = rules.normalise_options(options)
    except rules.InputError as exc:
        raise invalid(exc) from None
    return await broker_call(
        svc,
        _published,
        svc,
        lambda: svc.app.send_task(taskname, args=args, kwargs=kwargs, **options),
    )
