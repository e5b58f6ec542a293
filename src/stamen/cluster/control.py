"""Pure helpers for the control API: reading Celery's control replies, checking inputs.

Place in the pipeline: cluster access (DESIGN.md). Nothing here talks to the broker, so every
rule a control or execution endpoint applies to its input, and every way it reads a worker's
reply, is unit-tested without a cluster. The web handlers (``stamen.web.control`` and
``stamen.web.actions``) only glue these to requests and broadcasts.

Messages that reach the client are Flower 2.2's literal texts wherever Flower has one
(spec 4.2-4.4); where Flower answered a 500 for bad input we answer 400 with a clear message.
"""

from __future__ import annotations

import ast
import json
import math
import signal
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

#: Flower's date format for ``eta``/``expires`` (microseconds required, naive datetime).
DATE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
UNKNOWN_REASON = "Unknown reason"


class InputError(ValueError):
    """Bad client input; ``str(exc)`` is the 400 message to send back."""


# --- control replies --------------------------------------------------------------------------


def _entry(replies: Any, worker: str) -> Any:
    """The first reply entry that ``worker`` sent, or None.

    Flower reads only the first reply and crashes (500) when it is another worker's; we look
    through all of them, which gives the same answer whenever Flower's was not a 500.
    """
    if not isinstance(replies, list):
        return None
    for reply in replies:
        if isinstance(reply, Mapping) and worker in reply:
            return reply[worker]
    return None


def reply_ok(replies: Any, worker: str) -> str | None:
    """The worker's ``ok`` text when it accepted the command, else None.

    A string reply containing ``ok`` also counts, as in Flower (``'ok' in <str>``).
    """
    entry = _entry(replies, worker)
    if isinstance(entry, Mapping) and "ok" in entry:
        return str(entry["ok"])
    if isinstance(entry, str) and "ok" in entry:
        return entry
    return None


def reply_error(replies: Any, worker: str) -> str:
    """Why the worker refused: its ``error`` text, or Flower's ``Unknown reason``."""
    entry = _entry(replies, worker)
    if isinstance(entry, Mapping) and "error" in entry:
        return str(entry["error"])
    return UNKNOWN_REASON


# --- simple argument checks ---------------------------------------------------------------


def parse_signal(value: str | None) -> str:
    """A signal name Celery's worker understands (``SIGTERM``, ``TERM``, ``9``), normalised.

    Flower forwards any text and the worker then fails silently in its log; we refuse it.
    """
    if value is None or value == "":
        return "SIGTERM"
    text = value.strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text)).name
        except ValueError:
            raise InputError(f"Invalid signal '{value}'") from None
    name = text if text.startswith("SIG") else f"SIG{text}"
    if name not in signal.Signals.__members__:
        raise InputError(f"Invalid signal '{value}'")
    return name


def check_count(value: int | None, name: str, *, minimum: int = 1, maximum: int = 1000) -> int:
    """A pool-size style integer within sane bounds (Flower took any int, even -5)."""
    if value is None:
        return minimum
    if not minimum <= value <= maximum:
        raise InputError(f"Invalid argument '{name}': must be between {minimum} and {maximum}")
    return value


def check_seconds(value: float | None, name: str) -> float | None:
    """A non-negative, finite number of seconds, or None."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"Invalid argument '{name}': must be a non-negative number of seconds")
    return value


def check_name(value: str, what: str) -> str:
    """A queue or task name: non-empty, printable, not absurdly long."""
    if not value or len(value) > 512 or not value.isprintable():
        raise InputError(f"Invalid {what} name")
    return value


# --- task execution bodies (spec 4.4) -----------------------------------------------------

#: Options whose type we check before handing them to ``apply_async``: a wrong type there
#: surfaced as a 500 deep inside Celery or kombu.
_STR_OPTIONS = ("queue", "exchange", "routing_key", "task_id", "serializer", "compression")
_INT_OPTIONS = ("priority",)
_DICT_OPTIONS = ("headers",)


def parse_body(raw: bytes) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """``(args, kwargs, options)`` from an execution endpoint's JSON body (Flower's rules)."""
    if not raw.strip():
        options: Any = {}
    else:
        try:
            options = json.loads(raw)
        except UnicodeDecodeError:
            raise InputError("Body must be UTF-8 encoded JSON") from None
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if not isinstance(options, dict):
        raise InputError("invalid options")
    args = options.pop("args", [])
    kwargs = options.pop("kwargs", {})
    if args is None:
        args = []
    if kwargs is None:
        kwargs = {}
    if not isinstance(args, list):
        raise InputError("args must be an array")
    if not isinstance(kwargs, dict):
        raise InputError("kwargs must be an object")
    return args, kwargs, options


def _parse_date(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError(value)
    return datetime.strptime(value, DATE_FORMAT)


def _finite(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def normalise_options(options: dict[str, Any]) -> dict[str, Any]:
    """Flower's option normalisation plus type checks; any problem → ``Invalid option``."""
    result = dict(options)
    try:
        if "eta" in result:
            result["eta"] = _parse_date(result["eta"])
        if "countdown" in result:
            result["countdown"] = _finite(result["countdown"])
        if "expires" in result:
            expires = result["expires"]
            try:
                result["expires"] = _finite(expires)
            except (TypeError, ValueError):
                result["expires"] = _parse_date(expires)
        for key in _STR_OPTIONS:
            if key in result and not isinstance(result[key], str):
                raise ValueError(key)
        for key in _INT_OPTIONS:
            if key in result and (
                not isinstance(result[key], int)
                or isinstance(result[key], bool)
                or not 0 <= result[key] <= 255
            ):
                raise ValueError(key)
        for key in _DICT_OPTIONS:
            if key in result and not isinstance(result[key], dict):
                raise ValueError(key)
    except (TypeError, ValueError):
        raise InputError("Invalid option") from None
    return result


def pop_timeout(options: dict[str, Any]) -> float | None:
    """``apply``'s own ``timeout`` key, removed from the options (400 ``Invalid timeout``)."""
    if "timeout" not in options:
        return None
    value = options.pop("timeout")
    if value is None:
        return None
    try:
        seconds = _finite(value)
    except (TypeError, ValueError):
        raise InputError("Invalid timeout") from None
    if seconds < 0:
        raise InputError("Invalid timeout")
    return seconds


def check_call(task: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Celery's own signature check (``Task.__header__``, which ``apply_async`` runs when
    the task has ``typing``), ahead of publishing, so that a call that does not fit the
    task is reported as such rather than as a bad option."""
    header = getattr(task, "__header__", None)
    if header is None or not getattr(task, "typing", True):
        return
    try:
        header(*args, **kwargs)
    except TypeError as exc:
        raise InputError(f"Invalid arguments: {exc}") from None


# --- retrying a stored task ---------------------------------------------------------------


#: The most characters of a call's repr Celery puts in its events (``argsrepr_maxsize`` and
#: ``kwargsrepr_maxsize`` of ``app.amqp``); longer ones are cut and marked with "...".
REPR_MAXSIZE = 1024
SHORTENED = (
    "the task's arguments were shortened in its events, so they cannot be rebuilt "
    "(with result_extended the result backend keeps them whole)"
)


def _holds_ellipsis(value: Any) -> bool:
    """Whether ``...`` stands anywhere in ``value``: Celery's repr puts it where it cut a
    sequence short or stopped descending (``task_repr_maxlevels``)."""
    if value is Ellipsis:
        return True
    if isinstance(value, dict):
        return any(_holds_ellipsis(k) or _holds_ellipsis(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_ellipsis(v) for v in value)
    return False


def stored_value(text: Any, default: Any, maxsize: int = REPR_MAXSIZE) -> Any:
    """Rebuild args/kwargs from the repr a task event carried.

    Events carry ``argsrepr``/``kwargsrepr``: Python reprs, cut short by the sender past
    ``maxsize`` characters. A cut repr may still read as a literal (a string that now ends
    in "...", an ``...`` item), so a repr that reaches ``maxsize`` and holds "...", or one
    that evaluates to something holding ``...``, counts as cut. Only literals can be
    rebuilt; anything else cannot be retried faithfully, so we refuse rather than send
    different arguments.
    """
    if text is None or text == "":
        return default
    if not isinstance(text, str):
        return text
    if len(text) >= maxsize and "..." in text:
        raise InputError(SHORTENED)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise InputError("the task's arguments cannot be rebuilt from its events") from None
    if _holds_ellipsis(value):
        raise InputError(SHORTENED)
    return value


def retry_call(
    task: Mapping[str, Any],
    stored: tuple[Any, Any] | None = None,
    maxsize: tuple[int, int] = (REPR_MAXSIZE, REPR_MAXSIZE),
) -> tuple[str, list[Any] | tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """``(name, args, kwargs, routing options)`` to send a stored task again.

    ``stored`` is the call as the result backend kept it, when it did (exact); otherwise
    the events' reprs are rebuilt, ``maxsize`` being the sender's repr limits for args and
    kwargs.
    """
    name = task.get("name")
    if not name:
        raise InputError("the task's name is not known yet, so it cannot be retried")
    if stored is not None:
        args, kwargs = stored
    else:
        args = stored_value(task.get("args"), [], maxsize[0])
        kwargs = stored_value(task.get("kwargs"), {}, maxsize[1])
    # A tuple stays a tuple so the new task's event shows the same args repr.
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise InputError("the task's arguments cannot be rebuilt from its events")
    routing: dict[str, Any] = {}
    exchange, routing_key = task.get("exchange"), task.get("routing_key")
    if routing_key:
        if not exchange or exchange == routing_key:
            # Celery's usual layout (a direct exchange named after its queue, or the
            # default exchange): the routing key is the queue; naming it declares it too.
            routing["queue"] = routing_key
        else:
            routing["exchange"] = exchange
            routing["routing_key"] = routing_key
    return str(name), args, kwargs, routing
