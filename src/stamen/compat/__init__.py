"""Compatibility with Flower's own module names, for existing ``flowerconfig.py`` files.

Flower's configuration files are Python and often import from Flower itself
(``from flower.utils.template import humanize``, ``flower.views.BaseHandler``). Stamen
runs such a file with its own ``__builtins__``, whose ``__import__`` maps ``flower`` and
``flower.*`` to ``stamen.compat.flower...``. Nothing is installed globally: a real
``flower`` package in the same environment keeps working for everyone else, and
``sys.modules['flower']`` is never touched.
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

#: The package that stands in for ``flower`` inside configuration files.
SHIM_PACKAGE = "stamen.compat.flower"

#: What the shim provides, named in the error for anything else.
PROVIDED_MODULES = (
    "flower",
    "flower.utils",
    "flower.utils.template",
    "flower.views",
    "flower.views.auth",
    "flower.views.monitor",
)


def _is_flower_name(name: str) -> bool:
    return name == "flower" or name.startswith("flower.")


def flower_import(
    name: str,
    globals: Mapping[str, Any] | None = None,
    locals: Mapping[str, Any] | None = None,
    fromlist: Sequence[str] | None = (),
    level: int = 0,
) -> ModuleType:
    """An ``__import__`` that serves ``flower[.x]`` from the shim and everything else as usual.

    It follows ``__import__``'s contract: without a ``fromlist`` it returns the top-level
    package (our ``flower`` stand-in), with one it returns the named module itself.
    """
    if level != 0 or not _is_flower_name(name):
        return builtins.__import__(name, globals, locals, fromlist, level)
    target = SHIM_PACKAGE + name[len("flower") :]
    try:
        module = builtins.__import__(target, None, None, fromlist, 0)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith(SHIM_PACKAGE):
            raise
        missing = "flower" + exc.name[len(SHIM_PACKAGE) :]
        raise ModuleNotFoundError(
            f"No module named {missing!r} (configuration files can import only "
            f"{', '.join(PROVIDED_MODULES)} under Stamen)",
            name=missing,
        ) from None
    if fromlist:
        return module
    return sys.modules[SHIM_PACKAGE]


def config_builtins() -> dict[str, Any]:
    """A fresh ``__builtins__`` mapping for executing a Flower configuration file."""
    namespace = dict(vars(builtins))
    namespace["__import__"] = flower_import
    return namespace
