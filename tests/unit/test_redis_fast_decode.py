"""The Redis fast path's decoding gives exactly what kombu's gives, message by message.

The reference is kombu itself: the envelope parsed with kombu's JSON loader (as its Redis
transport does), the body base64-decoded and decoded by kombu's serializer registry with
the content types Celery's event receiver accepts, or, for odd envelopes, kombu's own
virtual ``Message``. Envelopes are built by kombu's own code (``prepare_message`` and the
publish-time augmentation of a virtual channel, serialized with kombu's ``dumps``), and two
were captured from real Celery dispatchers publishing to Redis.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
import zlib
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kombu import Connection
from kombu import compression as kombu_compression
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads
from kombu.serialization import prepare_accept_content
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

from stamen.events import redis_fast
from stamen.events.redis_fast import (
    Undecodable,
    decode_message,
    fast_body,
    kombu_decode,
    loads_json,
    needs_kombu_json,
)

ACCEPT = prepare_accept_content({"json"})  # what Celery's EventReceiver accepts by default


@pytest.fixture(scope="module")
def channel() -> Any:
    """A real kombu virtual channel (memory transport): same envelope code as Redis's."""
    conn = Connection("memory://")
    yield conn.default_channel
    conn.release()


def kombu_envelope(
    channel: Any,
    body: Any,
    routing_key: str = "task.multi",
    *,
    serializer: str = "json",
    compression: str | None = None,
    headers: dict[str, Any] | None = None,
) -> bytes:
    """The bytes kombu's Redis transport PUBLISHes for ``body`` (``Channel._put_fanout``)."""
    content_type, content_encoding, data = kombu_dumps(body, serializer=serializer)
    headers = {"hostname": "celery@w1", **(headers or {})}
    if compression:
        data, headers["compression"] = kombu_compression.compress(data, compression)
    message = channel.prepare_message(
        data, 0, content_type, content_encoding, headers, {"delivery_mode": 1}
    )
    channel._inplace_augment_message(message, "celeryev", routing_key)
    return kombu_json.dumps(message).encode()


def kombu_reference(channel: Any, data: bytes) -> Any:
    """What kombu's consumer decodes from ``data``; raises where kombu drops the message."""
    envelope = kombu_json.loads(bytes_to_str(data))
    if (
        isinstance(envelope, dict)
        and isinstance(envelope.get("properties"), dict)
        and envelope["properties"].get("body_encoding") == "base64"
        and not (envelope.get("headers") or {}).get("compression")
        and isinstance(envelope.get("body"), str)
        and envelope["body"]
        and "delivery_tag" in envelope["properties"]
    ):
        body = base64.b64decode(envelope["body"].encode("utf-8"))
        return kombu_loads(
            body, envelope.get("content-type"), envelope.get("content-encoding"), accept=ACCEPT
        )
    return kombu_decode(channel, ACCEPT, envelope)


def canon(value: Any) -> Any:
    """A form where equal means identical: types, float bits (-0.0, nan) and key order."""
    t = type(value)
    if t is dict:
        return ("dict", [(k, canon(v)) for k, v in value.items()])
    if t is list:
        return ("list", [canon(v) for v in value])
    if t is float:
        return ("float", repr(value))
    if t in (str, int, bool, type(None)):
        return (t.__name__, value)
    return (t.__name__, repr(value))


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return ("ok", canon(fn(*args)))
    except Exception:
        return ("error", None)


# ---------------------------------------------------------------------------------------
# Strategies: JSON texts of the kind kombu's dumps writes, and worse.

SPECIAL_TEXT = st.sampled_from(
    ["", "é", "\u2603", "\U0001f600", "\ud800", "\udfff", "\x00", "\x1b[31m", "\\", '"']
)
TEXT = st.one_of(st.text(st.characters(codec=None, exclude_categories=())), SPECIAL_TEXT)
KEYS = st.one_of(
    st.sampled_from(["__type__", "__value__", "type", "uuid", "hostname", "args"]), TEXT
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]),
    st.floats(),
    st.sampled_from([0.1, -0.0, 1e16, 1e300, 5e-324, 1.7976931348623157e308, 1712345678.123456]),
    TEXT,
)
TYPED = st.one_of(  # values kombu's JSON encoder writes as {"__type__": ..., "__value__": ...}
    st.datetimes(),
    st.dates(),
    st.times(),
    st.decimals(allow_nan=False),
    st.uuids(),
    st.binary(max_size=20),
)
JSON_VALUES = st.recursive(
    st.one_of(SCALARS, TYPED),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(KEYS, children, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def json_texts(draw: Any) -> bytes:
    """A value written by kombu's ``dumps`` with varied options, sometimes damaged."""
    value = draw(JSON_VALUES)
    text = kombu_json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([None, (",", ":"), (", ", ": ")])),
    )
    raw = text.encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 4)) == 0 and raw:  # flip, insert or cut a byte
        i = draw(st.integers(0, len(raw) - 1))
        how = draw(st.sampled_from(["flip", "insert", "cut"]))
        b = draw(st.integers(0, 255))
        if how == "flip":
            raw = raw[:i] + bytes([b]) + raw[i + 1 :]
        elif how == "insert":
            raw = raw[:i] + bytes([b]) + raw[i:]
        else:
            raw = raw[:i]
    return raw


EVENT_TYPES = st.sampled_from(
    ["task-sent", "task-received", "task-started", "task-succeeded", "task-failed",
     "task-retried", "task-revoked", "worker-heartbeat", "worker-online", "custom-thing"]
)  # fmt: skip


@st.composite
def events(draw: Any) -> dict[str, Any]:
    """Events shaped like Celery's, with arbitrary extra fields."""
    event: dict[str, Any] = {
        "hostname": draw(st.sampled_from(["celery@w1", "celery@wörker-2", "w"])),
        "utcoffset": draw(st.sampled_from([0, -0.0, 0.0, -5, 5.5, 2])),
        "pid": draw(st.integers(1, 2**22)),
        "clock": draw(st.integers(0, 2**40)),
        "uuid": str(draw(st.uuids())),
        "timestamp": draw(st.floats(0, 4e9)),
        "type": draw(EVENT_TYPES),
    }
    extra = draw(st.dictionaries(KEYS.filter(lambda k: k not in event), JSON_VALUES, max_size=4))
    event.update(extra)
    return event


BODIES = st.one_of(events(), st.lists(events(), min_size=1, max_size=24))


# ---------------------------------------------------------------------------------------
# The JSON loader.


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(json_texts())
@example(b'{"a": 18446744073709551616}')
@example(b"[-9223372036854775809, 1e400, NaN, -Infinity]")
@example(b'{"\\u005f_type__": "decimal", "__value__": "1.5"}')
@example(b'{"__type__": "datetime", "__value__": "2024-01-02T03:04:05"}')
@example(b'{"__type__": "nope", "__value__": 1}')
@example(b'"\\ud800"')
@example(b'"\xed\xa0\x80"')
@example(b"\xef\xbb\xbf{}")
def test_loads_json_is_kombus_loads(raw: bytes) -> None:
    assert outcome(loads_json, raw) == outcome(kombu_json.loads, raw)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_loads_json_on_arbitrary_bytes(raw: bytes) -> None:
    assert outcome(loads_json, raw) == outcome(kombu_json.loads, raw)


@pytest.mark.parametrize("depth", [10, 400, 511, 512, 600, 990, 1000, 1024, 1025, 2000])
def test_deep_nesting_fails_where_kombu_fails(depth: int) -> None:
    def flat(value: Any) -> list[Any]:
        """canon() without recursion: it would itself nest too deep here."""
        tokens: list[Any] = []
        stack = [value]
        while stack:
            item = stack.pop()
            if type(item) is list:
                tokens.append(("list", len(item)))
                stack.extend(reversed(item))
            elif type(item) is dict:
                tokens.append(("dict", list(item)))
                stack.extend(reversed(list(item.values())))
            else:
                tokens.append(canon(item))
        return tokens

    def shallow_outcome(fn: Any, raw: bytes) -> tuple[str, Any]:
        try:
            result = fn(raw)
        except Exception:
            return ("error", None)
        return ("ok", flat(result))

    for raw in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        assert shallow_outcome(loads_json, raw) == shallow_outcome(kombu_json.loads, raw)


@pytest.mark.parametrize(
    ("raw", "needs"),
    [
        (b'{"hostname": "w", "clock": 12, "timestamp": 1712345678.1234567}', False),
        (b'{"args": "(\\u00e9,)"}', False),  # an escaped e-acute is not an escaped letter
        (b'{"__type__": "x"}', True),
        (b'{"_\\u005ftype__": "x"}', True),
        (b'{"__typ\\u0065__": "x"}', True),
        (b'{"n": 1234567890123456789}', True),  # 19 digits: maybe beyond 64 bits
        (b'{"n": 123456789012345678}', False),
        (b"[" * 512, True),
    ],
)
def test_needs_kombu_json(raw: bytes, needs: bool) -> None:
    assert needs_kombu_json(raw) is needs


# ---------------------------------------------------------------------------------------
# Whole messages.


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_event_messages_decode_as_kombu_decodes_them(channel: Any, body: Any) -> None:
    data = kombu_envelope(channel, body)
    assert fast_body(json.loads(data)) is not None  # the envelope takes the fast route
    expected = outcome(kombu_reference, channel, data)
    assert outcome(decode_message, data, _slow(channel)) == expected


def _slow(channel: Any) -> Any:
    return lambda env: kombu_decode(channel, ACCEPT, env)


def _mutate_envelope(data: bytes, change: Any) -> bytes:
    envelope = json.loads(data)
    change(envelope)
    return json.dumps(envelope).encode()


ODD_ENVELOPES = {
    "zlib compressed body": lambda ch: kombu_envelope(ch, {"type": "task-x"}, compression="zlib"),
    "pickle body (not accepted)": lambda ch: kombu_envelope(
        ch, {"type": "task-x"}, serializer="pickle"
    ),
    "no delivery tag": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}), lambda e: e["properties"].pop("delivery_tag")
    ),
    "utf-8 body encoding": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}),
        lambda e: (
            e.update(body=base64.b64decode(e["body"]).decode()),
            e["properties"].update(body_encoding="utf-8"),
        ),
    ),
    "no body encoding": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}),
        lambda e: (
            e.update(body=base64.b64decode(e["body"]).decode()),
            e["properties"].pop("body_encoding"),
        ),
    ),
    "unknown body encoding": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}),
        lambda e: e["properties"].update(body_encoding="BASE64"),
    ),
    "non-ascii in base64 body": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}), lambda e: e.update(body="é" + e["body"])
    ),
    "junk in base64 body": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}), lambda e: e.update(body="*" + e["body"])
    ),
    "empty body": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}), lambda e: e.update(body="")
    ),
    "no content type": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}), lambda e: e.pop("content-type")
    ),
    "typed headers": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}),
        lambda e: e.update(headers={"__type__": "bytes", "__value__": "x"}),
    ),
    "headers with typed values": lambda ch: kombu_envelope(
        ch, {"type": "task-x"}, headers={"when": dt.datetime(2024, 1, 2), "n": Decimal("1.5")}
    ),
    "list headers": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}), lambda e: e.update(headers=[1])
    ),
    "no properties": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}), lambda e: e.pop("properties")
    ),
    "big integer header": lambda ch: kombu_envelope(ch, {"type": "task-x"}, headers={"n": 2**70}),
    "long envelope": lambda ch: kombu_envelope(ch, {"type": "task-x"}, headers={"x": "y" * 3000}),
    "deeply nested header": lambda ch: _mutate_envelope(
        kombu_envelope(ch, {"type": "task-x"}), lambda e: e.update(headers={"x": []})
    ).replace(b"[]", b"[" * 1010 + b"]" * 1010),
    "NaN in the envelope": lambda ch: kombu_envelope(ch, {"type": "task-x"}, headers={"x": 1e999}),
    "not JSON": lambda ch: b"\x00garbage",
    "a JSON list": lambda ch: b"[1, 2]",
    "invalid utf-8 in the envelope": lambda ch: kombu_envelope(ch, {"type": "task-x"}).replace(
        b'"celery@w1"', b'"celery@w\xff"'
    ),
    "typed values in the body": lambda ch: kombu_envelope(
        ch, {"type": "task-x", "eta": dt.datetime(2024, 5, 6, 7, 8, 9), "id": uuid.uuid4()}
    ),
}


@pytest.mark.parametrize("name", sorted(ODD_ENVELOPES))
def test_odd_envelopes_decode_or_fail_as_in_kombu(channel: Any, name: str) -> None:
    data = ODD_ENVELOPES[name](channel)
    expected = outcome(kombu_reference, channel, data)
    assert outcome(decode_message, data, _slow(channel)) == expected
    if expected[0] == "error":
        with pytest.raises(Undecodable):
            decode_message(data, _slow(channel))


def test_compressed_body_really_is_compressed(channel: Any) -> None:
    data = ODD_ENVELOPES["zlib compressed body"](channel)
    envelope = json.loads(data)
    assert envelope["headers"]["compression"] == "application/x-gzip"
    assert zlib.decompress(base64.b64decode(envelope["body"]))
    assert decode_message(data, _slow(channel)) == {"type": "task-x"}


def test_custom_json_decoder_turns_off_the_fast_json_route(channel: Any) -> None:
    data = kombu_envelope(channel, {"type": "task-x", "n": 1})
    seen: list[Any] = []

    def slow(envelope: Any) -> Any:
        seen.append(envelope)
        return kombu_decode(channel, ACCEPT, envelope)

    assert decode_message(data, slow, fast_json=False) == {"type": "task-x", "n": 1}
    assert len(seen) == 1
    assert decode_message(data, slow) == {"type": "task-x", "n": 1}
    assert len(seen) == 1  # the fast route did not need kombu


# Captured from Celery 5.7 EventDispatchers publishing to Redis db 11: a heartbeat (one
# event per message) and a task.multi batch of two events with a non-ASCII argument.
CAPTURED = [
    (
        b'{"body": "eyJob3N0bmFtZSI6ICJ3MSIsICJ1dGNvZmZzZXQiOiAwLjAsICJwaWQiOiAzMTcwNSwgImNsb2Nr'
        b"IjogMSwgImxvYWRhdmciOiBbMC4xLCAwLjJdLCAiZnJlcSI6IDIuMCwgInRpbWVzdGFtcCI6IDE3OTUzMTky"
        b'MDEuMTQ0NDg3OSwgInR5cGUiOiAid29ya2VyLWhlYXJ0YmVhdCJ9", "content-encoding": "utf-8", '
        b'"content-type": "application/json", "headers": {"hostname": "w1"}, "properties": '
        b'{"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": '
        b'"worker.heartbeat"}, "priority": 0, "body_encoding": "base64", "delivery_tag": '
        b'"5cca89e5-5533-4bfb-90a7-c9dee95bde19"}}',
        {"hostname": "w1", "utcoffset": 0.0, "pid": 31705, "clock": 1, "loadavg": [0.1, 0.2],
         "freq": 2.0, "timestamp": 1795319201.1444879, "type": "worker-heartbeat"},
    ),
    (
        b'{"body": "W3siaG9zdG5hbWUiOiAidzEiLCAidXRjb2Zmc2V0IjogMC4wLCAicGlkIjogMzE3MDUsICJjbG9j'
        b"ayI6IDIsICJ1dWlkIjogInUxIiwgImFyZ3MiOiAiKCdcdTAwZTknLCkiLCAidGltZXN0YW1wIjogMTc5NTMx"
        b"OTIwMS4xNjc3MzQ5LCAidHlwZSI6ICJ0YXNrLXNlbnQifSwgeyJob3N0bmFtZSI6ICJ3MSIsICJ1dGNvZmZz"
        b"ZXQiOiAwLjAsICJwaWQiOiAzMTcwNSwgImNsb2NrIjogMywgInV1aWQiOiAidTEiLCAidGltZXN0YW1wIjog"
        b'MTc5NTMxOTIwMS4xNjc3NDYsICJ0eXBlIjogInRhc2stcmVjZWl2ZWQifV0=", "content-encoding": '
        b'"utf-8", "content-type": "application/json", "headers": {"hostname": "w1"}, '
        b'"properties": {"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", '
        b'"routing_key": "task.multi"}, "priority": 0, "body_encoding": "base64", '
        b'"delivery_tag": "dd73d3a6-6a4e-4f1e-b39f-35bb86211b40"}}',
        [{"hostname": "w1", "utcoffset": 0.0, "pid": 31705, "clock": 2, "uuid": "u1",
          "args": "('é',)", "timestamp": 1795319201.1677349, "type": "task-sent"},
         {"hostname": "w1", "utcoffset": 0.0, "pid": 31705, "clock": 3, "uuid": "u1",
          "timestamp": 1795319201.167746, "type": "task-received"}],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("data", "expected"), CAPTURED)
def test_captured_envelopes(channel: Any, data: bytes, expected: Any) -> None:
    got = decode_message(data, _slow(channel))
    assert canon(got) == canon(expected) == canon(kombu_reference(channel, data))


def test_subscription_pattern_follows_kombus_naming() -> None:
    class FakeChannel:
        keyprefix_fanout = "/3."
        fanout_patterns = True
        global_keyprefix = ""

    ch = FakeChannel()
    assert redis_fast.subscription_pattern(ch, "celeryev") == "/3.celeryev/*"
    ch.fanout_patterns = False
    assert redis_fast.subscription_pattern(ch, "celeryev") == "/3.celeryev"
    ch.keyprefix_fanout = ""
    ch.global_keyprefix = "tenant:"
    assert redis_fast.subscription_pattern(ch, "myev") == "tenant:myev"
