"""Stand-in for ``flower.utils.template``: the formatting helpers ``format_task`` hooks call.

Follows Flower 2.2's semantics, and still accepts 2.1's ``length=`` keyword of ``humanize``
(2.2 removed it, which made hooks written from Flower's own docs raise and show the task
unformatted); with it, a long text is cut to ``length - 4`` characters plus `` ...``.
"""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import humanize as _humanize_lib

_UUID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)
# Abbreviations shown in capitals wherever they occur in a setting-like name.
_ACRONYM_RE = re.compile("ssl|uri|url|uuid|eta")
# Names shown as they are, not capitalised.
_KEEP_LOWER = frozenset({"args", "kwargs"})


def _zone(name: str) -> tzinfo:
    """The named zone, else the current Celery app's zone, else UTC."""
    if name:
        return ZoneInfo(name)
    try:
        from celery import current_app

        zone = current_app.timezone
    except Exception:  # no usable app: fall back like Flower does
        zone = None
    return zone if isinstance(zone, tzinfo) else timezone.utc


def format_time(timestamp: float, zone: tzinfo) -> str:
    """``YYYY-MM-DD HH:MM:SS.ffffff <zone name>`` for a Unix timestamp."""
    return datetime.fromtimestamp(float(timestamp), zone).strftime("%Y-%m-%d %H:%M:%S.%f %Z")


def format_duration(seconds: float | None) -> str:
    """A runtime for people: ``12.34 ms`` under a second, ``2.50 s`` under a minute,
    then ``4m 05s`` or ``1h 02m 03s`` (rounded to the second)."""
    if seconds is None:
        return ""
    value = float(seconds)
    if value < 1:
        return f"{value * 1000:.2f} ms"
    if value < 60:
        return f"{value:.2f} s"
    total = round(value)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"


def format_count(count: float | None) -> str:
    """A count with thousands separators; ``None`` counts as 0."""
    return f"{count or 0:,}"


def format_value(value: Any) -> str:
    """HTML for a value: escaped text, or a dash marked as missing for ``None``."""
    if value is None:
        return '<span class="value-missing">&mdash;</span>'
    return html.escape(str(value))


def task_link(url: str, task_id: str) -> str:
    """HTML link to a task showing its full id, or its first 8 characters on narrow screens."""
    full = html.escape(task_id)
    return (
        f'<a href="{html.escape(url)}" title="{full}">'
        f'<span class="task-id-full">{full}</span>'
        f'<span class="task-id-short">{html.escape(task_id[:8])}</span></a>'
    )


def _words(text: str) -> str:
    """``max_tasks_per_child`` -> ``Max tasks per child``; ``uri_prefix`` -> ``URI prefix``."""
    spaced = text.replace("-", " ").replace("_", " ")
    spaced = _ACRONYM_RE.sub(lambda match: match.group(0).upper(), spaced)
    if spaced and spaced not in _KEEP_LOWER:
        spaced = spaced[0].upper() + spaced[1:]
    return spaced


def humanize(obj: Any, type: str | None = None, length: int | None = None) -> Any:
    """Format ``obj`` for display, the way Flower's templates and ``format_task`` hooks expect.

    ``type`` is ``time[-<zone>]``, ``natural-time[-<zone>]`` or ``duration``; otherwise a
    setting-like string is turned into words, a list of plain values is joined with ``, ``
    and anything else is returned unchanged. ``length`` (Flower 2.1) shortens long text.
    """
    result: Any
    if obj is None:
        result = ""
    elif type is not None and type.startswith("time"):
        zone = _zone(type[len("time") :].lstrip("-"))
        result = format_time(obj, zone) if obj else ""
    elif type is not None and type.startswith("natural-time"):
        zone = _zone(type[len("natural-time") :].lstrip("-"))
        if not obj:
            result = ""
        else:
            age = datetime.now(zone) - datetime.fromtimestamp(float(obj), zone)
            if age < timedelta(days=1):
                result = _humanize_lib.naturaltime(age)
            else:
                result = format_time(obj, zone)
    elif type == "duration":
        result = format_duration(obj)
    elif isinstance(obj, str) and not _UUID_RE.match(obj):
        result = _words(obj)
    elif isinstance(obj, list) and all(isinstance(item, (int, float, str)) for item in obj):
        result = ", ".join(str(item) for item in obj)
    else:
        result = obj
    if length is not None and isinstance(result, str) and len(result) > length:
        result = result[: max(length - 4, 0)] + " ..."
    return result
