"""Value conversion: option text (command line, environment) and config-file objects to
typed values, with one-line reasons when they do not fit.

Booleans must be real boolean words everywhere: Tornado, under Flower, took ``--debug=no``
as true.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stamen.config.options import Option


_TRUE_WORDS = frozenset({"y", "yes", "t", "true", "on", "1"})
_FALSE_WORDS = frozenset({"n", "no", "f", "false", "off", "0"})
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def strtobool(text: str) -> bool:
    """``y yes t true on 1`` / ``n no f false off 0`` (any case); anything else is an error."""
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, yes/no, on/off or 1/0)")


def is_bool_word(text: str) -> bool:
    return text.strip().lower() in _TRUE_WORDS | _FALSE_WORDS


def parse_duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` or ``1h30m``."""
    word = text.strip().lower()
    try:
        seconds = float(word)
    except ValueError:
        if not _DURATION_RE.fullmatch(word):
            raise ValueError(
                f"{text!r} is not a duration (seconds, or e.g. 30m, 12h, 7d)"
            ) from None
        seconds = sum(
            float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART_RE.findall(word)
        )
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a finite duration")
    return seconds


def _float(text: str, *, allow_inf: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _scalar_from_text(opt: Option, text: str) -> Any:
    if opt.type == "str":
        return text
    if opt.type == "int":
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if opt.type == "float":
        return _float(text, allow_inf=opt.multiple)
    if opt.type == "bool":
        return strtobool(text)
    if opt.type == "duration":
        return parse_duration(text)
    raise ValueError("can only be set in the config file (as a function)")


def _scalar_from_python(opt: Option, value: Any) -> Any:
    if isinstance(value, str):
        return _scalar_from_text(opt, value)
    kind = type(value).__name__
    if opt.type == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if opt.type == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _float(str(value), allow_inf=opt.multiple)
    if opt.type == "bool" and (isinstance(value, bool) or value in (0, 1)):
        return bool(value)
    if opt.type == "duration":
        if isinstance(value, timedelta):
            return value.total_seconds()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if opt.type == "callable" and callable(value):
        return value
    expected = {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "bool": "a boolean",
        "duration": "a number of seconds or a duration string",
        "callable": "a function",
    }[opt.type]
    raise ValueError(f"expected {expected}, got {kind} {value!r}")


def _finish(opt: Option, value: Any) -> Any:
    if value is not None and opt.check is not None:
        value = opt.check(value)
    return value


def convert_text(opt: Option, text: str) -> Any:
    """An option's value from command-line / environment text. Raises ``ValueError``."""
    if opt.type == "callable":
        return _scalar_from_text(opt, text)
    if opt.multiple:
        parts = [part for part in text.split(",") if part.strip()]
        if opt.type != "str":
            parts = [part.strip() for part in parts]
        return _finish(opt, [_scalar_from_text(opt, part) for part in parts])
    if opt.nullable and not text.strip():
        return None
    return _finish(opt, _scalar_from_text(opt, text))


def convert_python(opt: Option, value: Any) -> Any:
    """An option's value from a config-file object: text is parsed, other values type-checked."""
    if isinstance(value, str):
        return convert_text(opt, value)
    if value is None:
        if opt.nullable:
            return None
        if opt.multiple:
            return []
        if opt.type == "str":
            return ""
        raise ValueError(f"cannot be None (default {opt.show_default()})")
    if opt.multiple:
        if not isinstance(value, (list, tuple, set, frozenset)):
            value = [value]
        return _finish(opt, [_scalar_from_python(opt, item) for item in value])
    return _finish(opt, _scalar_from_python(opt, value))


def text_refusal(opt: Option) -> str:
    try:
        _scalar_from_text(opt, "")
    except ValueError as exc:
        return str(exc)
    return "not accepted here"  # pragma: no cover - only callables are refused
