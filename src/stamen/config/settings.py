"""``Settings``: everything Stamen is configured with, resolved once and then read-only."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from stamen.config.options import DEFAULT_BUCKETS, DEFAULT_CONF, DEFAULT_TASKS_COLUMNS, OPTIONS


def random_cookie_secret() -> str:
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
    cookie_secret: str = field(default_factory=random_cookie_secret, repr=False)
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
    log_rotate_mode: str = "size"
    log_rotate_when: str = "midnight"
    log_rotate_interval: int = 1
    max_task_age: float | None = None  # seconds
    event_queue_ttl: float | None = None  # seconds
    event_queue_max_length: int | None = None
    commit_interval: float = 1.0  # seconds
    max_pending_events: int = 100_000
    event_fast_path: bool = True
    db_pool_size: int = 10
    backfill_interval: float = 60.0  # seconds, 0 disables
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
    # The config file replaced flower.views.monitor.Metrics.get, as Flower's docs do with
    # ``tornado.web.authenticated``: /metrics requires the pages' authentication.
    protect_metrics: bool = False
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


def settings_fields() -> list[str]:
    """Names of all ``Settings`` attributes (used by tests and docs to stay in sync)."""
    return [f.name for f in fields(Settings)]
