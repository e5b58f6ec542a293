"""Stand-in for ``tornado.web``: ``authenticated``, the decorator of Flower's recipe for
protecting ``/metrics`` (``Metrics.get = tornado.web.authenticated(Metrics.get)``).

Applied to the stand-in ``flower.views.monitor.Metrics.get`` it makes Stamen require, on
``/metrics``, the authentication its pages require (see ``stamen.compat.HandlerPatches``).
Anything else of Tornado's is not provided: Stamen runs no Tornado handlers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def authenticated(method: F) -> F:
    """Mark ``method`` as needing an authenticated caller, like Tornado's decorator.

    The result calls ``method`` unchanged (Stamen never calls it); what matters is that it
    replaces the original ``Metrics.get``, which Stamen reads after running the file.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
