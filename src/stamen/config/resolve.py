"""Checks and normalisation that need the merged values of every source: option pairs,
paths made absolute, Flower's spellings mapped to Stamen's, the random cookie secret."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stamen.config.checks import validate_auth_pattern, validate_broker_api
from stamen.config.errors import ConfigError, invalid_value
from stamen.config.options import DEFAULT_TASKS_COLUMNS, OPTIONS, TASK_COLUMNS
from stamen.config.settings import random_cookie_secret

#: Flower's built-in login handlers and the Stamen provider each one stands for.
_AUTH_PROVIDERS = {
    "GoogleAuth2LoginHandler": "google",
    "GithubLoginHandler": "github",
    "GitLabLoginHandler": "gitlab",
    "OktaLoginHandler": "okta",
}
_AUTH_MODULES = ("flower.views.auth", "stamen.compat.flower.views.auth")


def resolve_auth_provider(name: str) -> str:
    """Map Flower's login handler names to Stamen's provider ids; keep any other name.

    ``flower.views.auth.GithubLoginHandler`` (or ``...auth:GithubLoginHandler``) -> ``github``;
    likewise ``google``, ``gitlab``, ``okta``, which may also be given directly.
    """
    text = name.strip()
    if text.lower() in _AUTH_PROVIDERS.values():
        return text.lower()
    module, _, cls = text.replace(":", ".").rpartition(".")
    if module in _AUTH_MODULES and cls in _AUTH_PROVIDERS:
        return _AUTH_PROVIDERS[cls]
    return text


def _tasks_columns(columns: list[str], warn: Callable[[str], None]) -> list[str]:
    chosen: list[str] = []
    dropped: list[str] = []
    for slug in (c.strip() for c in columns):
        if slug == "all":  # Flower 2.1 spelling for every column
            chosen.extend(c for c in TASK_COLUMNS if c not in chosen)
        elif slug in TASK_COLUMNS:
            if slug not in chosen:
                chosen.append(slug)
        else:
            dropped.append(slug)
    if dropped:
        warn(f"ignoring unknown tasks_columns: {', '.join(dropped)}")
    return chosen or list(DEFAULT_TASKS_COLUMNS)


def _buckets(values: list[float], label: str) -> list[float]:
    if not values:
        raise invalid_value(label, "needs at least one bucket")
    if any(b >= a for a, b in zip(values[1:], values, strict=False)):
        raise invalid_value(label, "buckets must be in increasing order")
    return values if math.isinf(values[-1]) else [*values, math.inf]


def absolute_path(path: str, cwd: Path) -> str:
    return str((cwd / Path(path).expanduser()).resolve())


def resolve_values(
    values: dict[str, Any], labels: dict[str, str], cwd: Path, warn: Callable[[str], None]
) -> None:
    """Cross-option checks and normalisation, in place, with Flower's messages where it has
    them (exit 1 in Flower, ``ConfigError`` here)."""
    validate_auth_pattern(values["auth"])
    if values["broker_api"]:
        validate_broker_api(values["broker_api"])
    if bool(values["certfile"]) != bool(values["keyfile"]):
        raise ConfigError("Both 'certfile' and 'keyfile' are required to enable SSL")
    for name in ("ca_certs", "certfile", "keyfile"):
        if values[name]:
            values[name] = absolute_path(values[name], cwd)
            if not Path(values[name]).is_file():
                raise invalid_value(labels[name], f"no such file: {values[name]}")
    values["url_prefix"] = (values["url_prefix"] or "").strip("/")
    values["tasks_columns"] = _tasks_columns(values["tasks_columns"], warn)
    values["task_runtime_metric_buckets"] = _buckets(
        [float(b) for b in values["task_runtime_metric_buckets"]],
        labels["task_runtime_metric_buckets"],
    )
    if values["auth_provider"]:
        values["auth_provider"] = resolve_auth_provider(values["auth_provider"])
    if not values["cookie_secret"]:
        values["cookie_secret"] = random_cookie_secret()
    for opt in OPTIONS:
        if opt.type == "float" and not opt.multiple and values[opt.name] is not None:
            values[opt.name] = float(values[opt.name])
