"""Stand-in for ``flower.views.monitor``: ``Metrics`` and ``Healthcheck`` exist so that
configuration files written for Flower's docs still load.

Flower's docs protect ``/metrics`` with ``Metrics.get = tornado.web.authenticated(Metrics.get)``.
Stamen runs no Tornado handlers, but after running the file it looks at ``Metrics.get``
(``stamen.compat.run_guarded``): replaced by anything, it means ``/metrics`` requires the
authentication the pages require. The original is then put back, so one file never leaks
into the next. Replacing ``Healthcheck.get`` has no effect (a warning says so).
"""

from __future__ import annotations

from typing import Any

from . import BaseHandler


class Metrics(BaseHandler):
    """Placeholder for the ``/metrics`` handler; replacing ``get`` protects ``/metrics``."""

    def get(self, *args: Any, **kwargs: Any) -> None:
        """Placeholder; Stamen serves ``/metrics`` itself."""


class Healthcheck(BaseHandler):
    """Placeholder for the ``/healthcheck`` handler."""

    def get(self, *args: Any, **kwargs: Any) -> None:
        """Placeholder; Stamen serves ``/healthcheck`` itself."""
