"""Receive Celery events straight from Redis pub/sub: kombu's result, at a fraction of the cost.

Why this exists: on Redis, kombu's ``EventReceiver`` spends most of its time in generic
machinery (the virtual transport's poller, ``Message`` objects, the serializer registry,
the standard library's JSON) and tops out near 8,400 events/s with one event per message.
This module reads the same pub/sub subscription with redis-py's hiredis parser and decodes
kombu's envelope and body with orjson, which is several times faster.

What stays identical, and how:

- **Where**: the pattern kombu itself would ``PSUBSCRIBE`` to for Celery's event exchange
  with routing key ``#`` (:func:`subscription_pattern`): the db number, ``fanout_prefix``,
  ``fanout_patterns`` and ``global_keyprefix`` come from kombu's own channel object, and the
  Redis connection is made from that channel's connection parameters (TLS, unix socket,
  password, timeouts all as kombu would).
- **What**: :func:`decode_message` takes the fast route only for the envelope every Celery
  producer sends (JSON content, base64 body, no compression) and only when orjson provably
  gives what kombu's JSON loader gives (:func:`loads_json`); anything else is decoded by
  kombu's own code (``Message`` and ``Message.decode``), so an odd message costs more but
  never decodes differently.
- **Then**: every event goes through Celery's own ``EventReceiver.event_from_message`` (the
  Lamport clock on ``app.clock``, the ``utcoffset`` timestamp adjustment, ``local_received``),
  and a list body is several events, exactly as ``EventReceiver._receive`` does.

The loop polls with a short timeout so a stop request is noticed within ``poll_interval``,
and lets connection errors propagate: reconnecting, backoff and health reporting stay in
:class:`~stamen.events.receiver.EventReceiverThread`, one piece of code for both paths.

One deliberate difference: an event that is not a dict with a ``type`` makes Celery's
receiver raise out of the consumer (on the kombu path that means a reconnect and a backoff,
and losing what is published meanwhile). Here it is logged and skipped, alone.
"""

from __future__ import annotations

import binascii
import functools
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from celery import Celery
from kombu import Connection
from kombu.serialization import prepare_accept_content, registry
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

log = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
#: Messages handled per wake-up before the loop looks at ``should_stop`` again (500
#: batches of 24 events take well under the 0.2 s a stop may wait).
BURST = 500
#: Seconds of silence before the subscription is checked with a PING (kombu's default
#: ``health_check_interval``); no answer within as long again counts as a lost connection.
DEFAULT_KEEPALIVE = 25.0

EventHandler = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------------------
# Pure decoding: bytes from Redis to what kombu's consumer would hand Celery.


class Undecodable(Exception):
    """A message kombu could not decode either; kombu logs such a message and drops it."""


# Where orjson and kombu's JSON loader (the standard library's, with kombu's object hook)
# can disagree although orjson succeeds:
#
# - kombu turns {"__type__": ..., "__value__": ...} into datetimes, decimals, bytes...; the
#   key may be written with escapes ("\u005f_type__"), so any escaped letter of it counts.
# - orjson turns integers beyond 64 bits into floats; the standard library keeps them exact.
#   Such a literal has at least 19 digits in a row (Python's float repr never writes more
#   than 17), so a run of 19 digits anywhere sends the text to kombu's loader.
# - orjson nests up to 1024 levels; the standard library raises RecursionError somewhat
#   below Python's recursion limit (1000). Text with fewer than MAX_OPENERS brackets and
#   braces cannot nest that deep.
#
# Where orjson fails instead (NaN, Infinity, lone surrogates, invalid UTF-8, too deep),
# kombu's loader decides, so its result or its error is what you get.
_TYPE_KEY_ESCAPE = re.compile(rb"\\u00(?:5[fF]|65|7[049])")  # _ e t p y
# One pass maps digits to "0", "[" and "{" to "[", everything else to a space.
_SCAN_TABLE = bytes(
    0x30 if 0x30 <= b <= 0x39 else 0x5B if b in (0x5B, 0x7B) else 0x20 for b in range(256)
)
_LONG_DIGIT_RUN = b"0" * 19
MAX_OPENERS = 512
#: Bytes an envelope may carry besides its body and still take the fast route.
MAX_ENVELOPE_EXTRA = 1024


def needs_kombu_json(raw: bytes) -> bool:
    """True when orjson might not reproduce kombu's ``json.loads`` for ``raw``."""
    if b"__type__" in raw or (b"\\u00" in raw and _TYPE_KEY_ESCAPE.search(raw) is not None):
        return True
    scan = raw.translate(_SCAN_TABLE)
    return _LONG_DIGIT_RUN in scan or scan.count(b"[") >= MAX_OPENERS


def loads_json(raw: bytes) -> Any:
    """``kombu.utils.json.loads(raw)``: the same value or the same exception, faster."""
    if needs_kombu_json(raw):
        return kombu_json.loads(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return kombu_json.loads(raw)


def fast_body(envelope: Any) -> bytes | None:
    """The JSON bytes of the body when the envelope is the common case, else None.

    The common case is what every Celery producer sends: ``application/json``, a base64
    body (the Redis transport's default ``body_encoding``), no compression header, and the
    ``delivery_tag`` kombu's ``Message`` insists on. Anything else, or anything malformed,
    returns None and goes to kombu's own decoding.

    ``envelope`` may come from orjson rather than kombu's loader: every value read here is
    a string, a key's presence, or a mapping that kombu's ``__type__`` hook would have
    replaced (then this returns None), so the two parses agree on everything it looks at.
    """
    try:
        properties = envelope["properties"]
        body = envelope.get("body")
        headers = envelope.get("headers")
        if (
            envelope.get("content-type") != JSON_CONTENT_TYPE
            or properties.get("body_encoding") != "base64"
            or "delivery_tag" not in properties
            or (headers and (type(headers) is not dict or "__type__" in headers))
            or (headers and headers.get("compression"))
            or not body
            or type(body) is not str
        ):
            return None
        # base64.b64decode(str_to_bytes(body)), as kombu's Base64 codec, for ASCII text;
        # non-ASCII text raises here and is left to kombu (which skips such characters).
        return binascii.a2b_base64(body)
    except Exception:
        return None


def kombu_decode(channel: Any, accept: set[str] | None, envelope: Any) -> Any:
    """What kombu's consumer makes of a parsed envelope: the virtual transport's ``Message``
    (body decoding, decompression), then ``Consumer._receive_callback``'s checks and
    ``Message.decode()`` (content-type allowed by ``accept``, the registered decoder)."""
    message = channel.Message(envelope, channel=channel)
    message.accept = accept
    if message.errors:
        message._reraise_error()
    return message.decode()


def decode_message(
    data: bytes,
    slow_decode: Callable[[Any], Any],
    *,
    fast_json: bool = True,
) -> Any:
    """One pub/sub payload to the decoded body (an event dict, or a list of them).

    ``slow_decode`` decodes an envelope the way kombu's consumer does (:func:`kombu_decode`
    with the channel and accepted types bound); it gets every message the fast route does
    not, with the envelope parsed by kombu's loader as the Redis transport parses it.
    Raises :class:`Undecodable` where kombu would log the message and drop it.
    """
    raw = None
    if fast_json:
        try:
            envelope = orjson.loads(data)
        except orjson.JSONDecodeError:
            envelope = None  # kombu's loader decides below
        raw = fast_body(envelope)
        # Besides the body (base64, so no brackets or digits that matter), an envelope is a
        # few hundred bytes of headers and properties. One that carries more could nest
        # deeper than kombu's loader parses, or hold an integer too long for it: kombu's
        # loader decides then, and fails where it fails.
        if raw is not None and len(data) - len(raw) * 4 // 3 > MAX_ENVELOPE_EXTRA:
            raw = None
    if raw is not None:
        try:
            return loads_json(raw)
        except Exception as exc:  # kombu's on_decode_error: "Can't decode message body"
            raise Undecodable(f"cannot decode the message body: {exc!r}") from exc
    try:
        envelope = kombu_json.loads(bytes_to_str(data))
    except Exception as exc:  # kombu: "Cannot process event on channel", then skip
        raise Undecodable(f"cannot parse the message envelope: {exc!r}") from exc
    try:
        return slow_decode(envelope)
    except Exception as exc:
        raise Undecodable(f"cannot decode the message body: {exc!r}") from exc


# ---------------------------------------------------------------------------------------
# Redis: where kombu listens, and whether we can listen there ourselves.


def subscription_pattern(channel: Any, exchange: str) -> str:
    """The pattern kombu's Redis channel ``PSUBSCRIBE``s to for ``exchange`` and key ``#``.

    kombu binds a fanout queue with the routing key's ``#`` turned into ``*``
    (``Channel._queue_bind``), subscribes to ``_get_publish_topic(exchange, '*')``, and its
    prefixed pub/sub client puts ``global_keyprefix`` in front.
    """
    topic = channel.keyprefix_fanout + exchange
    if channel.fanout_patterns:
        topic += "/*"
    return (channel.global_keyprefix or "") + topic


def unsupported_reason(app: Celery, connection: Connection) -> str | None:
    """Why the fast path cannot serve this broker connection; None when it can."""
    try:
        from kombu.transport import redis as kombu_redis
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError as exc:  # pragma: no cover - both are dependencies
        return f"not available ({exc})"
    transport = connection.transport
    if not isinstance(transport, kombu_redis.Transport):
        return "the broker is not Redis"
    if isinstance(transport, kombu_redis.SentinelTransport):
        return "Redis Sentinel is left to kombu"
    if not HIREDIS_AVAILABLE:
        return "hiredis is not installed"
    if app.conf.event_serializer != "json":
        return f"the event serializer is {app.conf.event_serializer!r}, not json"
    return None


class RedisEventStream:
    """One subscription to Celery's event channel, on a Redis connection of our own.

    Build it on a connected kombu ``Connection`` for which :func:`unsupported_reason` is
    None (it supplies the connection parameters, the channel naming and the kombu decoding
    for odd messages), then :meth:`run` it in the receiver thread.
    """

    def __init__(
        self,
        app: Celery,
        connection: Connection,
        handler: EventHandler,
        *,
        wakeup: bool = True,
        poll_interval: float = 0.2,
    ) -> None:
        self.app = app
        self.connection = connection
        self.channel = connection.default_channel
        self.handler = handler
        self.wakeup = wakeup
        self.poll_interval = poll_interval
        # Celery's receiver, never consumed: it supplies event_from_message (clock and
        # timestamp handling), the accepted content types, the exchange name and the
        # wake-up broadcast, so none of that is re-implemented here.
        self.receiver = app.events.Receiver(self.channel, handlers={"*": handler})
        self.kombu_decode = functools.partial(
            kombu_decode, self.channel, prepare_accept_content(self.receiver.accept)
        )
        self.pattern = subscription_pattern(self.channel, self.receiver.exchange.name)
        # The fast JSON route reproduces kombu's stock JSON decoder; if someone registered
        # another one for application/json, every body goes through the registry instead.
        decoders = getattr(registry, "_decoders", {})
        self.fast_json = decoders.get(JSON_CONTENT_TYPE) is kombu_json.loads
        #: Seconds of silence before a PING (kombu's ``health_check_interval``).
        self.keepalive = DEFAULT_KEEPALIVE
        self.messages = 0
        self.events = 0
        self._redis: Any = None

    # -- the connection ------------------------------------------------------------------

    def _connect(self) -> Any:
        """A redis-py connection made as kombu makes its own, subscribed to the pattern.

        Made from kombu's connection parameters, so TLS, unix sockets, credentials, the db
        and timeouts are as kombu has them.

        redis-py's own health check is switched off on it: it would PING and expect a plain
        ``PONG``, which a subscribed connection does not answer. :meth:`run` checks the
        subscription with pub/sub PINGs instead.
        """
        pool = self.channel.pool
        kwargs = dict(pool.connection_kwargs)
        self.keepalive = float(kwargs.get("health_check_interval") or DEFAULT_KEEPALIVE)
        kwargs["health_check_interval"] = 0
        # RESP2 and bytes: pub/sub messages arrive as plain [b"pmessage", pattern, channel,
        # data] lists (redis-py 8 speaks RESP3 by default, where they are push frames). The
        # payload bytes are the same either way.
        kwargs["protocol"] = 2
        kwargs["decode_responses"] = False
        conn = pool.connection_class(**kwargs)
        conn.connect()
        conn.send_command("PSUBSCRIBE", self.pattern, check_health=False)
        reply = conn.read_response()
        if not (isinstance(reply, list) and reply and reply[0] == b"psubscribe"):
            conn.disconnect()
            raise ConnectionError(f"unexpected reply to PSUBSCRIBE: {reply!r}")
        return conn

    def close(self) -> None:
        conn, self._redis = self._redis, None
        if conn is not None:
            conn.disconnect()

    # -- the loop --------------------------------------------------------------------------

    def run(
        self,
        should_stop: Callable[[], bool],
        on_iteration: Callable[[], None] = lambda: None,
    ) -> None:
        """Receive until ``should_stop()``; connection errors propagate to the caller.

        ``on_iteration`` is called at least every ``poll_interval`` (the receiver thread
        reports the broker as up there, as kombu's ``ConsumerMixin.on_iteration``).
        """
        conn = self._redis = self._connect()
        try:
            if self.wakeup:
                # As Celery's EventReceiver on consume-ready: every worker answers with a
                # heartbeat, so workers show up at once, not at their next heartbeat.
                self.receiver.wakeup_workers(channel=self.channel)
            self._loop(conn, should_stop, on_iteration)
        finally:
            self.close()

    def _loop(
        self, conn: Any, should_stop: Callable[[], bool], on_iteration: Callable[[], None]
    ) -> None:
        read = conn.read_response
        can_read = conn.can_read
        from_message = self.receiver.event_from_message
        handler = self.handler
        slow_decode = self.kombu_decode
        fast_json = self.fast_json
        poll = self.poll_interval
        keepalive = self.keepalive
        heard = time.monotonic()
        ping_sent: float | None = None
        messages = events = 0
        while not should_stop():
            on_iteration()
            if not can_read(timeout=poll):
                now = time.monotonic()
                if ping_sent is not None:
                    if now - ping_sent >= keepalive:
                        raise ConnectionError(f"Redis did not answer a PING in {keepalive:.0f} s")
                elif now - heard >= keepalive:
                    conn.send_command("PING", check_health=False)
                    ping_sent = now
                continue
            for _ in range(BURST):
                reply = read()
                # [b"pmessage", pattern, channel, data]; also [b"pong", b""] after a PING.
                if reply[0] == b"pmessage" and reply[3]:
                    messages += 1
                    try:
                        body = decode_message(reply[3], slow_decode, fast_json=fast_json)
                    except Undecodable as exc:
                        log.error("Dropped an event message: %s; payload %.300r", exc, reply[3])
                    else:
                        # Celery's EventReceiver._receive: a list body is several events.
                        for event in body if isinstance(body, list) else (body,):
                            try:
                                event = from_message(event)[1]
                            except Exception as exc:
                                log.error("Dropped a malformed event (%r): %.300r", exc, event)
                                continue
                            events += 1
                            handler(event)
                if not can_read(timeout=0):
                    break
            heard = time.monotonic()
            ping_sent = None
            self.messages = messages
            self.events = events
