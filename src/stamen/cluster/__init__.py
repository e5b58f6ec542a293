"""Cluster access: worker inspection and broker queue lengths (DESIGN.md, "Cluster access").

Everything here talks to the broker with blocking clients; callers on the event loop use
:meth:`Inspector.inspect` (which runs its calls in its own threads) and run
:meth:`QueueLengths.lengths` in a thread.
"""

from stamen.cluster.inspector import Inspector
from stamen.cluster.queues import QueueLengths, UnsupportedBroker

__all__ = ["Inspector", "QueueLengths", "UnsupportedBroker"]
