"""Aggregates for the charts, failures and workflow pages, from the store's rollups.

Charts and failure groups read the rollups the writer keeps (``stamen.store.rollup``):
per bucket, task type and final state a count and a runtime histogram, and per bucket,
exception type and task name a failure count. Their cost depends on the range and the number
of task types, not on how many tasks are stored, and trimming the history (``max_tasks``)
does not shrink them. Ranges start at the start of the bucket ``now - span`` falls in, and
runtime percentiles are read from the histograms (within about 5%).
"""

from __future__ import annotations

import math
from typing import Any

from stamen.store import HistoryReader
from stamen.store.rollup import COARSE, FINE, WIDE, WIDTHS, merge_encoded, percentile

#: Range name → (seconds covered, bucket width in seconds). Widths are multiples of the
#: rollup widths stored (``stored_width``).
RANGES: dict[str, tuple[int, int]] = {
    "15m": (15 * 60, FINE),
    "1h": (3600, 2 * FINE),
    "1d": (86400, COARSE),
    "1w": (7 * 86400, WIDE),
}
WORKFLOW_CAP = 2_000
TYPES_SHOWN = 50


def stored_width(width: int) -> int:
    """The widest rollup width a chart bucket of ``width`` seconds can be summed from."""
    return max(w for w in WIDTHS if width % w == 0)


def chart_data(reader: HistoryReader, span: str, now: float) -> dict[str, Any]:
    """Per-bucket throughput, failure rate and runtime p50/p95, plus per-type runtimes.

    A task counts in the bucket of its last event, which for a finished task is when it
    finished. Series are arrays aligned on ``times`` (uPlot's data layout).
    """
    seconds, width = RANGES[span]
    first = math.floor((now - seconds) / width) * width
    n = math.ceil((now - first) / width)
    times = [first + i * width for i in range(n)]
    done = [0] * n
    failed = [0] * n
    hists: list[dict[int, int]] = [{} for _ in range(n)]
    by_type: dict[str, dict[int, int]] = {}
    count_by_type: dict[str, int] = {}
    for bucket, name, state, _, text in reader.task_rollups(stored_width(width), first):
        i = min(int((bucket - first) // width), n - 1)
        type_hist = by_type.get(name)
        if type_hist is None:
            type_hist = by_type[name] = {}
        count = merge_encoded(text, hists[i], type_hist)
        done[i] += count
        if state == "FAILURE":
            failed[i] += count
        count_by_type[name] = count_by_type.get(name, 0) + count
    types = [
        {
            "name": name,
            "count": count_by_type[name],
            "p50": percentile(hist, 0.5),
            "p95": percentile(hist, 0.95),
        }
        for name, hist in by_type.items()
    ]
    types.sort(key=lambda t: (-t["count"], t["name"]))
    return {
        "range": span,
        "bucket": width,
        "times": times,
        "throughput": [d / width * 60 for d in done],  # tasks per minute
        "failure_rate": [(f / d * 100 if d else None) for f, d in zip(failed, done, strict=True)],
        "p50": [percentile(h, 0.5) for h in hists],
        "p95": [percentile(h, 0.95) for h in hists],
        "types": types[:TYPES_SHOWN],
        "finished": sum(done),
        "partial": False,
    }


def failure_groups(reader: HistoryReader, span: str, now: float) -> list[dict[str, Any]]:
    """Failures in the range grouped by (exception type, task name), most frequent first.

    Each group names its most recent failure as a sample; the sample's exception and
    traceback are read from the task, so they are empty once the task was trimmed.
    """
    seconds, width = RANGES[span]
    stored = stored_width(width)
    first = math.floor((now - seconds) / stored) * stored
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in reader.failure_rollups(stored, first):
        _, exc, name, count, first_seen, last_seen, sample = row
        group = groups.get((exc, name))
        if group is None:
            group = groups[(exc, name)] = {
                "exception_type": exc,
                "name": name,
                "count": 0,
                "first_seen": first_seen,
                "last_seen": last_seen,
                "sample_uuid": sample,
            }
        group["count"] += count
        if first_seen is not None and (
            group["first_seen"] is None or first_seen < group["first_seen"]
        ):
            group["first_seen"] = first_seen
        if last_seen is not None and (
            group["last_seen"] is None or last_seen >= group["last_seen"]
        ):
            group["last_seen"] = last_seen
            group["sample_uuid"] = sample
    found = [g for g in groups.values() if g["count"] > 0]
    samples = reader.task_exceptions(g["sample_uuid"] for g in found if g["sample_uuid"])
    for group in found:
        group["sample_exception"], group["sample_traceback"] = samples.get(
            group["sample_uuid"], (None, None)
        )
    return sorted(found, key=lambda g: (-g["count"], g["exception_type"], g["name"]))


def workflow(reader: HistoryReader, taskid: str) -> dict[str, Any] | None:
    """The canvas a task belongs to, as a tree from its root (``None`` if the task is unknown).

    Edges come from ``parent_id``; tasks of the same root whose parent is not stored (a group
    started from a client, say) hang under the root so nothing of the workflow is hidden.
    """
    found = reader.workflow_rows(taskid, WORKFLOW_CAP)
    if found is None:
        return None
    root_id, rows = found
    nodes = {r["uuid"]: {**r, "children": []} for r in rows}
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
