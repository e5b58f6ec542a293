"""Compatibility with Flower's own module names, for existing ``flowerconfig.py`` files.

Flower's configuration files are Python and often import from Flower itself
(``from flower.utils.template import humanize``, ``flower.views.BaseHandler``) and, to
protect ``/metrics`` as Flower's documentation shows, from Tornado
(``Metrics.get = tornado.web.authenticated(Metrics.get)``). Stamen runs such a file with its
own ``__builtins__``, whose ``__import__`` maps ``flower`` and ``flower.*`` to
``stamen.compat.flower...`` and, only when Tornado is not installed, ``tornado`` and
``tornado.web`` to ``stamen.compat.tornado...``. Nothing is installed globally: a real
``flower`` or ``tornado`` package in the same environment keeps working for everyone else
(a real Tornado is also what the file itself gets), and ``sys.modules['flower']`` /
``sys.modules['tornado']`` are never touched.

``run_guarded`` executes the file and then reads what it did to the stand-in handlers
(``flower.views.monitor.Metrics.get`` replaced means "protect ``/metrics``"), putting them
back as they were so that one file cannot leak into the next.
"""

from __future__ import annotations

import builtins
import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

#: The package that stands in for ``flower`` inside configuration files.
SHIM_PACKAGE = "stamen.compat.flower"

#: The package that stands in for ``tornado`` inside configuration files, when Tornado is
#: not installed.
TORNADO_SHIM_PACKAGE = "stamen.compat.tornado"

#: What the shim provides, named in the error for anything else.
PROVIDED_MODULES = (
    "flower",
    "flower.utils",
    "flower.utils.template",
    "flower.views",
    "flower.views.auth",
    "flower.views.monitor",
)

#: What the Tornado stand-in provides (only ``tornado.web.authenticated`` has a meaning).
PROVIDED_TORNADO_MODULES = ("tornado", "tornado.web")


def _is_name_in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _import_stand_in(
    name: str, package: str, shim: str, provided: Sequence[str], fromlist: Sequence[str] | None
) -> ModuleType:
    """``__import__`` of ``name`` (in ``package``) served from ``shim`` instead."""
    target = shim + name[len(package) :]
    try:
        module = builtins.__import__(target, None, None, fromlist, 0)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith(shim):
            raise
        missing = package + exc.name[len(shim) :]
        raise ModuleNotFoundError(
            f"No module named {missing!r} (configuration files can import only "
            f"{', '.join(provided)} under Stamen)",
            name=missing,
        ) from None
    if fromlist:
        return module
    return sys.modules[shim]


def flower_import(
    name: str,
    globals: Mapping[str, Any] | None = None,
    locals: Mapping[str, Any] | None = None,
    fromlist: Sequence[str] | None = (),
    level: int = 0,
) -> ModuleType:
    """An ``__import__`` that serves ``flower[.x]`` from the shim, ``tornado[.x]`` from the
    real Tornado if installed (else from its stand-in) and everything else as usual.

    It follows ``__import__``'s contract: without a ``fromlist`` it returns the top-level
    package (our ``flower`` stand-in), with one it returns the named module itself.
    """
    if level == 0 and _is_name_in(name, "flower"):
        return _import_stand_in(name, "flower", SHIM_PACKAGE, PROVIDED_MODULES, fromlist)
    if level == 0 and _is_name_in(name, "tornado") and not _tornado_installed():
        return _import_stand_in(
            name, "tornado", TORNADO_SHIM_PACKAGE, PROVIDED_TORNADO_MODULES, fromlist
        )
    return builtins.__import__(name, globals, locals, fromlist, level)


def _tornado_installed() -> bool:
    """Whether a real ``tornado`` can be imported (then the file gets it, never ours)."""
    try:
        return importlib.util.find_spec("tornado") is not None
    except (ImportError, ValueError):  # a ``tornado`` in sys.modules without a spec
        return "tornado" in sys.modules and sys.modules["tornado"] is not None


def config_builtins() -> dict[str, Any]:
    """A fresh ``__builtins__`` mapping for executing a Flower configuration file."""
    namespace = dict(vars(builtins))
    namespace["__import__"] = flower_import
    return namespace


@dataclass(frozen=True)
class HandlerPatches:
    """What a configuration file did to the stand-in handlers of ``flower.views.monitor``.

    ``metrics_get`` is what ``Metrics.get`` was replaced with, or None if it was left alone;
    ``healthcheck_get`` the same for ``Healthcheck.get``.
    """

    metrics_get: Callable[..., Any] | None = None
    healthcheck_get: Callable[..., Any] | None = None

    @property
    def metrics_protected(self) -> bool:
        """Whether ``/metrics`` is to require authentication.

        The rule: replacing ``Metrics.get`` with anything at all asks for protection. Flower's
        documented recipe wraps it in ``tornado.web.authenticated`` (ours or the real one);
        Stamen runs no Tornado handler code, so any other replacement is treated the same
        way rather than silently ignored.
        """
        return self.metrics_get is not None

    @property
    def metrics_recipe(self) -> bool:
        """Whether the replacement is ``tornado.web.authenticated`` (Tornado's own or our
        stand-in) around the original: Flower's documented recipe, word for word."""
        from stamen.compat.flower.views.monitor import Metrics

        new = self.metrics_get
        module = getattr(new, "__globals__", {}).get("__name__")
        return (
            getattr(new, "__wrapped__", None) is Metrics.get
            and getattr(new, "__name__", None) == "get"
            and module in ("tornado.web", TORNADO_SHIM_PACKAGE + ".web")
        )


def run_guarded(run: Callable[[], None]) -> HandlerPatches:
    """Call ``run`` (which executes a configuration file), report what it replaced on the
    stand-in handlers and put the originals back, even when ``run`` raises."""
    from stamen.compat.flower.views.monitor import Healthcheck, Metrics

    original_metrics = Metrics.__dict__["get"]
    original_health = Healthcheck.__dict__["get"]
    try:
        run()
        metrics_get = Metrics.__dict__.get("get")
        health_get = Healthcheck.__dict__.get("get")
        return HandlerPatches(
            metrics_get=None if metrics_get is original_metrics else _or_deleted(metrics_get),
            healthcheck_get=None if health_get is original_health else _or_deleted(health_get),
        )
    finally:
        Metrics.get = original_metrics  # type: ignore[method-assign]
        Healthcheck.get = original_health  # type: ignore[method-assign]


def _deleted(*args: Any, **kwargs: Any) -> None:
    """Stands for a ``get`` the configuration file deleted."""


def _or_deleted(value: Any) -> Callable[..., Any]:
    return value if value is not None else _deleted
