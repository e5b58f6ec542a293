"""Synthetic but realistic Celery task events, published to the broker as workers do.

    python bench/events.py --tasks 20000                      # as fast as possible, batched
    python bench/events.py --tasks 20000 --mode single --rate 5000
    python bench/events.py --check                            # wire frames == Celery's frames

Every task is a worker's ``task-received`` → ``task-started`` → ``task-succeeded`` (2% end in
``task-failed`` with an exception and a traceback), with the fields a Celery 5 worker sends;
each simulated worker also sends ``worker-online`` and a ``worker-heartbeat`` every 2 s.

Two message modes, as Celery has them:

- ``single``: one event per message (routing key ``task.received`` and so on);
- ``batch``: task events buffered per worker and published 24 to a message as a JSON list
  (routing key ``task.multi``): Celery's ``EventDispatcher(buffer_group=['task'])``.

Two publishers:

- ``kombu``: Celery's own ``app.events.Dispatcher`` (``send`` and, batched, its group
  buffer and ``flush``); works on every broker, but costs ~60-100 µs of Python per message,
  so on 2 cores it cannot drive a monitor at tens of thousands of events per second.
- ``wire`` (Redis only, the default there): the same frames kombu puts on the wire (kombu's
  JSON envelope, base64 body, ``/<db>.celeryev/<routing key>`` channel), encoded with orjson
  and sent as pipelined ``PUBLISH`` commands on a raw socket. ``--check`` publishes tasks
  through both and shows that a subscriber decodes the same events from each. ``PUBLISH``
  answers how many subscribers got each message: a message nobody received (a monitor that
  Redis disconnected for overflowing its pub/sub output buffer) is counted as ``unheard``.

Publishing is bounded by a task count and a deadline; ``--rate`` (events/s) uses a token
bucket, 0 means as fast as possible.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import socket
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import orjson

BATCH_SIZE = 24  # Celery's EventDispatcher buffer_limit
HEARTBEAT_S = 2.0
FAIL_EVERY = 50  # 2% of tasks fail

TASK_NAMES = (
    "shop.orders.process_order",
    "shop.orders.send_confirmation_email",
    "shop.payments.capture_payment",
    "shop.inventory.reserve_stock",
    "shop.reports.build_daily_report",
    "shop.search.reindex_product",
    "shop.users.sync_profile",
    "shop.notifications.push",
)
CUSTOMERS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell")
SW = {"sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux"}


def redis_db(broker: str) -> int:
    path = urlparse(broker).path.strip("/")
    return int(path) if path else 0


# ---------------------------------------------------------------------------------------
# The workload: what a small cluster of workers would report.


@dataclass
class SimTask:
    uuid: str
    hostname: str
    events: list[tuple[str, dict[str, Any]]]  # (type, fields) in the order a worker sends


class Workload:
    """Deterministic stream of task lifecycles spread over ``workers`` worker hostnames."""

    def __init__(self, workers: int = 4, seed: int = 1, prefix: str = "bench") -> None:
        self.rng = random.Random(seed)
        self.hostnames = [f"celery@{prefix}-worker-{i + 1}" for i in range(workers)]
        self.pids = {h: 10_000 + i for i, h in enumerate(self.hostnames)}
        self.count = 0

    def task(self) -> SimTask:
        rng = self.rng
        n = self.count
        self.count += 1
        h = f"{rng.getrandbits(128):032x}"  # a random uuid4, as Celery makes them
        uuid = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
        name = TASK_NAMES[n % len(TASK_NAMES)]
        hostname = self.hostnames[n % len(self.hostnames)]
        customer = CUSTOMERS[rng.randrange(len(CUSTOMERS))]
        order = rng.randrange(1, 10_000_000)
        args = f"({order}, '{customer}-{rng.randrange(1000):03d}')"
        kwargs = f"{{'priority': {rng.randrange(10)}, 'source': 'api', 'retry': False}}"
        runtime = round(rng.uniform(0.002, 0.8), 6)
        received = (
            "task-received",
            {"uuid": uuid, "name": name, "args": args, "kwargs": kwargs, "root_id": uuid,
             "parent_id": None, "retries": 0, "eta": None, "expires": None},
        )  # fmt: skip
        started = ("task-started", {"uuid": uuid})
        if n % FAIL_EVERY == FAIL_EVERY - 1:
            outcome = (
                "task-failed",
                {"uuid": uuid,
                 "exception": f"ValueError('order {order} has no lines')",
                 "traceback": (
                     "Traceback (most recent call last):\n"
                     '  File "celery/app/trace.py", line 453, in trace_task\n'
                     "    R = retval = fun(*args, **kwargs)\n"
                     f'  File "shop/orders.py", line 88, in {name.rsplit(".", 1)[1]}\n'
                     "    raise ValueError(...)\n"
                     f"ValueError: order {order} has no lines\n"
                 )},
            )  # fmt: skip
        else:
            result = f"{{'order': {order}, 'status': 'ok', 'customer': '{customer}'}}"
            outcome = ("task-succeeded", {"uuid": uuid, "result": result, "runtime": runtime})
        return SimTask(uuid, hostname, [received, started, outcome])

    def heartbeat(self, hostname: str, processed: int) -> tuple[str, dict[str, Any]]:
        return (
            "worker-heartbeat",
            {"freq": HEARTBEAT_S, "active": self.rng.randrange(4), "processed": processed,
             "loadavg": [0.42, 0.37, 0.31], **SW},
        )  # fmt: skip

    def online(self) -> tuple[str, dict[str, Any]]:
        return ("worker-online", {"freq": HEARTBEAT_S, "active": 0, "processed": 0,
                                  "loadavg": [0.1, 0.1, 0.1], **SW})  # fmt: skip


# ---------------------------------------------------------------------------------------
# Publishers.


class WirePublisher:
    """kombu's Redis fanout frames, sent as pipelined PUBLISH commands on a raw socket."""

    def __init__(self, broker: str, pids: dict[str, int]) -> None:
        url = urlparse(broker)
        if url.scheme not in ("redis", ""):
            raise ValueError("the wire publisher speaks plain redis:// only; use --publisher=kombu")
        self.db = redis_db(broker)
        self.prefix = f"/{self.db}.celeryev/".encode()
        self.pids = pids
        self.clock = 0
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if url.password:
            self._command(b"AUTH", url.password.encode())
        self.out: list[bytes] = []
        self._tails: dict[tuple[str, str], bytes] = {}
        # delivery tags look like uuid4s: a random prefix per publisher and a counter.
        self._tag_prefix = str(uuidlib.uuid4())[:23].encode()
        self._tag = 0
        self.sent = 0  # messages
        self.replies = 0
        self.unheard = 0  # messages no subscriber received
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_replies, daemon=True)
        self._closed = False
        self._reader.start()

    def _command(self, *parts: bytes) -> None:
        self.sock.sendall(_resp(*parts))
        self.sock.recv(1024)

    def _read_replies(self) -> None:
        rest = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            lines = (rest + data).split(b"\r\n")
            rest = lines.pop()
            with self._lock:
                self.replies += len(lines)
                self.unheard += lines.count(b":0")

    def event(self, hostname: str, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        self.clock += 1
        return {"hostname": hostname, "utcoffset": 0, "pid": self.pids.get(hostname, 1),
                "clock": self.clock, **fields, "timestamp": time.time(), "type": kind}  # fmt: skip

    def add(self, hostname: str, routing_key: str, body: Any) -> None:
        """Queue one message (an event dict, or a list of them for ``task.multi``).

        The envelope is kombu's (``Channel._put_fanout`` of ``prepare_message``), written
        from a template: the bytes differ from ``json.dumps`` only in whitespace.
        """
        tail = self._tails.get((hostname, routing_key))
        if tail is None:
            tail = self._tails[(hostname, routing_key)] = (
                b'","content-encoding":"utf-8","content-type":"application/json",'
                b'"headers":{"hostname":%s},"properties":{"delivery_mode":1,'
                b'"delivery_info":{"exchange":"celeryev","routing_key":%s},"priority":0,'
                b'"body_encoding":"base64","delivery_tag":"%s-'
                % (orjson.dumps(hostname), orjson.dumps(routing_key), self._tag_prefix)
            )
        self._tag += 1
        envelope = b'{"body":"%s%s%012x"}}' % (
            base64.b64encode(orjson.dumps(body)),
            tail,
            self._tag,
        )
        channel = self.prefix + routing_key.encode()
        self.out.append(
            b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
            % (len(channel), channel, len(envelope), envelope)
        )

    def flush(self) -> None:
        if self.out:
            self.sock.sendall(b"".join(self.out))
            self.sent += len(self.out)
            self.out.clear()

    def wait_replies(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.replies < self.sent and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        self.flush()
        self.wait_replies()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class KombuPublisher:
    """Celery's own EventDispatcher, one per simulated worker hostname."""

    def __init__(self, broker: str, hostnames: list[str], batch: bool) -> None:
        from celery import Celery

        self.app = Celery("bench", broker=broker, set_as_current=False)
        self.conn = self.app.connection_for_write()
        self.conn.ensure_connection(max_retries=3)
        self.dispatchers = {
            h: self.app.events.Dispatcher(
                self.conn,
                hostname=h,
                buffer_group=["task"] if batch else None,
                buffer_limit=BATCH_SIZE,
            )
            for h in hostnames
        }
        self.sent = 0
        self.unheard = 0  # kombu does not tell

    def send(self, hostname: str, kind: str, fields: dict[str, Any]) -> None:
        self.dispatchers[hostname].send(kind, **fields)

    def flush_worker(self, hostname: str) -> None:
        self.dispatchers[hostname].flush()

    def close(self) -> None:
        for d in self.dispatchers.values():
            d.flush()
            d.close()
        self.conn.release()


# ---------------------------------------------------------------------------------------
# The load generator.


@dataclass
class PublishStats:
    tasks: int = 0
    events: int = 0
    messages: int = 0
    seconds: float = 0.0
    unheard: int = 0
    first_uuid: str | None = None
    last_uuid: str | None = None
    uuids: list[str] = field(default_factory=list)  # every task, or a stride sample
    started_at: float = 0.0  # time.monotonic() of the first message
    finished_at: float = 0.0  # time.monotonic() after the last message went out

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


class LoadGenerator:
    """Publishes task lifecycles and heartbeats at a rate (events/s) or as fast as it can."""

    def __init__(
        self,
        broker: str,
        *,
        mode: str = "batch",
        publisher: str | None = None,
        workers: int = 4,
        seed: int = 1,
    ) -> None:
        if mode not in ("single", "batch"):
            raise ValueError(mode)
        self.mode = mode
        self.workload = Workload(workers, seed)
        if publisher is None:
            publisher = "wire" if broker.startswith("redis://") else "kombu"
        self.publisher_kind = publisher
        self.wire: WirePublisher | None = None
        self.kombu: KombuPublisher | None = None
        if publisher == "wire":
            self.wire = WirePublisher(broker, self.workload.pids)
        elif publisher == "kombu":
            self.kombu = KombuPublisher(broker, self.workload.hostnames, mode == "batch")
        else:
            raise ValueError(publisher)
        self.buffers: dict[str, list[dict[str, Any]]] = {h: [] for h in self.workload.hostnames}
        self.processed = dict.fromkeys(self.workload.hostnames, 0)
        self.events = 0
        self.messages = 0
        self._next_heartbeat = 0.0
        self._online_sent = False

    # -- emitting one event -----------------------------------------------------------

    def _emit(self, hostname: str, kind: str, fields: dict[str, Any]) -> None:
        self.events += 1
        if self.kombu is not None:
            self.kombu.send(hostname, kind, fields)
            if self.mode == "batch" and kind.startswith("task-"):
                # The dispatcher published its group buffer when it reached 24.
                if not self.kombu.dispatchers[hostname]._group_buffer["task"]:
                    self.messages += 1
            else:
                self.messages += 1
            return
        wire = self.wire
        assert wire is not None
        event = wire.event(hostname, kind, fields)
        if self.mode == "batch" and kind.startswith("task-"):
            buf = self.buffers[hostname]
            buf.append(event)
            if len(buf) >= BATCH_SIZE:
                self._flush_worker(hostname)
        else:
            wire.add(hostname, kind.replace("-", "."), event)
            self.messages += 1

    def _flush_worker(self, hostname: str) -> None:
        if self.kombu is not None:
            if self.kombu.dispatchers[hostname]._group_buffer.get("task"):
                self.messages += 1
            self.kombu.flush_worker(hostname)
            return
        buf = self.buffers[hostname]
        if buf:
            assert self.wire is not None
            self.wire.add(hostname, "task.multi", list(buf))
            buf.clear()
            self.messages += 1

    def _send_out(self) -> None:
        if self.wire is not None:
            self.wire.flush()

    def _heartbeats(self, now: float) -> None:
        if not self._online_sent:
            self._online_sent = True
            for h in self.workload.hostnames:
                self._emit(h, *self.workload.online())
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_S
            for h in self.workload.hostnames:
                self._emit(h, *self.workload.heartbeat(h, self.processed[h]))

    # -- the loop ---------------------------------------------------------------------

    def run(
        self,
        tasks: int | None = None,
        *,
        rate: float = 0.0,
        duration: float | None = None,
        marker_every: float | None = None,
        on_marker: Callable[[str, float], None] | None = None,
        keep_uuids: int = 0,
        throttle: Callable[[], None] | None = None,
        tick: float = 0.005,
    ) -> PublishStats:
        """Publish until ``tasks`` tasks or ``duration`` seconds, whichever comes first.

        ``rate`` is events/s (0 = as fast as possible). Every ``marker_every`` seconds the
        next task is a marker: its messages go out at once and ``on_marker(uuid, t)`` gets
        the ``time.monotonic()`` after its last event was sent. ``keep_uuids`` > 0 keeps that
        many task ids, spread evenly (use a number >= ``tasks`` to keep all). ``throttle``
        is called between chunks and may block (flow control).
        """
        if tasks is None and duration is None:
            raise ValueError("bounded runs only: give tasks or duration")
        stats = PublishStats()
        stride = max(1, (tasks or 1_000_000) // keep_uuids) if keep_uuids else 0
        events0, messages0 = self.events, self.messages
        unheard0 = self._unheard()
        t0 = time.monotonic()
        stats.started_at = t0
        deadline = t0 + duration if duration else float("inf")
        next_marker = t0 + marker_every if marker_every else float("inf")
        chunk = 64 if rate == 0 else 1
        done = 0
        now = t0
        while (tasks is None or done < tasks) and now < deadline:
            now = time.monotonic()
            self._heartbeats(now)
            if rate > 0:
                budget = int(rate * (now - t0)) - (self.events - events0)
                if budget <= 0:
                    self._send_out()
                    time.sleep(tick)
                    continue
                n = max(1, budget // 3)
            else:
                n = chunk
            if tasks is not None:
                n = min(n, tasks - done)
            for _ in range(n):
                task = self.workload.task()
                marker = now >= next_marker
                for kind, fields in task.events:
                    self._emit(task.hostname, kind, fields)
                self.processed[task.hostname] += 1
                if done == 0:
                    stats.first_uuid = task.uuid
                stats.last_uuid = task.uuid
                if stride and done % stride == 0:
                    stats.uuids.append(task.uuid)
                done += 1
                if marker:
                    next_marker = now + marker_every  # type: ignore[operator]
                    if self.mode == "batch":
                        self._flush_worker(task.hostname)
                    self._send_out()
                    if on_marker is not None:
                        on_marker(task.uuid, time.monotonic())
            self._send_out()
            if throttle is not None:
                throttle()
        # Workers flush their buffers when idle: so do we.
        for h in self.workload.hostnames:
            self._flush_worker(h)
        self._send_out()
        stats.finished_at = time.monotonic()
        stats.seconds = stats.finished_at - t0
        stats.tasks = done
        stats.events = self.events - events0
        stats.messages = self.messages - messages0
        if self.wire is not None:
            self.wire.wait_replies(10.0)
        stats.unheard = self._unheard() - unheard0
        if stats.last_uuid and (not stats.uuids or stats.uuids[-1] != stats.last_uuid):
            stats.uuids.append(stats.last_uuid)
        return stats

    def _unheard(self) -> int:
        return self.wire.unheard if self.wire is not None else 0

    def close(self) -> None:
        if self.wire is not None:
            self.wire.close()
        if self.kombu is not None:
            self.kombu.close()


# ---------------------------------------------------------------------------------------
# --check: the wire frames decode to exactly what Celery's dispatcher sends.


def _decode(message: bytes) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    envelope = orjson.loads(message)
    body = orjson.loads(base64.b64decode(envelope["body"]))
    events = body if isinstance(body, list) else [body]
    return envelope["properties"]["delivery_info"]["routing_key"], events, envelope


def check(broker: str) -> int:
    """Publish 30 tasks through each publisher, in each mode, and compare what arrives."""
    import redis

    db = redis_db(broker)
    client = redis.Redis.from_url(broker)
    ok = True
    for mode in ("single", "batch"):
        got: dict[str, list[Any]] = {}
        for kind in ("kombu", "wire"):
            sub = client.pubsub()
            sub.psubscribe(f"/{db}.celeryev/*")
            sub.get_message(timeout=1.0)
            gen = LoadGenerator(broker, mode=mode, publisher=kind, seed=7)
            gen._online_sent = True
            gen._next_heartbeat = float("inf")
            gen.run(30)
            gen.close()
            frames = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                m = sub.get_message(timeout=0.5)
                if m is None:
                    if frames:
                        break
                    continue
                if m["type"] == "pmessage":
                    frames.append((m["channel"].decode(), *_decode(m["data"])))
            sub.close()
            got[kind] = frames
        strip = {"clock", "timestamp", "pid", "utcoffset"}
        shapes = {}
        for kind, frames in got.items():
            shapes[kind] = [
                (channel, rk, [{k: v for k, v in e.items() if k not in strip} for e in events],
                 sorted(env), sorted(env["properties"]), env["headers"])
                for channel, rk, events, env in frames
            ]  # fmt: skip
        same = shapes["kombu"] == shapes["wire"]
        ok &= same
        n_events = sum(len(f[2]) for f in got["wire"])
        print(f"{mode:6s}: kombu {len(got['kombu'])} messages, wire {len(got['wire'])} "
              f"messages, {n_events} events: {'identical' if same else 'DIFFERENT'} "
              "(ignoring clock/timestamp/pid)")  # fmt: skip
        if not same:
            for a, b in zip(shapes["kombu"], shapes["wire"], strict=False):
                if a != b:
                    print("  kombu:", a, "\n  wire: ", b)
                    break
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="Publish synthetic Celery task events.")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks (3 events each)")
    parser.add_argument("--rate", type=float, default=0, help="events/s, 0 = as fast as possible")
    parser.add_argument("--duration", type=float, default=120, help="stop after this many s")
    parser.add_argument("--mode", choices=("single", "batch"), default="batch")
    parser.add_argument("--publisher", choices=("wire", "kombu"), default=None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--check", action="store_true", help="compare wire and kombu frames")
    args = parser.parse_args()
    if args.check:
        return check(args.broker)
    gen = LoadGenerator(args.broker, mode=args.mode, publisher=args.publisher,
                        workers=args.workers, seed=os.getpid())  # fmt: skip
    try:
        stats = gen.run(args.tasks, rate=args.rate, duration=args.duration)
    finally:
        gen.close()
    print(f"{'publisher':10s} {'mode':6s} {'tasks':>8s} {'events':>8s} {'messages':>8s} "
          f"{'seconds':>8s} {'events/s':>9s} {'unheard':>8s}")  # fmt: skip
    print(f"{gen.publisher_kind:10s} {args.mode:6s} {stats.tasks:8d} {stats.events:8d} "
          f"{stats.messages:8d} {stats.seconds:8.2f} {stats.events_per_s:9.0f} "
          f"{stats.unheard:8d}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
