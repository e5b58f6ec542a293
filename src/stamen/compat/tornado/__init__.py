"""Stand-in for the ``tornado`` package inside Flower configuration files, used only when
Tornado is not installed (see ``stamen.compat``).

Flower's documentation protects ``/metrics`` with
``Metrics.get = tornado.web.authenticated(Metrics.get)``; Stamen runs no Tornado, so this
package provides just enough for that line to load: ``tornado.web.authenticated``. It is
served to the configuration file alone and never registered as the real ``tornado``.
"""
