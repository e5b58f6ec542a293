"""Reading each option source on its own: the command line, ``FLOWER_<NAME>`` variables,
the variables Flower reads outside its options, and the ``flowerconfig.py`` / ``--conf`` file.

Each reader returns ``{option: (label, value)}`` so a later error can name where a value came
from; ``stamen.config.load`` decides which source wins.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stamen.compat import HandlerPatches, config_builtins, run_guarded
from stamen.config.errors import ConfigError, invalid_value
from stamen.config.options import OPTIONS_BY_NAME
from stamen.config.parse import convert_python, convert_text, is_bool_word, strtobool, text_refusal

_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)


@dataclass
class CommandLine:
    """The options part of a command line, tokenized but not yet converted.

    ``values`` maps option name to ``(label, text)`` where ``text`` is ``None`` for a bare
    boolean flag; ``positionals`` keeps each word's index in ``argv``.
    """

    values: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    positionals: list[tuple[int, str]] = field(default_factory=list)


def _option_name(token: str) -> str:
    return token.lstrip("-").partition("=")[0].replace("-", "_")


def _looks_like_option(token: str) -> bool:
    return token.startswith("-") and len(token) > 1 and not _NUMBER_RE.fullmatch(token)


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Split ``argv`` into options, unknown options and positional words.

    Accepts ``--name=value``, ``--name value``, one or two dashes, and ``-``/``_`` alike in
    names. A bare boolean flag means true and takes the next word only if it is a boolean word
    (``--debug false``). The last occurrence of an option wins. Raises ``ConfigError`` for a
    value-taking option without a value.
    """
    result = CommandLine()
    index = 0
    only_positionals = False
    while index < len(argv):
        token = argv[index]
        if only_positionals or not _looks_like_option(token):
            result.positionals.append((index, token))
        elif token == "--":
            only_positionals = True
        else:
            label, has_value, text = token.partition("=")
            name = _option_name(token)
            opt = OPTIONS_BY_NAME.get(name)
            if opt is None:
                result.unknown.append(label)
            elif not opt.cli:
                raise invalid_value(label, text_refusal(opt))
            elif has_value:
                result.values[name] = (label, text)
            elif opt.type == "bool":
                following = argv[index + 1] if index + 1 < len(argv) else None
                if following is not None and is_bool_word(following):
                    result.values[name] = (label, following)
                    index += 1
                else:
                    result.values[name] = (label, None)
            else:
                following = argv[index + 1] if index + 1 < len(argv) else None
                if following is None or _looks_like_option(following):
                    raise ConfigError(f"option {label} requires a value ({label}=VALUE)")
                result.values[name] = (label, following)
                index += 1
        index += 1
    return result


#: ``FLOWER_*`` variables Flower reads directly rather than as options (``read_env_extras``).
ENV_EXTRAS = frozenset(
    {
        "FLOWER_UNAUTHENTICATED_API",
        "FLOWER_GITHUB_OAUTH_DOMAIN",
        "FLOWER_GITLAB_OAUTH_DOMAIN",
        "FLOWER_GITLAB_AUTH_ALLOWED_GROUPS",
        "FLOWER_GITLAB_MIN_ACCESS_LEVEL",
        "FLOWER_OAUTH2_OKTA_BASE_URL",
    }
)


def _near_option(name: str) -> str | None:
    """The option ``name`` looks like a misspelling of, if any (close enough that a
    variable of the user's own is unlikely to match)."""
    near = difflib.get_close_matches(name, OPTIONS_BY_NAME, n=1, cutoff=0.85)
    return near[0] if near else None


def read_environ(
    environ: Mapping[str, str], warn: Callable[[str], None] = lambda message: None
) -> dict[str, tuple[str, Any]]:
    """The options set by ``FLOWER_<NAME>`` variables; a ``FLOWER_`` variable that names no
    option but looks like a misspelt one is worth a warning, as in a config file."""
    found: dict[str, tuple[str, Any]] = {}
    for key, text in environ.items():
        if not key.startswith("FLOWER_"):
            continue
        opt = OPTIONS_BY_NAME.get(key[len("FLOWER_") :].lower())
        if opt is None:
            near = None if key in ENV_EXTRAS else _near_option(key[len("FLOWER_") :].lower())
            if near:
                warn(f"{key} is not an option; did you mean FLOWER_{near.upper()}?")
            continue
        try:
            found[opt.name] = (key, convert_text(opt, text))
        except ValueError as exc:
            raise invalid_value(key, str(exc)) from None
    return found


def read_env_extras(environ: Mapping[str, str]) -> dict[str, Any]:
    """The variables Flower reads directly rather than as options."""
    extras: dict[str, Any] = {}
    text = environ.get("FLOWER_UNAUTHENTICATED_API", "")
    try:
        extras["unauthenticated_api"] = strtobool(text) if text.strip() else False
    except ValueError as exc:
        raise invalid_value("FLOWER_UNAUTHENTICATED_API", str(exc)) from None
    extras["github_oauth_domain"] = environ.get("FLOWER_GITHUB_OAUTH_DOMAIN") or "github.com"
    extras["gitlab_oauth_domain"] = environ.get("FLOWER_GITLAB_OAUTH_DOMAIN") or "gitlab.com"
    groups = environ.get("FLOWER_GITLAB_AUTH_ALLOWED_GROUPS", "")
    extras["gitlab_auth_allowed_groups"] = [g.strip() for g in groups.split(",") if g.strip()]
    level = environ.get("FLOWER_GITLAB_MIN_ACCESS_LEVEL", "").strip()
    try:
        extras["gitlab_min_access_level"] = int(level) if level else 20
    except ValueError:
        raise invalid_value(
            "FLOWER_GITLAB_MIN_ACCESS_LEVEL", f"{level!r} is not an integer"
        ) from None
    extras["okta_base_url"] = environ.get("FLOWER_OAUTH2_OKTA_BASE_URL") or None
    return extras


def run_config_file(path: Path) -> tuple[dict[str, Any], HandlerPatches]:
    """Execute the config file at ``path``: its namespace (without ``__builtins__``) and what
    it replaced on the stand-in handlers (``Metrics.get``, see ``stamen.compat``).

    Raises ``ConfigError`` naming the file and line for an error in it.
    """
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    namespace: dict[str, Any] = {
        "__builtins__": config_builtins(),
        "__file__": str(path),
        "__name__": "flowerconfig",
    }
    try:
        code = compile(source, str(path), "exec")
        patches = run_guarded(lambda: exec(code, namespace))
    except SyntaxError as exc:
        raise ConfigError(f"error in config file {path}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:
        line = next(
            (
                frame.tb_lineno
                for frame in _walk_tb(exc.__traceback__)
                if frame.tb_frame.f_code.co_filename == str(path)
            ),
            None,
        )
        where = f", line {line}" if line else ""
        raise ConfigError(
            f"error in config file {path}{where}: {type(exc).__name__}: {exc}"
        ) from None
    namespace.pop("__builtins__", None)
    return namespace, patches


def _walk_tb(tb: types.TracebackType | None) -> list[types.TracebackType]:
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return list(reversed(frames))


def read_config_namespace(
    namespace: Mapping[str, Any],
    path: Path,
    warn: Callable[[str], None] = lambda message: None,
) -> dict[str, tuple[str, Any]]:
    """The options a config file sets. Other names are the file's own (helpers, imports)
    and are ignored, as Flower does; one that looks like a misspelt option is worth a
    warning (``max_task`` would otherwise silently keep the default)."""
    found: dict[str, tuple[str, Any]] = {}
    for key, value in namespace.items():
        if key.startswith("__") or isinstance(value, types.ModuleType):
            continue  # dunders and imports (``import logging``) are not settings
        opt = OPTIONS_BY_NAME.get(key.replace("-", "_"))
        if opt is None:
            near = None if callable(value) else _near_option(key)
            if near:
                warn(f"{key} in {path} is not an option; did you mean {near}?")
            continue
        label = f"{key} in {path}"
        try:
            found[opt.name] = (label, convert_python(opt, value))
        except ValueError as exc:
            raise invalid_value(label, str(exc)) from None
    return found
