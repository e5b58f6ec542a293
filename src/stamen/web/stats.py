"""Aggregates for the charts, failures and workflow pages, computed from the store.

Every query is a range over an existing index: ``tasks_by_time`` (timestamp) for the charts,
``tasks_by_state`` (state, timestamp) for failures, ``tasks_by_root``/``tasks_by_parent``
for workflows. Rows are capped so a week of a very busy cluster costs a bounded amount of
work; the caps are reported back so the page can say the figures are partial.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from stamen.store.reader import StoreReader
from stamen.web.present import exception_type

#: Range name → (seconds covered, bucket width in seconds).
RANGES: dict[str, tuple[int, int]] = {
    "15m": (15 * 60, 30),
    "1h": (3600, 60),
    "1d": (86400, 30 * 60),
    "1w": (7 * 86400, 3 * 3600),
}
ROW_CAP = 200_000
FAILURE_CAP = 50_000
WORKFLOW_CAP = 2_000
_FINISHED = ("SUCCESS", "FAILURE")


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values; ``None`` when empty."""
    if not sorted_values:
        return None
    rank = max(math.ceil(q * len(sorted_values)) - 1, 0)
    return float(sorted_values[min(rank, len(sorted_values) - 1)])


def chart_data(reader: StoreReader, span: str, now: float) -> dict[str, Any]:
    """Per-bucket throughput, failure rate and runtime p50/p95, plus per-type runtimes.

    A task counts in the bucket of its last event, which for a finished task is when it
    finished. Series are arrays aligned on ``times`` (uPlot's data layout).
    """
    seconds, width = RANGES[span]
    start = now - seconds
    first = math.floor(start / width) * width
    n = math.ceil((now - first) / width)
    times = [first + i * width for i in range(n)]
    done = [0] * n
    failed = [0] * n
    runtimes: list[list[float]] = [[] for _ in range(n)]
    by_type: dict[str, list[float]] = defaultdict(list)
    count_by_type: dict[str, int] = defaultdict(int)
    rows = reader.conn.execute(
        "SELECT timestamp, state, runtime, name FROM tasks "
        "WHERE timestamp >= ? ORDER BY timestamp LIMIT ?",
        (start, ROW_CAP),
    ).fetchall()
    for ts, state, runtime, name in rows:
        if state not in _FINISHED:
            continue
        i = min(int((ts - first) // width), n - 1)
        done[i] += 1
        count_by_type[name or "(unknown)"] += 1
        if state == "FAILURE":
            failed[i] += 1
        if isinstance(runtime, (int, float)):
            runtimes[i].append(float(runtime))
            by_type[name or "(unknown)"].append(float(runtime))
    p50: list[float | None] = []
    p95: list[float | None] = []
    for bucket in runtimes:
        bucket.sort()
        p50.append(percentile(bucket, 0.5))
        p95.append(percentile(bucket, 0.95))
    types = []
    for name, values in by_type.items():
        values.sort()
        types.append(
            {
                "name": name,
                "count": count_by_type[name],
                "p50": percentile(values, 0.5),
                "p95": percentile(values, 0.95),
            }
        )
    types.sort(key=lambda t: -t["count"])
    return {
        "range": span,
        "bucket": width,
        "times": times,
        "throughput": [d / width * 60 for d in done],  # tasks per minute
        "failure_rate": [(f / d * 100 if d else None) for f, d in zip(failed, done, strict=True)],
        "p50": p50,
        "p95": p95,
        "types": types[:50],
        "finished": sum(done),
        "partial": len(rows) >= ROW_CAP,
    }


def failure_groups(reader: StoreReader, span: str, now: float) -> list[dict[str, Any]]:
    """Failures in the range grouped by (exception type, task name), most frequent first."""
    seconds, _ = RANGES[span]
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for uuid, name, exception, ts, traceback in reader.conn.execute(
        "SELECT uuid, name, exception, timestamp, traceback FROM tasks "
        "WHERE state = 'FAILURE' COLLATE NOCASE AND timestamp >= ? ORDER BY timestamp LIMIT ?",
        (now - seconds, FAILURE_CAP),
    ):
        key = (exception_type(exception), name or "(unknown)")
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "exception_type": key[0],
                "name": key[1],
                "count": 0,
                "first_seen": ts,
            }
        group["count"] += 1
        group["last_seen"] = ts
        group["sample_uuid"] = uuid
        group["sample_exception"] = exception
        group["sample_traceback"] = traceback
    return sorted(groups.values(), key=lambda g: (-g["count"], g["exception_type"], g["name"]))


def workflow(reader: StoreReader, taskid: str) -> dict[str, Any] | None:
    """The canvas a task belongs to, as a tree from its root (``None`` if the task is unknown).

    Edges come from ``parent_id``; tasks of the same root whose parent is not stored (a group
    started from a client, say) hang under the root so nothing of the workflow is hidden.
    """
    row = reader.conn.execute("SELECT root_id FROM tasks WHERE uuid = ?", (taskid,)).fetchone()
    if row is None:
        return None
    root_id = row[0] or taskid
    cols = ("uuid", "name", "state", "parent_id", "root_id", "received", "runtime")
    rows = reader.conn.execute(
        f"SELECT {', '.join(cols)} FROM tasks WHERE root_id = ? "
        f"UNION SELECT {', '.join(cols)} FROM tasks WHERE uuid = ? LIMIT ?",
        (root_id, root_id, WORKFLOW_CAP),
    ).fetchall()
    nodes = {r[0]: {**dict(zip(cols, r, strict=True)), "children": []} for r in rows}
    if root_id not in nodes:
        nodes[root_id] = {
            "uuid": root_id, "name": None, "state": None, "parent_id": None,
            "root_id": root_id, "received": None, "runtime": None, "children": [],
        }  # fmt: skip
    for node in sorted(nodes.values(), key=lambda n: (n["received"] or 0, n["uuid"])):
        if node["uuid"] == root_id:
            continue
        parent = nodes.get(node["parent_id"] or "") or nodes[root_id]
        if parent is node:
            parent = nodes[root_id]
        parent["children"].append(node)
    return {"root": nodes[root_id], "size": len(nodes), "partial": len(rows) >= WORKFLOW_CAP}
