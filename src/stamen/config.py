"""Options and configuration: the single registry, the frozen ``Settings``, and ``load_settings``.

This sits at the edge of the pipeline: ``cli`` and ``celery_command`` call ``load_settings``
once and hand the resulting ``Settings`` to whatever they run; nothing else reads the
environment, the config file or the command line.

Sources follow Flower 2.2 (defaults < ``FLOWER_<NAME>`` environment < ``flowerconfig.py`` /
``--conf`` < command line), with deliberate supersets: ``--name value`` works as well as
``--name=value``, unknown options are reported instead of silently dropped, and a boolean must
be a real boolean word everywhere (Tornado took ``--debug=no`` as true).
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stamen.compat import config_builtins

log = logging.getLogger(__name__)

DEFAULT_CONF = "flowerconfig.py"

#: Task-table columns Flower 2.2 knows, in its order (spec 10.4).
TASK_COLUMNS: tuple[str, ...] = (
    "name", "uuid", "state", "args", "kwargs", "result", "received", "started", "runtime",
    "worker", "exchange", "routing_key", "retries", "revoked", "exception", "expires", "eta",
)  # fmt: skip
DEFAULT_TASKS_COLUMNS: tuple[str, ...] = ("name", "uuid", "state", "received", "runtime", "worker")
#: Prometheus' default histogram buckets, as Flower uses them.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf,
)  # fmt: skip
LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "none")

_TRUE_WORDS = frozenset({"y", "yes", "t", "true", "on", "1"})
_FALSE_WORDS = frozenset({"n", "no", "f", "false", "off", "0"})
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)

#: Flower's built-in login handlers and the Stamen provider each one stands for.
_AUTH_PROVIDERS = {
    "GoogleAuth2LoginHandler": "google",
    "GithubLoginHandler": "github",
    "GitLabLoginHandler": "gitlab",
    "OktaLoginHandler": "okta",
}
_AUTH_MODULES = ("flower.views.auth", "stamen.compat.flower.views.auth")

SOURCE_DEFAULT, SOURCE_ENV, SOURCE_FILE, SOURCE_CLI = "default", "env", "file", "cli"


class ConfigError(Exception):
    """A configuration value cannot be used. ``str(exc)`` is one line that names the option."""


# --- the registry -----------------------------------------------------------------------


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port number (0-65535)")
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _basic_auth(entries: list[str]) -> list[str]:
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


def _role_entries(entries: list[str]) -> list[str]:
    """Role lists: user names, ``--auth``-style email patterns or ``group:<name>``."""
    cleaned = [e.strip() for e in entries if e.strip()]
    for entry in cleaned:
        if not entry.startswith("group:"):
            try:
                validate_auth_pattern(entry)
            except ConfigError:
                raise ValueError(f"invalid pattern {entry!r}") from None
    return cleaned


def _api_tokens(entries: list[str]) -> list[str]:
    from stamen.web.gate import parse_api_tokens

    parse_api_tokens(tuple(entries))
    return entries


@dataclass(frozen=True)
class Option:
    """One option: its Flower name, value type, default and help text.

    ``type`` is one of ``int``, ``float``, ``str``, ``bool``, ``duration`` (seconds, or text
    like ``30m``) or ``callable``; ``multiple`` options take comma-separated lists.
    ``nullable`` options may be unset (``None``); an empty value unsets them.
    """

    name: str
    type: str
    default: Any
    help: str
    multiple: bool = False
    nullable: bool = False
    group: str = "flower"
    check: Callable[[Any], Any] | None = None
    cli: bool = True
    default_text: str | None = None

    @property
    def env_name(self) -> str:
        return "FLOWER_" + self.name.upper()

    @property
    def type_text(self) -> str:
        return f"list of {self.type}" if self.multiple else self.type

    @property
    def metavar(self) -> str:
        """How ``--help`` shows the value: ``INT``, ``FLOAT,...``."""
        return self.type.upper() + (",..." if self.multiple else "")

    def show_default(self) -> str:
        """The default as ``--help`` and the docs show it."""
        if self.default_text is not None:
            return self.default_text
        if self.default is None:
            return "none"
        if self.multiple:
            return ",".join(_show_scalar(v) for v in self.default) or "none"
        if self.default == "":
            return "''"
        return _show_scalar(self.default)


def _show_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_O = Option
OPTIONS: tuple[Option, ...] = (
    # Flower 2.2 (help texts are Flower's own, they are what users know)
    _O("port", "int", 5555, "run on the given port", check=_port),
    _O("address", "str", "", "run on the given address"),
    _O("unix_socket", "str", "", "path to unix socket to bind"),
    _O("debug", "bool", False, "run in debug mode"),
    _O("inspect_timeout", "float", 1000.0, "inspect timeout (in milliseconds)",
       check=_non_negative),
    _O("auth", "str", "", "regexp of emails to grant access"),
    _O("basic_auth", "str", [], "enable http basic authentication", multiple=True,
       check=_basic_auth),
    _O("oauth2_key", "str", None, "OAuth2 key (requires --auth)", nullable=True),
    _O("oauth2_secret", "str", None, "OAuth2 secret (requires --auth)", nullable=True),
    _O("oauth2_redirect_uri", "str", None, "OAuth2 redirect uri (requires --auth)",
       nullable=True),
    _O("max_workers", "int", 5000, "maximum number of workers to keep",
       check=_non_negative),
    _O("max_tasks", "int", 100000, "maximum number of tasks to keep in the history",
       check=_non_negative),
    _O("db", "str", "flower",
       "history database: a SQLite file (<db>.sqlite3 unless it ends in .db, .sqlite or "
       ".sqlite3) or a postgresql:// URL"),
    _O("persistent", "bool", False,
       "keep the history in --db across restarts (else a temporary file)"),
    _O("state_save_interval", "int", 0,
       "accepted from Flower configs; Stamen commits every --commit_interval instead",
       check=_non_negative),
    _O("broker_api", "str", None, "inspect broker e.g. http://guest:guest@localhost:15672/api/",
       nullable=True),
    _O("ca_certs", "str", None, "SSL certificate authority (CA) file", nullable=True),
    _O("certfile", "str", None, "SSL certificate file", nullable=True),
    _O("keyfile", "str", None, "SSL key file", nullable=True),
    _O("xheaders", "bool", False,
       "enable support for the 'X-Real-Ip' and 'X-Scheme' headers."),
    _O("auto_refresh", "bool", True, "refresh workers"),
    _O("purge_offline_workers", "int", None,
       "time (in seconds) after which offline workers are purged from workers",
       nullable=True, check=_non_negative),
    _O("cookie_secret", "str", None, "secure cookie secret", nullable=True,
       default_text="random, new for every start"),
    _O("conf", "str", DEFAULT_CONF, "configuration file"),
    _O("enable_events", "bool", True, "periodically enable Celery events"),
    _O("format_task", "callable", None, "use custom task formatter",
       nullable=True, cli=False),
    _O("natural_time", "bool", False, "show time in relative format"),
    _O("tasks_columns", "str", list(DEFAULT_TASKS_COLUMNS),
       "slugs of columns on /tasks/ page in display order, delimited by comma", multiple=True),
    _O("auth_provider", "str", None, "auth handler class", nullable=True),
    _O("url_prefix", "str", None, "base url prefix", nullable=True),
    _O("task_runtime_metric_buckets", "float", list(DEFAULT_BUCKETS),
       "histogram latency bucket value", multiple=True),
    _O("read_only", "bool", False, "enable read only mode, disabling all operations"),
    # Tornado's logging options, which Flower users set too
    _O("logging", "str", "info",
       "log level: debug, info, warning, error or none (none leaves logging alone)",
       group="logging", check=_log_level),
    _O("log_to_stderr", "bool", None,
       "log to stderr; by default only when no --log_file_prefix is given",
       nullable=True, group="logging", default_text="auto"),
    _O("log_file_prefix", "str", None, "write the log to this file (rotated by size)",
       nullable=True, group="logging"),
    _O("log_file_max_size", "int", 100_000_000, "rotate the log file at this many bytes",
       group="logging", check=_non_negative),
    _O("log_file_num_backups", "int", 10, "number of rotated log files to keep",
       group="logging", check=_non_negative),
    # Stamen's own
    _O("max_task_age", "duration", None,
       "forget tasks older than this: seconds, or a duration such as 30m, 12h, 7d",
       nullable=True, group="stamen", check=_positive,
       default_text="no age limit, only --max_tasks"),
    _O("event_queue_ttl", "float", None,
       "seconds an event may wait in Stamen's RabbitMQ event queue before the broker drops "
       "it; longer than Celery's loses fewer events when Stamen falls behind",
       nullable=True, group="stamen", check=_positive,
       default_text="Celery's event_queue_ttl, 5 s"),
    _O("event_queue_max_length", "int", None,
       "bound on Stamen's RabbitMQ event queue, in messages (the oldest are dropped "
       "beyond it)", nullable=True, group="stamen", check=_positive,
       default_text="unbounded"),
    _O("commit_interval", "float", 1.0,
       "seconds between commits of ingested events; a crash loses at most this much",
       group="stamen", check=_positive),
    _O("event_fast_path", "bool", True,
       "on Redis, read events straight from pub/sub (same events as kombu's path, "
       "several times cheaper)", group="stamen"),
    _O("celery_exporter_metrics", "bool", False,
       "also export celery-exporter's metric family (celery_task_sent_total, "
       "celery_worker_up, ...) on /metrics", group="stamen"),
    # Stamen's access control (stamen.web.roles, stamen.web.gate, stamen.web.auth)
    _O("admins", "str", [],
       "who gets the admin role (everything, worker shutdown included): basic-auth users, "
       "emails or --auth-style patterns, group:<OIDC group>; with no role list set every "
       "authenticated user is admin, as in Flower", multiple=True, group="stamen",
       check=_role_entries),
    _O("operators", "str", [],
       "who gets the operator role (task actions, queue pause/purge, worker pool and "
       "consumers); same entries as --admins", multiple=True, group="stamen",
       check=_role_entries),
    _O("viewers", "str", [],
       "who gets the viewer role (sees everything, changes nothing); once a role list is "
       "set, authenticated users on no list are viewers", multiple=True, group="stamen",
       check=_role_entries),
    _O("api_tokens", "str", [],
       "bearer tokens for API clients, name:token[:role]; token may be sha256:<hex digest>",
       multiple=True, group="stamen", check=_api_tokens),
    _O("oauth2_issuer", "str", None,
       "OpenID Connect issuer URL (or its /.well-known/openid-configuration URL) for "
       "--auth_provider=oidc", nullable=True, group="stamen"),
)  # fmt: skip
OPTIONS_BY_NAME: dict[str, Option] = {opt.name: opt for opt in OPTIONS}

OPTION_GROUPS = {
    "flower": "Flower options",
    "logging": "Logging options",
    "stamen": "Stamen options",
}


def options_reference() -> list[dict[str, Any]]:
    """Every option as plain data (for ``--help`` and generated docs), in registry order."""
    return [
        {
            "name": opt.name,
            "flag": "--" + opt.name,
            "type": opt.type_text,
            "default": opt.show_default(),
            "help": opt.help,
            "env": opt.env_name if opt.cli else None,
            "group": opt.group,
            "command_line": opt.cli,
        }
        for opt in OPTIONS
    ]


# --- Settings ----------------------------------------------------------------------------


def _random_cookie_secret() -> str:
    return secrets.token_urlsafe(64)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything Stamen is configured with, resolved once at startup and then read-only.

    One attribute per option in ``OPTIONS`` (same name), plus values Flower reads straight
    from the environment, plus where each value came from. ``Settings()`` gives the defaults,
    which makes it handy in tests (``dataclasses.replace(Settings(), port=0)``).
    """

    port: int = 5555
    address: str = ""
    unix_socket: str = ""
    debug: bool = False
    inspect_timeout: float = 1000.0  # milliseconds, as in Flower
    auth: str = ""
    basic_auth: list[str] = field(default_factory=list, repr=False)
    oauth2_key: str | None = None
    oauth2_secret: str | None = field(default=None, repr=False)
    oauth2_redirect_uri: str | None = None
    max_workers: int = 5000
    max_tasks: int = 100000
    db: str = "flower"
    persistent: bool = False
    state_save_interval: int = 0  # milliseconds
    broker_api: str | None = field(default=None, repr=False)
    ca_certs: str | None = None  # absolute paths once loaded
    certfile: str | None = None
    keyfile: str | None = None
    xheaders: bool = False
    auto_refresh: bool = True
    purge_offline_workers: int | None = None  # seconds
    cookie_secret: str = field(default_factory=_random_cookie_secret, repr=False)
    conf: str = DEFAULT_CONF
    enable_events: bool = True
    format_task: Callable[[Any], Any] | None = None
    natural_time: bool = False
    tasks_columns: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS_COLUMNS))
    auth_provider: str | None = None  # "google"/"github"/"gitlab"/"okta" or a custom dotted name
    url_prefix: str = ""  # without slashes: "" or "a/b"
    task_runtime_metric_buckets: list[float] = field(default_factory=lambda: list(DEFAULT_BUCKETS))
    read_only: bool = False
    logging: str = "info"
    log_to_stderr: bool | None = None
    log_file_prefix: str | None = None
    log_file_max_size: int = 100_000_000
    log_file_num_backups: int = 10
    max_task_age: float | None = None  # seconds
    event_queue_ttl: float | None = None  # seconds
    event_queue_max_length: int | None = None
    commit_interval: float = 1.0  # seconds
    event_fast_path: bool = True
    celery_exporter_metrics: bool = False
    admins: list[str] = field(default_factory=list)
    operators: list[str] = field(default_factory=list)
    viewers: list[str] = field(default_factory=list)
    api_tokens: list[str] = field(default_factory=list, repr=False)
    oauth2_issuer: str | None = None
    # Read from the environment only, as Flower does.
    unauthenticated_api: bool = False  # FLOWER_UNAUTHENTICATED_API
    github_oauth_domain: str = "github.com"  # FLOWER_GITHUB_OAUTH_DOMAIN
    gitlab_oauth_domain: str = "gitlab.com"  # FLOWER_GITLAB_OAUTH_DOMAIN
    gitlab_auth_allowed_groups: list[str] = field(default_factory=list)
    gitlab_min_access_level: int = 20  # FLOWER_GITLAB_MIN_ACCESS_LEVEL
    okta_base_url: str | None = None  # FLOWER_OAUTH2_OKTA_BASE_URL
    # Provenance.
    config_file: str | None = None  # absolute path of the config file executed, if any
    config_namespace: dict[str, Any] = field(default_factory=dict, repr=False)
    sources: dict[str, str] = field(default_factory=dict, repr=False)  # option -> source

    @property
    def ssl_enabled(self) -> bool:
        return bool(self.certfile and self.keyfile)

    def redacted(self) -> dict[str, Any]:
        """Option values safe to log or show: secrets and the password in URLs masked."""
        values = {opt.name: getattr(self, opt.name) for opt in OPTIONS}
        for name in ("cookie_secret", "oauth2_secret"):
            if values[name]:
                values[name] = "********"
        values["basic_auth"] = [e.partition(":")[0] + ":********" for e in self.basic_auth]
        values["api_tokens"] = [e.partition(":")[0] + ":********" for e in self.api_tokens]
        if self.broker_api:
            values["broker_api"] = mask_url_password(self.broker_api)
        if self.format_task is not None:
            values["format_task"] = getattr(self.format_task, "__name__", "<callable>")
        return values


def mask_url_password(url: str) -> str:
    """``http://user:secret@host/`` -> ``http://user:**@host/`` (Flower's masking)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:**@{netloc[2]}").geturl()


# --- value conversion --------------------------------------------------------------------


def strtobool(text: str) -> bool:
    """``y yes t true on 1`` / ``n no f false off 0`` (any case); anything else is an error."""
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, yes/no, on/off or 1/0)")


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


def _error(label: str, reason: str) -> ConfigError:
    return ConfigError(f"invalid value for {label}: {reason}")


# --- the command line --------------------------------------------------------------------


def is_bool_word(text: str) -> bool:
    return text.strip().lower() in _TRUE_WORDS | _FALSE_WORDS


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
                raise _error(label, _scalar_error(opt))
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


def _scalar_error(opt: Option) -> str:
    try:
        _scalar_from_text(opt, "")
    except ValueError as exc:
        return str(exc)
    return "not accepted here"  # pragma: no cover - only callables are refused


# --- sources ------------------------------------------------------------------------------


def _read_environ(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    found: dict[str, tuple[str, Any]] = {}
    for key, text in environ.items():
        if not key.startswith("FLOWER_"):
            continue
        opt = OPTIONS_BY_NAME.get(key[len("FLOWER_") :].lower())
        if opt is None:
            continue
        try:
            found[opt.name] = (key, convert_text(opt, text))
        except ValueError as exc:
            raise _error(key, str(exc)) from None
    return found


def _run_config_file(path: Path) -> dict[str, Any]:
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
        exec(compile(source, str(path), "exec"), namespace)
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
    return namespace


def _walk_tb(tb: types.TracebackType | None) -> list[types.TracebackType]:
    frames = []
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    return list(reversed(frames))


def _read_config_namespace(namespace: Mapping[str, Any], path: Path) -> dict[str, tuple[str, Any]]:
    found: dict[str, tuple[str, Any]] = {}
    for key, value in namespace.items():
        if key.startswith("__") or isinstance(value, types.ModuleType):
            continue  # dunders and imports (``import logging``) are not settings
        opt = OPTIONS_BY_NAME.get(key.replace("-", "_"))
        if opt is None:
            continue
        label = f"{key} in {path}"
        try:
            found[opt.name] = (label, convert_python(opt, value))
        except ValueError as exc:
            raise _error(label, str(exc)) from None
    return found


# --- validation of the merged values ------------------------------------------------------


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
        raise _error(label, "needs at least one bucket")
    if any(b >= a for a, b in zip(values[1:], values, strict=False)):
        raise _error(label, "buckets must be in increasing order")
    return values if math.isinf(values[-1]) else [*values, math.inf]


def _absolute(path: str, cwd: Path) -> str:
    return str((cwd / Path(path).expanduser()).resolve())


def _read_env_extras(environ: Mapping[str, str]) -> dict[str, Any]:
    """The variables Flower reads directly rather than as options."""
    extras: dict[str, Any] = {}
    text = environ.get("FLOWER_UNAUTHENTICATED_API", "")
    try:
        extras["unauthenticated_api"] = strtobool(text) if text.strip() else False
    except ValueError as exc:
        raise _error("FLOWER_UNAUTHENTICATED_API", str(exc)) from None
    extras["github_oauth_domain"] = environ.get("FLOWER_GITHUB_OAUTH_DOMAIN") or "github.com"
    extras["gitlab_oauth_domain"] = environ.get("FLOWER_GITLAB_OAUTH_DOMAIN") or "gitlab.com"
    groups = environ.get("FLOWER_GITLAB_AUTH_ALLOWED_GROUPS", "")
    extras["gitlab_auth_allowed_groups"] = [g.strip() for g in groups.split(",") if g.strip()]
    level = environ.get("FLOWER_GITLAB_MIN_ACCESS_LEVEL", "").strip()
    try:
        extras["gitlab_min_access_level"] = int(level) if level else 20
    except ValueError:
        raise _error("FLOWER_GITLAB_MIN_ACCESS_LEVEL", f"{level!r} is not an integer") from None
    extras["okta_base_url"] = environ.get("FLOWER_OAUTH2_OKTA_BASE_URL") or None
    return extras


# --- loading ------------------------------------------------------------------------------


def load_settings(
    argv: Sequence[str],
    environ: Mapping[str, str],
    cwd: str | Path,
    *,
    warn: Callable[[str], None] | None = None,
) -> Settings:
    """Resolve Flower's option sources into ``Settings``.

    ``argv`` holds only options (no program name, no Celery options). Precedence, lowest
    first: defaults, ``FLOWER_<NAME>`` variables, the config file (``--conf``, default
    ``flowerconfig.py`` in ``cwd``; a missing default file is fine, any other missing file is
    an error), the command line. Problems that do not stop startup (unknown options, ignored
    words, dropped columns) go to ``warn``, one line each; the default logs them.
    Raises ``ConfigError``.
    """
    warn = warn or log.warning
    cwd = Path(cwd)
    command_line = parse_command_line(argv)
    if command_line.unknown:
        warn(f"ignoring unknown options: {' '.join(command_line.unknown)}")
    if command_line.positionals:
        words = " ".join(word for _, word in command_line.positionals)
        warn(f"ignoring unexpected arguments: {words}")

    cli: dict[str, tuple[str, Any]] = {}
    for name, (label, text) in command_line.values.items():
        opt = OPTIONS_BY_NAME[name]
        try:
            cli[name] = (label, True if text is None else convert_text(opt, text))
        except ValueError as exc:
            raise _error(label, str(exc)) from None
    env = _read_environ(environ)

    conf_label, conf = cli.get("conf") or env.get("conf") or ("--conf", DEFAULT_CONF)
    conf_path = Path(_absolute(conf, cwd))
    namespace: dict[str, Any] = {}
    from_file: dict[str, tuple[str, Any]] = {}
    config_file: str | None = None
    if conf_path.exists() or conf != DEFAULT_CONF:
        if not conf_path.exists():
            raise _error(conf_label, f"config file not found: {conf_path}")
        namespace = _run_config_file(conf_path)
        config_file = str(conf_path)
        from_file = _read_config_namespace(namespace, conf_path)
        from_file.pop("conf", None)

    values: dict[str, Any] = {opt.name: opt.default for opt in OPTIONS}
    labels: dict[str, str] = {opt.name: "--" + opt.name for opt in OPTIONS}
    sources = dict.fromkeys(values, SOURCE_DEFAULT)
    for source, layer in ((SOURCE_ENV, env), (SOURCE_FILE, from_file), (SOURCE_CLI, cli)):
        for name, (label, value) in layer.items():
            values[name], labels[name], sources[name] = value, label, source
    values["conf"] = conf

    _validate(values, labels, cwd, warn)
    return Settings(
        **values,
        **_read_env_extras(environ),
        config_file=config_file,
        config_namespace=namespace,
        sources=sources,
    )


def _validate(
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
            values[name] = _absolute(values[name], cwd)
            if not Path(values[name]).is_file():
                raise _error(labels[name], f"no such file: {values[name]}")
    values["url_prefix"] = (values["url_prefix"] or "").strip("/")
    values["tasks_columns"] = _tasks_columns(values["tasks_columns"], warn)
    values["task_runtime_metric_buckets"] = _buckets(
        [float(b) for b in values["task_runtime_metric_buckets"]],
        labels["task_runtime_metric_buckets"],
    )
    if values["auth_provider"]:
        values["auth_provider"] = resolve_auth_provider(values["auth_provider"])
    if not values["cookie_secret"]:
        values["cookie_secret"] = _random_cookie_secret()
    for opt in OPTIONS:
        if opt.type == "float" and not opt.multiple and values[opt.name] is not None:
            values[opt.name] = float(values[opt.name])


def settings_fields() -> list[str]:
    """Names of all ``Settings`` attributes (used by tests and docs to stay in sync)."""
    return [f.name for f in fields(Settings)]
