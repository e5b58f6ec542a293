"""The one exception configuration problems raise, shared by every part of the package so
``cli`` and ``celery_command`` catch a single type and print its one-line message."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration value cannot be used. ``str(exc)`` is one line that names the option."""


def invalid_value(label: str, reason: str) -> ConfigError:
    return ConfigError(f"invalid value for {label}: {reason}")
