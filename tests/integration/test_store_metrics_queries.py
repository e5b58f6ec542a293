"""The reader queries ``/metrics`` makes at scrape time agree on SQLite and PostgreSQL."""

from __future__ import annotations

from tests.integration import test_store_contract
from tests.integration.test_store_contract import Backend, write_rows

#: The contract suite's fixture: each backend, fresh for each test.
backend = test_store_contract.backend


def test_an_empty_store(backend: Backend) -> None:
    backend.writer()
    reader = backend.reader()
    assert reader.time_span() == (None, None)
    assert reader.state_counts() == []
    assert reader.sent_times([]) == {}
    assert reader.sent_times(["nope"]) == {}
    assert reader.size_bytes() > 0


def test_span_states_and_sent_times(backend: Backend) -> None:
    reader = write_rows(
        backend,
        {"uuid": "a", "state": "SUCCESS", "timestamp": 30.0, "sent": 5.0},
        {"uuid": "b", "state": "success", "timestamp": 10.0},
        {"uuid": "c", "state": "FAILURE", "timestamp": 20.0, "sent": 7.5},
        {"uuid": "d", "state": "PENDING", "timestamp": 25.0},
        {"uuid": "e", "timestamp": 15.0},
    )
    assert reader.time_span() == (10.0, 30.0)
    counts = reader.state_counts()
    # States differing in ASCII case are one series; no series for tasks without a state.
    assert [(s.upper(), n) for s, n in counts] == [("FAILURE", 1), ("PENDING", 1), ("SUCCESS", 2)]
    assert reader.sent_times(["a", "b", "c", "zz"]) == {"a": 5.0, "c": 7.5}
    many = [f"x{i}" for i in range(1200)] + ["c"]
    assert reader.sent_times(many) == {"c": 7.5}
