"""Stand-in for ``flower.views``: ``BaseHandler`` exists so that configuration files that
subclass it (custom login handlers) still load. Stamen does not run Tornado handlers; a custom
``auth_provider`` is reported by name and handled by Stamen's web layer.
"""

from __future__ import annotations


class BaseHandler:
    """Placeholder for Flower's Tornado ``BaseHandler``; carries no behaviour."""
