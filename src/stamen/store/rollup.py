"""Rollups: what each finished task adds to the charts and failure groups, kept by the writer.

The charts and failures pages read these small aggregates instead of scanning task rows,
so their cost depends on the range and the number of task types, not on the history size.
A task counts once it is SUCCESS or FAILURE, in the bucket of its ``timestamp`` (its last
event), at every width in ``WIDTHS``. Runtimes go into a histogram of log-spaced bins
(ratio ``RATIO``), so a percentile read back from it is within about 5% of the exact one.

Everything here is pure: ingest computes each task's contribution before and after a batch
and hands the writer the net change (:class:`RollupDelta`), which the backends apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

#: Bucket widths stored, in seconds: 30 s for the 15m/1h charts, 30 min for 1d, 3 h for 1w
#: (otherwise the 1-week chart would merge a histogram per 30 min, task type and state).
FINE = 30
COARSE = 30 * 60
WIDE = 3 * 3600
WIDTHS: tuple[int, ...] = (FINE, COARSE, WIDE)
#: Rollups older than the longest range (a week, plus a day so the range's first bucket is
#: whole) are deleted by the writer now and then.
KEEP_SECONDS = 8 * 86400
FINISHED = ("SUCCESS", "FAILURE")
#: Ratio between the edges of consecutive runtime bins.
RATIO = 1.1
_LOG_RATIO = math.log(RATIO)
#: Bins for runtimes that are not positive numbers: none reported, and zero (or less).
NO_RUNTIME = -10_000
ZERO = -9_999
#: Positive runtimes are clamped to bins ±LIMIT (about 1e-33 s to 1e33 s).
_LIMIT = 800
UNKNOWN = "(unknown)"


def exception_type(exception: str | None) -> str:
    """``KeyError('foo')`` → ``KeyError``: what failures are grouped by."""
    if not exception:
        return UNKNOWN
    head = str(exception).split("(", 1)[0].strip()
    return head or UNKNOWN


def runtime_bin(runtime: Any) -> int:
    """The histogram bin of a runtime: ``floor(log_RATIO(runtime))``, or a sentinel bin."""
    if isinstance(runtime, bool) or not isinstance(runtime, (int, float)):
        return NO_RUNTIME
    if runtime != runtime:  # NaN
        return NO_RUNTIME
    if runtime <= 0:
        return ZERO
    if math.isinf(runtime):
        return _LIMIT
    return max(-_LIMIT, min(_LIMIT, math.floor(math.log(runtime) / _LOG_RATIO)))


def bin_value(b: int) -> float | None:
    """The runtime a bin stands for: its geometric middle (``None`` for no runtime)."""
    if b == NO_RUNTIME:
        return None
    if b == ZERO:
        return 0.0
    return float(RATIO ** (b + 0.5))


def percentile(hist: Mapping[int, int], q: float) -> float | None:
    """Nearest-rank percentile of the runtimes in ``hist`` (bin → count); ``None`` if none."""
    items = sorted((b, n) for b, n in hist.items() if b != NO_RUNTIME and n > 0)
    total = sum(n for _, n in items)
    if not total:
        return None
    rank = max(math.ceil(q * total), 1)
    seen = 0
    for b, n in items:
        seen += n
        if seen >= rank:
            return bin_value(b)
    return bin_value(items[-1][0])


def merge_into(target: dict[int, int], hist: Mapping[int, int]) -> None:
    """Add ``hist`` to ``target`` in place."""
    get = target.get
    for b, n in hist.items():
        target[b] = get(b, 0) + n


def bucket_of(ts: float, width: int) -> float:
    """The start of the bucket of width ``width`` that ``ts`` falls in."""
    return float(math.floor(ts / width) * width)


class Contribution(NamedTuple):
    """What one task adds to the rollups (``None`` stands for "nothing")."""

    ts: float
    name: str
    state: str
    bin: int
    exception_type: str | None
    uuid: str


def contribution(task: Mapping[str, Any]) -> Contribution | None:
    """The task's contribution: only finished tasks with a numeric timestamp count."""
    state = task.get("state")
    if state not in FINISHED:
        return None
    ts = task.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return None
    name = task.get("name")
    name = _clean(name) if isinstance(name, str) and name else UNKNOWN
    failed = state == "FAILURE"
    return Contribution(
        ts=float(ts),
        name=name,
        state=state,
        bin=runtime_bin(task.get("runtime")),
        exception_type=_clean(exception_type(task.get("exception"))) if failed else None,
        uuid=str(task.get("uuid")),
    )


def _clean(text: str) -> str:
    """NUL becomes U+FFFD, as PostgreSQL stores task text, so both backends group alike."""
    return text.replace("\0", "\ufffd") if "\0" in text else text


@dataclass
class FailureDelta:
    """The net change of one failure group row."""

    count: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    sample_uuid: str | None = None


@dataclass
class RollupDelta:
    """Net changes of a batch, aggregated so the writer makes one upsert per row touched.

    ``tasks`` maps (width, bucket, name, state) → {bin: count change}; ``failures`` maps
    (width, bucket, exception type, name) → :class:`FailureDelta`. Counts can be negative:
    a task counted earlier whose state, timestamp or runtime changed is taken back out.
    """

    tasks: dict[tuple[int, float, str, str], dict[int, int]] = field(default_factory=dict)
    failures: dict[tuple[int, float, str, str], FailureDelta] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tasks or self.failures)

    def add(self, c: Contribution, sign: int = 1) -> None:
        """Count ``c`` in (``sign`` 1) or out of (``sign`` -1) its buckets."""
        for width in WIDTHS:
            bucket = bucket_of(c.ts, width)
            hist = self.tasks.setdefault((width, bucket, c.name, c.state), {})
            hist[c.bin] = hist.get(c.bin, 0) + sign
            if c.exception_type is None:
                continue
            key = (width, bucket, c.exception_type, c.name)
            group = self.failures.get(key)
            if group is None:
                group = self.failures[key] = FailureDelta()
            group.count += sign
            if sign > 0:
                if group.first_seen is None or c.ts < group.first_seen:
                    group.first_seen = c.ts
                if group.last_seen is None or c.ts >= group.last_seen:
                    group.last_seen = c.ts
                    group.sample_uuid = c.uuid

    def change(self, before: Contribution | None, after: Contribution | None) -> None:
        """Record a task going from ``before`` to ``after`` (either may be ``None``)."""
        if before == after:
            return
        if before is not None:
            self.add(before, -1)
        if after is not None:
            self.add(after, 1)

    def compact(self) -> None:
        """Drop changes that cancelled out, so nothing is written for them."""
        for key, hist in list(self.tasks.items()):
            for b in [b for b, n in hist.items() if n == 0]:
                del hist[b]
            if not hist:
                del self.tasks[key]
        for key, group in list(self.failures.items()):
            if group.count == 0 and group.last_seen is None:
                del self.failures[key]


def delta_of(tasks: Iterable[Mapping[str, Any]]) -> RollupDelta:
    """The rollups of ``tasks`` from scratch (a migration builds them so)."""
    delta = RollupDelta()
    for task in tasks:
        c = contribution(task)
        if c is not None:
            delta.add(c)
    return delta


def merge_hist(stored: Mapping[int, int], change: Mapping[int, int]) -> dict[int, int]:
    """A stored histogram with a change applied; bins that reach zero (or less) go."""
    merged = dict(stored)
    merge_into(merged, change)
    return {b: n for b, n in merged.items() if n > 0}


def encode_hist(hist: Mapping[int, int]) -> str:
    """The stored text of a histogram: a flat JSON list ``[bin, count, bin, count, ...]``
    ascending by bin (JSON because orjson parses it in C: the 1-week chart reads 20k)."""
    return orjson.dumps([x for pair in sorted(hist.items()) for x in pair]).decode()


def decode_hist(text: str | None) -> dict[int, int]:
    """Inverse of :func:`encode_hist` (empty text is an empty histogram)."""
    if not text:
        return {}
    flat = orjson.loads(text)
    return dict(zip(flat[::2], flat[1::2], strict=True))


def merge_encoded(text: str, first: dict[int, int], second: dict[int, int]) -> int:
    """Add an encoded histogram to two histograms in one pass (a chart bucket's and a task
    type's); returns how many tasks it holds."""
    flat = orjson.loads(text)
    pairs = iter(flat)
    total = 0
    first_get = first.get
    second_get = second.get
    for b, n in zip(pairs, pairs, strict=True):
        first[b] = first_get(b, 0) + n
        second[b] = second_get(b, 0) + n
        total += n
    return total
