"""``python -m stamen``: the same as the ``stamen`` command."""

from stamen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
