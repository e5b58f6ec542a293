"""The search examples every backend must answer alike: spec 6.3's four tasks and queries.

Shared by the SQLite compiler's unit tests and the store contract suite, so the expected
sets are written once.
"""

from __future__ import annotations

FIXTURE: dict[int, dict[str, str | None]] = {
    1: {
        "uuid": "a1b2c3d4-0001-4000-8000-00000000f001",
        "name": "tasks.fetch",
        "state": "FAILURE",
        "worker": "celery@alpha",
        "args": "('customer-1',)",
        "kwargs": "{'priority': 'high'}",
        "result": "TimeoutError('timeout')",
    },
    2: {
        "uuid": "a1b2c3d4-0001-4000-8000-00000000f002",
        "name": "tasks.store",
        "state": "SUCCESS",
        "worker": "celery@alpha",
        "args": "('customer-2', 10)",
        "kwargs": "{'priority': 'low'}",
        "result": "'stored'",
    },
    3: {
        "uuid": "a1b2c3d4-0001-4000-8000-00000000f003",
        "name": "tasks.fetch_all",
        "state": "RETRY",
        "worker": "celery@beta",
        "args": "('customer-3',)",
        "kwargs": "{'priority': 'HIGH', 'label': 'other value'}",
        "result": "'timeout, retrying'",
    },
    4: {
        "uuid": "a1b2c3d4-0001-4000-8000-00000000f004",
        "name": "tasks.echo",
        "state": "SUCCESS",
        "worker": "celery@beta",
        "args": "('hello world',)",
        "kwargs": "{'label': 'some value', 'owner': None}",
        "result": None,
    },
}


#: ``(query, numbers of the FIXTURE tasks it must find)``.
EXAMPLES = [
    # The examples of spec 6.3.
    ("customer", {1, 2, 3}),
    ("name:fetch", {1, 3}),
    ("state:FAILURE", {1}),
    ("kwargs:priority=high", {1, 3}),
    ("kwargs:priority=HIGH", {1, 3}),
    ("customer result:timeout", {1, 3}),
    ("(state:FAILURE OR state:RETRY) result:timeout", {1, 3}),
    ('args:"hello world"', {4}),
    ('kwargs:label="some value"', {4}),
    ("result:timeout", {1, 3}),
    ("NAME:tasks.fetch", {1, 3}),
    ("uuid:abc", set()),
    ("stateSTARTED", set()),
    # More of the rules.
    ("", {1, 2, 3, 4}),
    ("state:failure", {1}),
    ("state:FAIL", set()),
    ("state:success", {2, 4}),
    ("kwargs:priority=hi", set()),
    ('kwargs:" priority = HIGH "', {1, 3}),
    ("kwargs:owner=", {4}),
    ("kwargs:label=", set()),
    ("kwargs:priority", {1, 2, 3}),
    ("kwargs:ior", {1, 2, 3}),
    ("priority", {1, 2, 3}),
    ("worker:alpha", {1, 2}),
    ("celery@beta", {3, 4}),
    ("CUSTOMER", {1, 2, 3}),
    ("fetch OR echo", {1, 3, 4}),
    ("echo OR fetch customer", {1, 3, 4}),
    ("(echo OR fetch) customer", {1, 3}),
    ("name:fetch state:RETRY", {3}),
    ("state:RETRY OR kwargs:owner=", {3, 4}),
    ('customer (state:SUCCESS OR kwargs:label="other value")', {2, 3}),
    ("kwargs:priority=low OR args:hello", {2, 4}),
    ('"timeout"', {1, 3}),
    ('"(\'customer"', {1, 2, 3}),
    ("'customer-", {1, 2, 3}),
    ("{'priority'", {1, 2, 3}),
    ("result:\"'stored'\"", {2}),
    ("name:celery", set()),
    ("args:fetch", set()),
    ("fetchfailure", set()),
    # Parts of a uuid, and the state as text.
    ("0000f003", {3}),
    ("F003", {3}),
    ("a1b2c3d4-0001", {1, 2, 3, 4}),
    (str(FIXTURE[2]["uuid"]), {2}),
    ("failure", {1}),
    ("success", {2, 4}),
    ("ccess", {2, 4}),
    ("ure", {1}),
    ("retr", {3}),
    ("success echo", {4}),
    ("success OR fetch", {1, 2, 3, 4}),
]
