"""``python -m stamen``: the same as the ``stamen`` command.

As with Flower's ``python -m flower -A proj flower --port=5555`` (Celery's command line),
``python -m stamen -A proj flower --port=5555`` works too: ``flower`` (or ``stamen``) as the
command runs the server, as no command does.
"""

from stamen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
