"""The pure rollup logic: runtime bins, percentiles from histograms, task contributions and
the net change of a batch."""

from __future__ import annotations

import math
import random

import pytest

from stamen.store.rollup import (
    COARSE,
    FINE,
    NO_RUNTIME,
    UNKNOWN,
    WIDE,
    ZERO,
    RollupDelta,
    contribution,
    decode_hist,
    delta_of,
    encode_hist,
    exception_type,
    merge_encoded,
    merge_hist,
    percentile,
    runtime_bin,
)
from stamen.web.stats import RANGES, stored_width


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
def test_histogram_percentiles_are_within_5_percent_of_exact(seed: int, q: float) -> None:
    rng = random.Random(seed)
    values = [rng.lognormvariate(-2.5, 1.5) for _ in range(rng.randrange(1, 3000))]
    hist: dict[int, int] = {}
    for v in values:
        hist[runtime_bin(v)] = hist.get(runtime_bin(v), 0) + 1
    estimate = percentile(hist, q)
    assert estimate is not None
    assert estimate == pytest.approx(exact(values, q), rel=0.05)


def test_bins_for_odd_runtimes() -> None:
    assert runtime_bin(None) == NO_RUNTIME
    assert runtime_bin("0.5") == NO_RUNTIME
    assert runtime_bin(True) == NO_RUNTIME
    assert runtime_bin(float("nan")) == NO_RUNTIME
    assert runtime_bin(0) == ZERO and runtime_bin(-1.0) == ZERO
    assert runtime_bin(float("inf")) == runtime_bin(1e300)
    assert runtime_bin(1.0) == 0 and runtime_bin(1.1 * 1.0001) == 1
    assert percentile({NO_RUNTIME: 5}, 0.5) is None
    assert percentile({}, 0.5) is None
    assert percentile({ZERO: 3, NO_RUNTIME: 9}, 0.95) == 0.0
    # The no-runtime bin does not shift the ranks of the runtimes there are.
    assert percentile({runtime_bin(1.0): 1, runtime_bin(100.0): 1, NO_RUNTIME: 50}, 1.0) == (
        pytest.approx(100.0, rel=0.05)
    )


def test_exception_type() -> None:
    assert exception_type("KeyError('foo')") == "KeyError"
    assert exception_type("celery.exceptions.Retry: in 5s") == "celery.exceptions.Retry: in 5s"
    assert exception_type("") == UNKNOWN and exception_type(None) == UNKNOWN
    assert exception_type("(weird)") == UNKNOWN


def test_contribution_counts_finished_tasks_with_a_timestamp() -> None:
    task = {"uuid": "a", "name": "t.x", "state": "SUCCESS", "timestamp": 100.0, "runtime": 1.0}
    c = contribution(task)
    assert c is not None and (c.name, c.state, c.bin, c.exception_type) == (
        "t.x",
        "SUCCESS",
        0,
        None,
    )
    assert contribution({**task, "state": "STARTED"}) is None
    assert contribution({**task, "timestamp": None}) is None
    assert contribution({**task, "timestamp": "100"}) is None
    failed = contribution({**task, "state": "FAILURE", "exception": "OSError(2)", "name": None})
    assert failed is not None and (failed.exception_type, failed.name) == ("OSError", UNKNOWN)
    odd = contribution({**task, "name": "a\0b", "uuid": "u\0"})
    assert odd is not None and (odd.name, odd.uuid) == ("a\ufffdb", "u\0")


def test_a_change_moves_a_task_between_buckets_at_every_width() -> None:
    before = contribution({"uuid": "a", "name": "n", "state": "SUCCESS", "timestamp": 10.0})
    after = contribution(
        {"uuid": "a", "name": "n", "state": "FAILURE", "timestamp": 2000.0, "exception": "E()"}
    )
    delta = RollupDelta()
    delta.change(before, after)
    delta.change(after, after)  # unchanged: nothing
    delta.compact()
    assert delta.tasks == {
        (FINE, 0.0, "n", "SUCCESS"): {NO_RUNTIME: -1},
        (COARSE, 0.0, "n", "SUCCESS"): {NO_RUNTIME: -1},
        (WIDE, 0.0, "n", "SUCCESS"): {NO_RUNTIME: -1},
        (FINE, 1980.0, "n", "FAILURE"): {NO_RUNTIME: 1},
        (COARSE, 1800.0, "n", "FAILURE"): {NO_RUNTIME: 1},
        (WIDE, 0.0, "n", "FAILURE"): {NO_RUNTIME: 1},
    }
    group = delta.failures[(FINE, 1980.0, "E", "n")]
    assert (group.count, group.first_seen, group.last_seen, group.sample_uuid) == (
        1,
        2000.0,
        2000.0,
        "a",
    )
    undo = RollupDelta()
    undo.change(None, before)
    undo.change(before, None)
    undo.compact()
    assert not undo


def test_a_batch_aggregates_many_tasks_into_few_rows() -> None:
    tasks = [
        {"uuid": str(i), "name": f"t{i % 3}", "state": "SUCCESS", "timestamp": 5.0 + i / 1000}
        for i in range(3000)
    ]
    delta = delta_of(tasks)
    assert len(delta.tasks) == 3 * 3  # three names, three widths, one bucket each
    assert sum(delta.tasks[(FINE, 0.0, "t0", "SUCCESS")].values()) == 1000


def test_histogram_text_round_trips_and_merges() -> None:
    hist = {NO_RUNTIME: 2, ZERO: 1, -30: 4, 7: 1}
    assert decode_hist(encode_hist(hist)) == hist
    assert decode_hist("") == {}
    assert merge_hist(hist, {7: -1, 8: 2}) == {NO_RUNTIME: 2, ZERO: 1, -30: 4, 8: 2}
    first: dict[int, int] = {7: 1}
    second: dict[int, int] = {}
    assert merge_encoded(encode_hist(hist), first, second) == 8
    assert first == {NO_RUNTIME: 2, ZERO: 1, -30: 4, 7: 2} and second == hist


def test_every_range_is_summed_from_a_stored_width() -> None:
    for seconds, width in RANGES.values():
        stored = stored_width(width)
        assert width % stored == 0 and seconds % width == 0
    assert [stored_width(w) for _, w in RANGES.values()] == [FINE, FINE, COARSE, WIDE]
