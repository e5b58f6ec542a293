"""Queue lengths read straight from the broker, for ``/broker`` and ``/api/queues/length``.

Place in the pipeline: cluster access (DESIGN.md, "Cluster access"). Events never carry queue
depths, so these figures come from the broker itself, on demand:

* Redis (``redis``, ``rediss``, ``redis`` + ``broker_use_ssl``, ``redis+socket``, ``sentinel``):
  one pipelined round trip of ``LLEN`` over every priority sub-list kombu may use for a queue.
* RabbitMQ (``amqp``, ``amqps``, ``pyamqp``): the management API when ``broker_api`` is given
  (Flower's behaviour and result shape), otherwise a passive ``queue.declare`` over AMQP itself,
  so no management plugin is needed.
* anything else raises :class:`UnsupportedBroker`.

Unlike Flower, which builds a new client for every page view (spec 12.6), one
:class:`QueueLengths` is built per Celery app and keeps its client between calls. Calls are
blocking and made from a thread pool, so every client here is either thread-safe (redis-py's
connection pool) or guarded by a lock (the HTTP and AMQP connections). Nothing connects in
the constructor: configuration errors (a bad Redis db number, Sentinel without
``master_name``) surface from :meth:`QueueLengths.lengths`, as they do in Flower, so a broken
broker setting costs the broker page, not the whole server.

One module a job: ``redis``, ``management`` (RabbitMQ's management API), ``amqp`` (passive
declare), ``common`` (shared by all three) and ``lengths`` (:class:`QueueLengths`, which picks
one of them).
"""

from stamen.cluster.queues.common import UnsupportedBroker
from stamen.cluster.queues.lengths import QueueLengths
from stamen.cluster.queues.management import (
    management_credentials,
    management_queues_url,
    management_ssl_context,
)
from stamen.cluster.queues.redis import (
    DEFAULT_SEP,
    parse_redis_db,
    redis_queue_keys,
    redis_target,
)

__all__ = [
    "DEFAULT_SEP",
    "QueueLengths",
    "UnsupportedBroker",
    "management_credentials",
    "management_queues_url",
    "management_ssl_context",
    "parse_redis_db",
    "redis_queue_keys",
    "redis_target",
]
