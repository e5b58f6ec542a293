"""Running blocking broker and backend calls from request handlers.

They run in worker threads, never on the event loop (DESIGN rule 5). A broker or result
backend that cannot be reached answers 503 ``Broker or result backend unavailable``, as
Flower does; anything else unexpected is a 500 with no details leaked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import BackendError
from kombu.exceptions import OperationalError
from starlette.concurrency import run_in_threadpool

from stamen.web.errors import ApiError

if TYPE_CHECKING:
    from stamen.services import Services

log = logging.getLogger(__name__)
T = TypeVar("T")


def _unavailable_errors(svc: Services) -> tuple[type[BaseException], ...]:
    extra: tuple[type[BaseException], ...] = ()
    try:
        extra = tuple(svc.app.backend.connection_errors or ())
    except Exception:
        extra = ()
    return (BackendError, ConnectionError, OperationalError, TimeoutError, *extra)


async def blocking(svc: Services, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` in a thread, mapping broker trouble to 503."""
    started = time.monotonic()
    try:
        return await run_in_threadpool(fn, *args)
    except ApiError:
        raise
    except _unavailable_errors(svc) as exc:
        log.warning(
            "Broker or result backend unavailable after %.1f s: %s",
            time.monotonic() - started,
            exc,
        )
        raise ApiError(503, "Broker or result backend unavailable") from None
    except Exception:
        log.exception("Unexpected error in %s", getattr(fn, "__name__", fn))
        raise ApiError(500) from None
