"""Stand-in for ``flower.views.monitor``: ``Metrics`` and ``Healthcheck`` exist so that
configuration files written for Flower's docs (which wrap or replace ``Metrics.get`` to protect
``/metrics``) still load. Patching them has no effect on Stamen's routes.
"""

from __future__ import annotations

from typing import Any

from . import BaseHandler


class Metrics(BaseHandler):
    """Placeholder for the ``/metrics`` handler."""

    def get(self, *args: Any, **kwargs: Any) -> None:
        """Placeholder; Stamen serves ``/metrics`` itself."""


class Healthcheck(BaseHandler):
    """Placeholder for the ``/healthcheck`` handler."""

    def get(self, *args: Any, **kwargs: Any) -> None:
        """Placeholder; Stamen serves ``/healthcheck`` itself."""
