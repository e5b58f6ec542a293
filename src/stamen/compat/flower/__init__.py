"""Stand-in for the ``flower`` package inside Flower configuration files (see ``stamen.compat``).

Only the names that configuration files are known to use exist here; they are served
to the configuration file alone and never registered as the real ``flower``.
"""

#: The Flower release whose configuration files this shim follows.
__version__ = "2.2.0"
VERSION = __version__
