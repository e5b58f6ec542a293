"""The option registry: every option's Flower name, type, default and help, in one place.

``--help``, the generated docs (``docs/options.md``, ``deploy/flowerconfig.py``) and every
source reader take their option list from ``OPTIONS``, so an option exists everywhere or
nowhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stamen.config.checks import (
    api_token_entries,
    basic_auth_entries,
    finite_seconds,
    log_level,
    log_rotate_mode,
    log_rotate_when,
    non_negative,
    port_number,
    positive,
    role_entries,
)

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
    _O("port", "int", 5555, "run on the given port", check=port_number),
    _O("address", "str", "", "run on the given address"),
    _O("unix_socket", "str", "", "path to unix socket to bind"),
    _O("debug", "bool", False, "run in debug mode"),
    _O("inspect_timeout", "float", 1000.0, "inspect timeout (in milliseconds)",
       check=non_negative),
    _O("auth", "str", "", "regexp of emails to grant access"),
    _O("basic_auth", "str", [], "enable http basic authentication", multiple=True,
       check=basic_auth_entries),
    _O("oauth2_key", "str", None, "OAuth2 key (requires --auth)", nullable=True),
    _O("oauth2_secret", "str", None, "OAuth2 secret (requires --auth)", nullable=True),
    _O("oauth2_redirect_uri", "str", None, "OAuth2 redirect uri (requires --auth)",
       nullable=True),
    _O("max_workers", "int", 5000, "maximum number of workers to keep",
       check=non_negative),
    _O("max_tasks", "int", 100000, "maximum number of tasks to keep in the history",
       check=non_negative),
    _O("db", "str", "flower",
       "history database: a SQLite file (<db>.sqlite3 unless it ends in .db, .sqlite or "
       ".sqlite3) or a postgresql:// URL"),
    _O("persistent", "bool", False,
       "keep the history in --db across restarts (else a temporary file)"),
    _O("state_save_interval", "int", 0,
       "accepted from Flower configs; Stamen commits every --commit_interval instead",
       check=non_negative),
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
       nullable=True, check=non_negative),
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
       group="logging", check=log_level),
    _O("log_to_stderr", "bool", None,
       "log to stderr; by default only when no --log_file_prefix is given",
       nullable=True, group="logging", default_text="auto"),
    _O("log_file_prefix", "str", None,
       "write the log to this file (rotated by size or time: --log_rotate_mode)",
       nullable=True, group="logging"),
    _O("log_file_max_size", "int", 100_000_000,
       "rotate the log file at this many bytes (--log_rotate_mode=size)",
       group="logging", check=non_negative),
    _O("log_file_num_backups", "int", 10, "number of rotated log files to keep",
       group="logging", check=non_negative),
    _O("log_rotate_mode", "str", "size", "rotate the log file by size or by time",
       group="logging", check=log_rotate_mode),
    _O("log_rotate_when", "str", "midnight",
       "with --log_rotate_mode=time, the unit of --log_rotate_interval: S, M, H, D, "
       "midnight or W0-W6 (a weekday, Monday first)",
       group="logging", check=log_rotate_when),
    _O("log_rotate_interval", "int", 1,
       "with --log_rotate_mode=time, rotate every this many --log_rotate_when units",
       group="logging", check=positive),
    # Stamen's own
    _O("max_task_age", "duration", None,
       "forget tasks older than this: seconds, or a duration such as 30m, 12h, 7d",
       nullable=True, group="stamen", check=positive,
       default_text="no age limit, only --max_tasks"),
    _O("event_queue_ttl", "float", None,
       "seconds an event may wait in Stamen's RabbitMQ event queue before the broker drops "
       "it; longer than Celery's loses fewer events when Stamen falls behind",
       nullable=True, group="stamen", check=positive,
       default_text="Celery's event_queue_ttl, 5 s"),
    _O("event_queue_max_length", "int", None,
       "bound on Stamen's RabbitMQ event queue, in messages (the oldest are dropped "
       "beyond it)", nullable=True, group="stamen", check=positive,
       default_text="unbounded"),
    _O("commit_interval", "float", 1.0,
       "seconds between commits of ingested events; a crash loses at most this much",
       group="stamen", check=positive),
    _O("max_pending_events", "int", 100_000,
       "events received but not yet stored beyond which receiving waits for storing to "
       "catch up (bounds memory; meanwhile events wait in the broker, see "
       "docs/performance.md); 0 for no bound", group="stamen", check=non_negative),
    _O("event_fast_path", "bool", True,
       "on Redis, read events straight from pub/sub (same events as kombu's path, "
       "several times cheaper)", group="stamen"),
    _O("db_pool_size", "int", 10,
       "PostgreSQL connections this instance's pages and API share (the ingest writer and "
       "its election lock hold two more); keep instances x (this + 2) under the server's "
       "max_connections", group="stamen", check=positive),
    _O("backfill_interval", "float", 60.0,
       "seconds between lookups in the result backend of tasks not heard finishing (their "
       "events were missed), also done at start; 0 disables", group="stamen",
       check=finite_seconds),
    _O("celery_exporter_metrics", "bool", False,
       "also export celery-exporter's metric family (celery_task_sent_total, "
       "celery_worker_up, ...) on /metrics", group="stamen"),
    # Stamen's access control (stamen.web.roles, stamen.web.gate, stamen.web.auth)
    _O("admins", "str", [],
       "who gets the admin role (everything, worker shutdown included): basic-auth users, "
       "emails or --auth-style patterns, group:<OIDC group>; with no role list set every "
       "authenticated user is admin, as in Flower", multiple=True, group="stamen",
       check=role_entries),
    _O("operators", "str", [],
       "who gets the operator role (task actions, queue pause/purge, worker pool and "
       "consumers); same entries as --admins", multiple=True, group="stamen",
       check=role_entries),
    _O("viewers", "str", [],
       "who gets the viewer role (sees everything, changes nothing); once a role list is "
       "set, authenticated users on no list are viewers", multiple=True, group="stamen",
       check=role_entries),
    _O("api_tokens", "str", [],
       "bearer tokens for API clients, name:token[:role]; token may be sha256:<hex digest>",
       multiple=True, group="stamen", check=api_token_entries),
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
