"""Checks of single option values, run as each value is read so a bad value is reported
against the source it came from (``--port``, ``FLOWER_PORT`` or the config file line).

Each check takes the converted value and returns it (possibly tidied) or raises
``ValueError``; ``validate_auth_pattern`` and ``validate_broker_api`` raise ``ConfigError``
with Flower's own wording because Flower users know those messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from urllib.parse import urlsplit

from stamen.config.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "none")


def port_number(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port number (0-65535)")
    return value


def non_negative(value: float) -> float:
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def finite_seconds(value: float) -> float:
    """An interval a thread waits for: NaN or infinity would stop it for ever."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number of seconds, 0 or more, got {value}")
    return value


def positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def one_of(*choices: str) -> Callable[[str], str]:
    """A check that takes one of ``choices``, in any case and with spaces around."""

    def check(value: str) -> str:
        chosen = value.strip().lower()
        if chosen not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return chosen

    return check


log_level = one_of(*LOG_LEVELS)
log_rotate_mode = one_of("size", "time")
#: What ``logging.handlers.TimedRotatingFileHandler`` accepts as ``when`` (Tornado's list).
log_rotate_when = one_of("s", "m", "h", "d", "midnight", *(f"w{day}" for day in range(7)))


def basic_auth_entries(entries: list[str]) -> list[str]:
    # An argon2 hash holds commas (``m=65536,t=3,p=4``), which the comma split cut apart:
    # glue a piece without a colon back onto an argon2 entry before it.
    joined: list[str] = []
    for entry in entries:
        if joined and ":" not in entry and "$argon2" in joined[-1]:
            joined[-1] += "," + entry
        else:
            joined.append(entry)
    entries = joined
    for entry in entries:
        user, colon, _ = entry.partition(":")
        if not colon or not user:
            # Never echo the entry: it may be a password typed without its user.
            raise ValueError("each entry must be of the form user:password")
    return entries


def role_entries(entries: list[str]) -> list[str]:
    """Role lists: user names, ``--auth``-style email patterns or ``group:<name>``."""
    cleaned = [e.strip() for e in entries if e.strip()]
    for entry in cleaned:
        if not entry.startswith("group:"):
            try:
                validate_auth_pattern(entry)
            except ConfigError:
                raise ValueError(f"invalid pattern {entry!r}") from None
    return cleaned


def api_token_entries(entries: list[str]) -> list[str]:
    from stamen.web.gate import parse_api_tokens

    parse_api_tokens(tuple(entries))
    return entries


def validate_auth_pattern(pattern: str) -> None:
    """Flower's ``--auth`` rules: at most one ``*``; not both ``*`` and ``|``; no ``*`` in
    the domain (after the last ``@``). Raises ``ConfigError`` with Flower's message."""
    star = pattern.find("*")
    if star >= 0 and (pattern.count("*") > 1 or "|" in pattern or star > pattern.rfind("@")):
        raise ConfigError(f"Invalid '--auth' option: {pattern}")


def validate_broker_api(url: str) -> None:
    """The RabbitMQ management URL needs an http(s) scheme and a host. The message never
    repeats the URL, which usually holds a password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise ConfigError(f"Invalid '--broker-api' option: {exc}") from None
    if parts.scheme not in ("http", "https"):
        shown = f"'{parts.scheme}'" if parts.scheme else "none"
        raise ConfigError(
            f"Invalid '--broker-api' option: scheme must be http or https, got {shown}"
        )
    if not host:
        raise ConfigError("Invalid '--broker-api' option: the URL has no host")
