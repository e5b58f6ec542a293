"""Property-based fuzzing of every operation in the served OpenAPI schema (schemathesis).

Each operation gets valid (``positive``) and schema-violating (``negative``) requests, with
random path parameters and with the names of a worker, task, task type and queue that exist,
so the fuzzer gets past ``Unknown worker``/``Unknown task`` into the argument checks and the
broker calls. The only property asserted is the issue's: no request is answered with a server
error. 503 ("broker or result backend unavailable") is an honest answer against
``memory://`` and is allowed; every other 5xx fails, as does a request that takes more than a
few seconds (a handler stuck on the broker or the result backend).

Runs against two apps: without a result backend, and with ``cache+memory://`` so the
result, abort and apply paths run too. The examples are derandomized, so a failure is
reproducible; the failing request is printed by Hypothesis.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from stamen.web import control
from tests.factories import lifecycle, task_sent, worker_heartbeat, worker_online
from tests.unit.conftest import AppHarness, make_harness

#: Examples per operation, per generation mode and per path-parameter choice.
MAX_EXAMPLES = 8
#: A request slower than this is reported as stuck (the broker calls are stubbed to be fast).
SLOW_S = 5.0
#: Longest wait a fuzzed ``timeout`` may ask for: a valid long wait is not a hang.
MAX_WAIT_S = 0.1

KNOWN = {"workername": "w1@host", "taskid": "a", "taskname": "tasks.add", "queue": "celery"}


def _add(x: int = 1, y: int = 2) -> int:
    return x + y


@pytest.fixture(params=[None, "cache+memory://"], ids=["no-backend", "memory-backend"])
def fuzzed(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AppHarness]:
    # memory:// has no workers: replies never come, so do not wait long for them.
    monkeypatch.setattr(control, "REPLY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(control, "APPLY_DEFAULT_WAIT_S", MAX_WAIT_S)
    for h in make_harness(tmp_path, inspect_timeout=0.1, backend=request.param):
        h.services.app.task(name="tasks.add")(_add)
        h.feed(
            [
                worker_online("w1@host", 1.0),
                worker_heartbeat("w1@host", 2.0),
                *lifecycle("a", ts=10.0),
                *lifecycle("b", ts=20.0, outcome="failed"),
                task_sent("c", "tasks.queued", 30.0),
            ]
        )
        # The inspector cache is filled by worker replies, which memory:// never gives.
        h.services.inspector._merge("stats", {"w1@host": {"pool": {}}})
        yield h


def _bounded_waits(kwargs: dict[str, Any]) -> None:
    """Cap ``timeout`` (query or JSON body): asking to wait an hour is valid, not a hang."""
    containers = [kwargs.get("params"), kwargs.get("json")]
    for container in containers:
        if not isinstance(container, dict) or "timeout" not in container:
            continue
        try:
            wanted = float(container["timeout"])
        except (TypeError, ValueError):
            continue
        if math.isfinite(wanted) and wanted > MAX_WAIT_S:
            container["timeout"] = MAX_WAIT_S


def _run_operation(h: AppHarness, operation: Any, mode: GenerationMode, fixed: bool) -> None:
    names = [p.name for p in operation.path_parameters]
    path_parameters = {name: KNOWN[name] for name in names} if fixed else None

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def check(case: schemathesis.Case) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        kwargs.pop("allow_redirects", None)
        kwargs.pop("follow_redirects", None)
        if not kwargs.get("cookies"):
            kwargs.pop("cookies", None)
        if isinstance(kwargs.get("data"), (bytes, str)):
            kwargs["content"] = kwargs.pop("data")
        _bounded_waits(kwargs)
        started = time.monotonic()
        response = h.client.request(**kwargs)
        took = time.monotonic() - started
        request = f"{kwargs['method']} {kwargs['url']} params={kwargs.get('params')!r}"
        assert response.status_code < 500 or response.status_code == 503, (
            f"{request} -> {response.status_code} {response.text[:300]!r}"
        )
        assert took < SLOW_S, f"{request} took {took:.1f} s"
        if response.status_code == 503:
            assert response.text or case.operation.path in (
                "/api/task/result/{taskid}",
                "/api/task/abort/{taskid}",
            ), f"{request} -> 503 with no message"

    try:
        check()
    except Unsatisfiable:
        # Negative mode for an operation with nothing to get wrong (no parameters).
        assert mode is GenerationMode.NEGATIVE


def test_no_request_gets_a_server_error(fuzzed: AppHarness) -> None:
    schema = schemathesis.openapi.from_dict(fuzzed.client.app.openapi())  # type: ignore[attr-defined]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for fixed in (False, True) if operation.path_parameters else (False,):
                _run_operation(fuzzed, operation, mode, fixed)
