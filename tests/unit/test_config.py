"""Option registry, ``load_settings`` (sources, precedence, conversion, validation), the
``flower`` shim for config files and its template helpers."""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from stamen.compat.flower.utils import template
from stamen.config import (
    DEFAULT_BUCKETS,
    DEFAULT_TASKS_COLUMNS,
    OPTIONS,
    OPTIONS_BY_NAME,
    TASK_COLUMNS,
    ConfigError,
    Settings,
    load_settings,
    mask_url_password,
    options_reference,
    parse_command_line,
    parse_duration,
    resolve_auth_provider,
    settings_fields,
    strtobool,
    validate_auth_pattern,
)


def load(
    tmp_path: Path,
    *argv: str,
    env: dict[str, str] | None = None,
    conf: str | None = None,
    warnings: list[str] | None = None,
) -> Settings:
    """``load_settings`` in ``tmp_path``; ``conf`` is written there as ``flowerconfig.py``."""
    if conf is not None:
        (tmp_path / "flowerconfig.py").write_text(textwrap.dedent(conf))
    sink = warnings if warnings is not None else []
    return load_settings(list(argv), env or {}, tmp_path, warn=sink.append)


def load_error(tmp_path: Path, *argv: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, *argv, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


# --- registry and defaults -----------------------------------------------------------------


FLOWER_OPTIONS = {
    "port", "address", "unix_socket", "debug", "inspect_timeout", "auth", "basic_auth",
    "oauth2_key", "oauth2_secret", "oauth2_redirect_uri", "max_workers", "max_tasks", "db",
    "persistent", "state_save_interval", "broker_api", "ca_certs", "certfile", "keyfile",
    "xheaders", "auto_refresh", "purge_offline_workers", "cookie_secret", "conf",
    "enable_events", "format_task", "natural_time", "tasks_columns", "auth_provider",
    "url_prefix", "task_runtime_metric_buckets", "read_only",
}  # fmt: skip


def test_registry_has_every_flower_option_and_logging_and_stamen_options() -> None:
    names = set(OPTIONS_BY_NAME)
    assert names >= FLOWER_OPTIONS
    assert names >= {"logging", "log_to_stderr", "log_file_prefix", "log_file_max_size"}
    assert names >= {"max_task_age", "event_queue_ttl", "event_queue_max_length"}
    assert "commit_interval" in names
    assert all(opt.help for opt in OPTIONS)


def test_every_option_is_a_settings_field_with_the_same_default() -> None:
    defaults = Settings()
    assert set(OPTIONS_BY_NAME) <= set(settings_fields())
    for opt in OPTIONS:
        if opt.name == "cookie_secret":
            continue
        assert getattr(defaults, opt.name) == (
            opt.default if opt.default is not None or opt.name != "url_prefix" else ""
        ), opt.name


def test_loaded_defaults(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert (s.port, s.address, s.debug, s.inspect_timeout) == (5555, "", False, 1000.0)
    assert (s.max_workers, s.max_tasks, s.db, s.persistent) == (5000, 100000, "flower", False)
    assert s.basic_auth == [] and s.auth == "" and s.auth_provider is None
    assert s.tasks_columns == list(DEFAULT_TASKS_COLUMNS)
    assert s.task_runtime_metric_buckets == list(DEFAULT_BUCKETS)
    assert s.task_runtime_metric_buckets[-1] == math.inf
    assert s.url_prefix == "" and s.purge_offline_workers is None
    assert s.auto_refresh and s.enable_events and not s.read_only
    assert s.logging == "info" and s.log_file_max_size == 100_000_000
    assert s.max_task_age is None and s.event_queue_ttl is None
    assert s.commit_interval == 1.0
    assert s.unauthenticated_api is False
    assert s.config_file is None and s.config_namespace == {}
    assert set(s.sources.values()) == {"default"}


def test_cookie_secret_is_random_per_load_unless_set(tmp_path: Path) -> None:
    assert len(load(tmp_path).cookie_secret) > 60
    assert load(tmp_path).cookie_secret != load(tmp_path).cookie_secret
    assert load(tmp_path, "--cookie_secret=s3cret").cookie_secret == "s3cret"


def test_options_reference_describes_every_option() -> None:
    reference = options_reference()
    assert [entry["name"] for entry in reference] == [opt.name for opt in OPTIONS]
    port = next(e for e in reference if e["name"] == "port")
    assert port == {
        "name": "port",
        "flag": "--port",
        "type": "int",
        "default": "5555",
        "help": "run on the given port",
        "env": "FLOWER_PORT",
        "group": "flower",
        "command_line": True,
    }
    format_task = next(e for e in reference if e["name"] == "format_task")
    assert format_task["command_line"] is False and format_task["env"] is None


def test_settings_is_frozen_and_repr_hides_secrets(tmp_path: Path) -> None:
    s = load(tmp_path, "--basic_auth=u:pw1", "--oauth2_secret=pw2", "--cookie_secret=pw3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    for secret in ("pw1", "pw2", "pw3"):
        assert secret not in repr(s)
        assert secret not in str(s.redacted())
    assert s.redacted()["basic_auth"] == ["u:********"]


# --- precedence ------------------------------------------------------------------------------


def test_precedence_cli_over_file_over_env_over_default(tmp_path: Path) -> None:
    env = {"FLOWER_PORT": "1001", "FLOWER_MAX_TASKS": "7", "FLOWER_DB": "envdb"}
    conf = "port = 1002\nmax_tasks = 8\n"
    s = load(tmp_path, "--port=1003", env=env, conf=conf)
    assert (s.port, s.max_tasks, s.db, s.max_workers) == (1003, 8, "envdb", 5000)
    assert s.sources["port"] == "cli"
    assert s.sources["max_tasks"] == "file"
    assert s.sources["db"] == "env"
    assert s.sources["max_workers"] == "default"


def test_conf_from_env_and_cli(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("port = 2001\n")
    (tmp_path / "b.py").write_text("port = 2002\n")
    assert load(tmp_path, env={"FLOWER_CONF": "a.py"}).port == 2001
    s = load(tmp_path, "--conf", "b.py", env={"FLOWER_CONF": "a.py"})
    assert s.port == 2002
    assert s.config_file == str(tmp_path / "b.py")
    assert s.conf == "b.py"


def test_missing_default_config_file_is_ignored(tmp_path: Path) -> None:
    assert load(tmp_path).config_file is None


def test_missing_non_default_config_file_is_an_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, "--conf=nope.py")
    assert message == f"invalid value for --conf: config file not found: {tmp_path / 'nope.py'}"
    # Even an absolute path that ends in the default name.
    other = tmp_path / "sub" / "flowerconfig.py"
    assert "config file not found" in load_error(tmp_path, f"--conf={other}")
    message = load_error(tmp_path, env={"FLOWER_CONF": "gone.py"})
    assert message.startswith("invalid value for FLOWER_CONF: config file not found")


# --- command-line syntax --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--port=6000"],
        ["--port", "6000"],
        ["-port=6000"],
        ["-port", "6000"],
        ["--port=1", "--port=6000"],
    ],
)
def test_value_forms(tmp_path: Path, argv: list[str]) -> None:
    assert load(tmp_path, *argv).port == 6000


def test_dashes_and_underscores_are_interchangeable(tmp_path: Path) -> None:
    assert load(tmp_path, "--max-tasks=3").max_tasks == 3
    assert load(tmp_path, "--max_tasks", "4").max_tasks == 4
    assert load(tmp_path, "--task-runtime-metric-buckets=1,2").task_runtime_metric_buckets == [
        1.0,
        2.0,
        math.inf,
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--debug"], True),
        (["--debug=true"], True),
        (["--debug=yes"], True),
        (["--debug=ON"], True),
        (["--debug=1"], True),
        (["--debug=false"], False),
        (["--debug=0"], False),
        (["--debug=f"], False),
        (["--debug=no"], False),  # Tornado took this as true; we do not
        (["--debug", "false"], False),
        (["--debug", "--port=1"], True),
        (["--debug=true", "--debug=off"], False),
    ],
)
def test_command_line_booleans(tmp_path: Path, argv: list[str], expected: bool) -> None:
    assert load(tmp_path, *argv).debug is expected


def test_unrecognised_boolean_is_an_error(tmp_path: Path) -> None:
    assert load_error(tmp_path, "--debug=maybe") == (
        "invalid value for --debug: 'maybe' is not a boolean "
        "(use true/false, yes/no, on/off or 1/0)"
    )


def test_bare_flag_does_not_swallow_a_following_word() -> None:
    parsed = parse_command_line(["--debug", "demo", "--port", "1"])
    assert parsed.values == {"debug": ("--debug", None), "port": ("--port", "1")}
    assert parsed.positionals == [(1, "demo")]


def test_option_without_value_is_an_error(tmp_path: Path) -> None:
    assert load_error(tmp_path, "--port") == "option --port requires a value (--port=VALUE)"
    assert "--port requires a value" in load_error(tmp_path, "--port", "--debug")


def test_negative_number_is_a_value_not_an_option(tmp_path: Path) -> None:
    message = load_error(tmp_path, "--max_tasks", "-5")
    assert message == "invalid value for --max_tasks: must not be negative, got -5"


def test_unknown_options_and_stray_words_are_reported_once(tmp_path: Path) -> None:
    warnings: list[str] = []
    s = load(tmp_path, "--foo=1", "--port=7", "-bar", "word", warnings=warnings)
    assert s.port == 7
    assert warnings == [
        "ignoring unknown options: --foo -bar",
        "ignoring unexpected arguments: word",
    ]


def test_double_dash_ends_options() -> None:
    parsed = parse_command_line(["--port=1", "--", "--debug"])
    assert parsed.positionals == [(2, "--debug")]


# --- conversions and their messages ----------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "reason"),
    [
        ("--port=abc", "'abc' is not an integer"),
        ("--port=70000", "70000 is not a port number (0-65535)"),
        ("--port=-1", "-1 is not a port number (0-65535)"),
        ("--inspect_timeout=soon", "'soon' is not a number"),
        ("--inspect_timeout=nan", "'nan' is not a finite number"),
        ("--inspect_timeout=-1", "must not be negative, got -1.0"),
        ("--max_workers=-1", "must not be negative, got -1"),
        ("--state_save_interval=1.5", "'1.5' is not an integer"),
        ("--purge_offline_workers=x", "'x' is not an integer"),
        ("--logging=loud", "'loud' is not one of debug, info, warning, error, critical, none"),
        ("--commit_interval=0", "must be greater than 0, got 0.0"),
        ("--event_queue_max_length=0", "must be greater than 0, got 0"),
        ("--max_task_age=soon", "'soon' is not a duration (seconds, or e.g. 30m, 12h, 7d)"),
        ("--max-task-age=0", "must be greater than 0, got 0.0"),
        ("--task_runtime_metric_buckets=1,x", "'x' is not a number"),
        ("--task_runtime_metric_buckets=5,1", "buckets must be in increasing order"),
        ("--task_runtime_metric_buckets=", "needs at least one bucket"),
        ("--basic_auth=justapassword", "each entry must be of the form user:password"),
        ("--format_task=mod.fn", "can only be set in the config file (as a function)"),
    ],
)
def test_conversion_errors(tmp_path: Path, arg: str, reason: str) -> None:
    label = arg.partition("=")[0]
    assert load_error(tmp_path, arg) == f"invalid value for {label}: {reason}"


def test_typed_values(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        "--inspect_timeout=250",
        "--purge_offline_workers=60",
        "--basic_auth=a:b,c:d:e",
        "--logging=WARNING",
        "--log_to_stderr",
        "--event_queue_ttl=60",
        "--event_queue_max_length=100000",
        "--commit_interval=0.25",
        "--port=0",
    )
    assert s.inspect_timeout == 250.0 and isinstance(s.inspect_timeout, float)
    assert s.purge_offline_workers == 60
    assert s.basic_auth == ["a:b", "c:d:e"]
    assert s.logging == "warning"
    assert s.log_to_stderr is True
    assert s.event_queue_ttl == 60.0 and s.event_queue_max_length == 100000
    assert s.commit_interval == 0.25
    assert s.port == 0


def test_empty_value_unsets_a_nullable_option(tmp_path: Path) -> None:
    env = {"FLOWER_PURGE_OFFLINE_WORKERS": "60", "FLOWER_BROKER_API": "http://h/api/"}
    s = load(tmp_path, "--purge_offline_workers=", "--broker_api=", env=env)
    assert s.purge_offline_workers is None and s.broker_api is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("1.5", 1.5), ("45s", 45.0), ("30m", 1800.0), ("12h", 43200.0),
     ("7d", 604800.0), ("2w", 1209600.0), ("1h30m", 5400.0), (" 7D ", 604800.0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "m5", "inf", "1h 30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_max_task_age(tmp_path: Path) -> None:
    assert load(tmp_path, "--max_task_age=7d").max_task_age == 604800.0
    assert load(tmp_path, env={"FLOWER_MAX_TASK_AGE": "30m"}).max_task_age == 1800.0
    conf = "from datetime import timedelta\nmax_task_age = timedelta(hours=2)\n"
    assert load(tmp_path, conf=conf).max_task_age == 7200.0


def test_metric_buckets_always_end_with_inf(tmp_path: Path) -> None:
    s = load(tmp_path, "--task_runtime_metric_buckets=1,5,10")
    assert s.task_runtime_metric_buckets == [1.0, 5.0, 10.0, math.inf]
    s = load(tmp_path, "--task_runtime_metric_buckets=1,5,inf")
    assert s.task_runtime_metric_buckets == [1.0, 5.0, math.inf]


def test_url_prefix_is_normalised(tmp_path: Path) -> None:
    assert load(tmp_path, "--url_prefix=/flower/").url_prefix == "flower"
    assert load(tmp_path, "--url_prefix=a/b/").url_prefix == "a/b"
    assert load(tmp_path, "--url_prefix=/").url_prefix == ""
    assert load(tmp_path, "--url_prefix=").url_prefix == ""


def test_tasks_columns(tmp_path: Path) -> None:
    warnings: list[str] = []
    s = load(tmp_path, "--tasks_columns=worker, name,bogus,uuid,name", warnings=warnings)
    assert s.tasks_columns == ["worker", "name", "uuid"]
    assert warnings == ["ignoring unknown tasks_columns: bogus"]
    assert load(tmp_path, "--tasks_columns=all").tasks_columns == list(TASK_COLUMNS)
    assert load(tmp_path, "--tasks_columns=nope").tasks_columns == list(DEFAULT_TASKS_COLUMNS)
    assert "routing_key" in TASK_COLUMNS and len(TASK_COLUMNS) == 17


# --- environment ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("y", True), ("YES", True), ("t", True), ("True", True), ("on", True), ("1", True),
     ("n", False), ("No", False), ("f", False), ("false", False), ("OFF", False), ("0", False)],
)  # fmt: skip
def test_environment_booleans_use_strtobool(tmp_path: Path, text: str, expected: bool) -> None:
    assert strtobool(text) is expected
    assert load(tmp_path, env={"FLOWER_PERSISTENT": text}).persistent is expected


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    assert load_error(tmp_path, env={"FLOWER_DEBUG": "maybe"}).startswith(
        "invalid value for FLOWER_DEBUG: 'maybe' is not a boolean"
    )
    assert load_error(tmp_path, env={"FLOWER_PORT": "abc"}) == (
        "invalid value for FLOWER_PORT: 'abc' is not an integer"
    )
    assert load_error(tmp_path, env={"FLOWER_FORMAT_TASK": "x"}).startswith(
        "invalid value for FLOWER_FORMAT_TASK: can only be set in the config file"
    )


def test_environment_lists_and_logging_options(tmp_path: Path) -> None:
    env = {
        "FLOWER_BASIC_AUTH": "u1:p1,u2:p2",
        "FLOWER_LOGGING": "debug",
        "FLOWER_LOG_FILE_PREFIX": "/tmp/x.log",
        "FLOWER_TASKS_COLUMNS": "name,state",
        "FLOWER_OAUTH2_KEY": "k",
        "FLOWER_DATA_DIR": "/data",  # not an option: ignored
        "FLOWERPORT": "1",  # not the prefix
        "flower_port": "1",  # the prefix is case-sensitive
    }
    s = load(tmp_path, env=env)
    assert s.basic_auth == ["u1:p1", "u2:p2"]
    assert (s.logging, s.log_file_prefix) == ("debug", "/tmp/x.log")
    assert s.tasks_columns == ["name", "state"]
    assert s.oauth2_key == "k" and s.port == 5555


def test_unauthenticated_api(tmp_path: Path) -> None:
    assert load(tmp_path, env={"FLOWER_UNAUTHENTICATED_API": "true"}).unauthenticated_api
    assert not load(tmp_path, env={"FLOWER_UNAUTHENTICATED_API": "0"}).unauthenticated_api
    assert not load(tmp_path, env={"FLOWER_UNAUTHENTICATED_API": ""}).unauthenticated_api
    assert load_error(tmp_path, env={"FLOWER_UNAUTHENTICATED_API": "enabled"}).startswith(
        "invalid value for FLOWER_UNAUTHENTICATED_API: 'enabled' is not a boolean"
    )


def test_oauth_environment_extras(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert (s.github_oauth_domain, s.gitlab_oauth_domain) == ("github.com", "gitlab.com")
    assert s.gitlab_auth_allowed_groups == [] and s.gitlab_min_access_level == 20
    assert s.okta_base_url is None
    env = {
        "FLOWER_GITHUB_OAUTH_DOMAIN": "github.corp",
        "FLOWER_GITLAB_OAUTH_DOMAIN": "gitlab.corp",
        "FLOWER_GITLAB_AUTH_ALLOWED_GROUPS": "group1, group2/subgroup,",
        "FLOWER_GITLAB_MIN_ACCESS_LEVEL": "30",
        "FLOWER_OAUTH2_OKTA_BASE_URL": "https://corp.okta.com/oauth2",
    }
    s = load(tmp_path, env=env)
    assert (s.github_oauth_domain, s.gitlab_oauth_domain) == ("github.corp", "gitlab.corp")
    assert s.gitlab_auth_allowed_groups == ["group1", "group2/subgroup"]
    assert s.gitlab_min_access_level == 30
    assert s.okta_base_url == "https://corp.okta.com/oauth2"
    assert load_error(tmp_path, env={"FLOWER_GITLAB_MIN_ACCESS_LEVEL": "dev"}) == (
        "invalid value for FLOWER_GITLAB_MIN_ACCESS_LEVEL: 'dev' is not an integer"
    )


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["", "mail@example.com", ".*@example.com", "one.*@example.com", "one.*two@example.com",
     "one@example.com|two@example.com", r".*@example\.com"],
)  # fmt: skip
def test_valid_auth_patterns(tmp_path: Path, pattern: str) -> None:
    validate_auth_pattern(pattern)
    assert load(tmp_path, f"--auth={pattern}").auth == pattern


@pytest.mark.parametrize(
    "pattern",
    [".*@.*example.com", "one@domain1.com|.*@domain2.com", "mail@.*example.com", ".*example.com"],
)
def test_invalid_auth_patterns(tmp_path: Path, pattern: str) -> None:
    assert load_error(tmp_path, f"--auth={pattern}") == f"Invalid '--auth' option: {pattern}"


def test_broker_api_validation(tmp_path: Path) -> None:
    url = "http://guest:guest@localhost:15672/api/"
    assert load(tmp_path, f"--broker_api={url}").broker_api == url
    message = load_error(tmp_path, "--broker_api=ftp://user:hunter2@host/api/")
    assert message == "Invalid '--broker-api' option: scheme must be http or https, got 'ftp'"
    message = load_error(tmp_path, "--broker_api=http://user:hunter2@/api/")
    assert message == "Invalid '--broker-api' option: the URL has no host"
    message = load_error(tmp_path, "--broker_api=localhost:15672")
    assert "scheme must be http or https" in message
    assert "hunter2" not in message


def test_mask_url_password() -> None:
    assert mask_url_password("http://guest:pw@h:15672/api/") == "http://guest:**@h:15672/api/"
    assert mask_url_password("http://h/api/") == "http://h/api/"


def test_certfile_and_keyfile_go_together(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("c")
    (tmp_path / "k.pem").write_text("k")
    expected = "Both 'certfile' and 'keyfile' are required to enable SSL"
    assert load_error(tmp_path, "--certfile=c.pem") == expected
    assert load_error(tmp_path, "--keyfile=k.pem") == expected
    s = load(tmp_path, "--certfile=c.pem", "--keyfile=k.pem")
    assert s.certfile == str(tmp_path / "c.pem") and s.keyfile == str(tmp_path / "k.pem")
    assert s.ssl_enabled
    assert load_error(tmp_path, "--certfile=c.pem", "--keyfile=missing.pem") == (
        f"invalid value for --keyfile: no such file: {tmp_path / 'missing.pem'}"
    )


# --- auth providers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "provider"),
    [
        ("flower.views.auth.GoogleAuth2LoginHandler", "google"),
        ("flower.views.auth.GithubLoginHandler", "github"),
        ("flower.views.auth.GitLabLoginHandler", "gitlab"),
        ("flower.views.auth.OktaLoginHandler", "okta"),
        ("flower.views.auth:OktaLoginHandler", "okta"),
        ("github", "github"),
        ("GitLab", "gitlab"),
        ("myproject.auth.CustomLogin", "myproject.auth.CustomLogin"),
        ("myproject.auth:CustomLogin", "myproject.auth:CustomLogin"),
        ("flower.views.auth.Unknown", "flower.views.auth.Unknown"),
    ],
)
def test_resolve_auth_provider(name: str, provider: str) -> None:
    assert resolve_auth_provider(name) == provider


def test_auth_provider_option_is_resolved(tmp_path: Path) -> None:
    s = load(tmp_path, "--auth_provider=flower.views.auth.GithubLoginHandler")
    assert s.auth_provider == "github"


# --- the config file ------------------------------------------------------------------------


def test_flower_style_config_file_loads_unchanged(tmp_path: Path) -> None:
    conf = """
        import logging as _logging
        import os
        from flower.utils.template import humanize
        import flower.utils.template
        from flower.views import BaseHandler
        from flower.views.auth import GithubLoginHandler
        from flower.views.monitor import Metrics

        # RabbitMQ management api
        broker_api = 'http://guest:guest@localhost:15672/api/'
        logging = 'DEBUG'
        auth_provider = 'flower.views.auth.GithubLoginHandler'
        auth = '.*@example.com'
        basic_auth = ['admin:secret']
        port = 5556
        debug = "yes"
        max_tasks = "20000"
        inspect_timeout = 500
        tasks_columns = "name,uuid,state"
        task_runtime_metric_buckets = (1, 5, 10)
        unrelated = {'kept': True}

        class MyLogin(BaseHandler):
            pass

        def format_task(task):
            task.args = humanize(task.args, length=10)
            task.name = flower.utils.template.humanize(task.name)
            return task
    """
    s = load(tmp_path, conf=conf)
    assert s.config_file == str(tmp_path / "flowerconfig.py")
    assert s.broker_api == "http://guest:guest@localhost:15672/api/"
    assert s.logging == "debug"
    assert s.auth_provider == "github"
    assert s.auth == ".*@example.com"
    assert s.basic_auth == ["admin:secret"]
    assert (s.port, s.debug, s.max_tasks) == (5556, True, 20000)
    assert s.inspect_timeout == 500.0 and isinstance(s.inspect_timeout, float)
    assert s.tasks_columns == ["name", "uuid", "state"]
    assert s.task_runtime_metric_buckets == [1.0, 5.0, 10.0, math.inf]
    assert s.config_namespace["unrelated"] == {"kept": True}
    assert "__builtins__" not in s.config_namespace
    assert s.config_namespace["GithubLoginHandler"].stamen_provider == "github"
    assert s.config_namespace["Metrics"].__name__ == "Metrics"

    class Task:
        args = "(1, 2, 3, 4, 5, 6)"
        name = "tasks.add_numbers"

    assert s.format_task is not None
    formatted = s.format_task(Task())
    assert formatted.args == "(1, 2, ..."
    assert formatted.name == "Tasks.add numbers"


def test_config_file_does_not_shadow_a_real_flower(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "site" / "flower"
    (fake / "utils").mkdir(parents=True)
    (fake / "__init__.py").write_text("REAL = True\n")
    (fake / "utils" / "__init__.py").write_text("")
    (fake / "utils" / "template.py").write_text("def humanize(obj):\n    return 'real'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "flower" or m.startswith("flower.")]:
        monkeypatch.delitem(sys.modules, name)

    s = load(tmp_path, conf="from flower.utils.template import humanize\n")
    assert s.config_namespace["humanize"] is template.humanize
    assert "flower" not in sys.modules  # nothing registered under the real name
    import flower.utils.template  # the real package is untouched for everyone else

    assert flower.REAL is True
    assert flower.utils.template.humanize(1) == "real"


def test_config_file_names_with_dashes_and_ignored_names(tmp_path: Path) -> None:
    conf = "globals()['max-workers'] = 9\nimport logging\nPORT = 1\n"
    s = load(tmp_path, conf=conf)
    assert s.max_workers == 9
    assert s.logging == "info"  # ``import logging`` is a module, not the option
    assert s.port == 5555  # names are case-sensitive


def test_environment_warns_of_a_misspelt_option_only(tmp_path: Path) -> None:
    warnings: list[str] = []
    env = {
        "FLOWER_MAX_TASK": "5",
        "FLOWER_UNAUTHENTICATED_API": "true",
        "FLOWER_GITLAB_OAUTH_DOMAIN": "gitlab.example.com",
        "FLOWER_SOMETHING_ELSE": "x",
    }
    s = load(tmp_path, env=env, warnings=warnings)
    assert s.max_tasks == 100_000
    assert warnings == ["FLOWER_MAX_TASK is not an option; did you mean FLOWER_MAX_TASKS?"]


def test_config_file_warns_of_a_misspelt_option_only(tmp_path: Path) -> None:
    warnings: list[str] = []
    conf = "max_task = 5\nmy_helper_value = 3\ndef max_tasks_for(x):\n    return x\n"
    s = load(tmp_path, conf=conf, warnings=warnings)
    assert s.max_tasks == 100_000
    assert warnings == [
        f"max_task in {tmp_path / 'flowerconfig.py'} is not an option; did you mean max_tasks?"
    ]


@pytest.mark.parametrize(
    ("conf", "reason"),
    [
        ("port = [1]", "expected an integer, got list [1]"),
        ("port = 'x'", "'x' is not an integer"),
        ("port = True", "expected an integer, got bool True"),
        ("debug = 'maybe'", "'maybe' is not a boolean (use true/false, yes/no, on/off or 1/0)"),
        ("address = 5", "expected a string, got int 5"),
        ("port = None", "cannot be None (default 5555)"),
        ("format_task = 'x'", "can only be set in the config file (as a function)"),
        ("format_task = 3", "expected a function, got int 3"),
    ],
)
def test_config_file_type_errors(tmp_path: Path, conf: str, reason: str) -> None:
    name = conf.partition(" ")[0]
    path = tmp_path / "flowerconfig.py"
    message = load_error(tmp_path, conf=conf + "\n")
    assert message == f"invalid value for {name} in {path}: {reason}"


def test_config_file_none_means_unset_for_optional_values(tmp_path: Path) -> None:
    s = load(tmp_path, conf="broker_api = None\nbasic_auth = None\naddress = None\n")
    assert (s.broker_api, s.basic_auth, s.address) == (None, [], "")


def test_config_file_errors_point_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "flowerconfig.py"
    message = load_error(tmp_path, conf="port = 1\nthis is not python\n")
    assert message.startswith(f"error in config file {path}, line 2: ")
    message = load_error(tmp_path, conf="x = 1\n\ny = undefined_name\n")
    assert message == (
        f"error in config file {path}, line 3: NameError: name 'undefined_name' is not defined"
    )


def test_config_file_import_of_a_flower_module_we_do_not_provide(tmp_path: Path) -> None:
    message = load_error(tmp_path, conf="from flower.api.tasks import TaskInfo\n")
    assert "ModuleNotFoundError: No module named 'flower.api'" in message


def test_format_task_defined_in_file(tmp_path: Path) -> None:
    s = load(tmp_path, conf="def format_task(task):\n    return task\n")
    assert callable(s.format_task) and s.format_task(3) == 3


def test_format_task_importing_flower_when_called(tmp_path: Path) -> None:
    conf = """
        def format_task(task):
            from flower.utils.template import humanize
            return humanize(task)
    """
    s = load(tmp_path, conf=conf)
    assert s.format_task is not None and s.format_task("max_tasks") == "Max tasks"


def test_conf_inside_the_config_file_is_ignored(tmp_path: Path) -> None:
    s = load(tmp_path, conf="conf = 'elsewhere.py'\n")
    assert s.conf == "flowerconfig.py"


# --- template helpers (the shim's flower.utils.template) ------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        ("max_tasks_per_child", "Max tasks per child"),
        ("uri_prefix", "URI prefix"),
        ("broker-url", "Broker URL"),
        ("ssl_eta", "SSL ETA"),
        ("args", "args"),
        ("kwargs", "kwargs"),
        ("", ""),
        ("7b1c6a07-5d4e-4b2b-9f43-1f4c3a1e2d5c", "7b1c6a07-5d4e-4b2b-9f43-1f4c3a1e2d5c"),
        ([1, 2.5, "x"], "1, 2.5, x"),
        ([1, {"a": 1}], [1, {"a": 1}]),
        ({"a": 1}, {"a": 1}),
        (5, 5),
    ],
)
def test_humanize(value: object, expected: object) -> None:
    assert template.humanize(value) == expected


def test_humanize_length_from_flower_2_1() -> None:
    assert template.humanize("abcdefghijklmnop", length=10) == "Abcdef ..."
    assert template.humanize("short", length=10) == "Short"
    assert template.humanize([1, 2, 3], length=5) == "1 ..."


def test_humanize_time() -> None:
    ts = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc).timestamp()
    assert template.humanize(ts, type="time-UTC") == "2024-01-02 03:04:05.678901 UTC"
    assert template.humanize(ts, type="time-Europe/Paris") == "2024-01-02 04:04:05.678901 CET"
    assert template.humanize(0, type="time") == ""
    assert template.humanize(ts, type="time").startswith("2024-01-02")


def test_humanize_natural_time() -> None:
    recent = (datetime.now(timezone.utc) - timedelta(seconds=1)).timestamp()
    assert template.humanize(recent, type="natural-time-UTC") == "a second ago"
    old = datetime(2020, 5, 1, tzinfo=timezone.utc).timestamp()
    assert template.humanize(old, type="natural-time-UTC") == "2020-05-01 00:00:00.000000 UTC"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.01234, "12.34 ms"), (0.5, "500.00 ms"), (1, "1.00 s"), (59.994, "59.99 s"),
     (60, "1m 00s"), (125.4, "2m 05s"), (3599.6, "1h 00m 00s"), (3723, "1h 02m 03s"),
     (None, "")],
)  # fmt: skip
def test_format_duration(seconds: float | None, text: str) -> None:
    assert template.format_duration(seconds) == text
    if seconds is not None:
        assert template.humanize(seconds, type="duration") == text


def test_format_count_and_value() -> None:
    assert template.format_count(1234567) == "1,234,567"
    assert template.format_count(None) == "0"
    assert template.format_value(None) == '<span class="value-missing">&mdash;</span>'
    assert template.format_value("<b>") == "&lt;b&gt;"
    link = template.task_link("/task/abc", "0123456789")
    assert "0123456789" in link and ">01234567<" in link


def test_log_rotation_by_time_as_tornado_does(tmp_path: Path) -> None:
    from logging.handlers import RotatingFileHandler, TimedRotatingFileHandler

    from stamen.server import log_file_handler

    log_file = str(tmp_path / "stamen.log")
    s = load(tmp_path, f"--log_file_prefix={log_file}", "--log_rotate_mode=time",
             "--log_rotate_when=H", "--log_rotate_interval=6")  # fmt: skip
    handler = log_file_handler(s)
    assert isinstance(handler, TimedRotatingFileHandler)
    assert (handler.when, handler.interval, handler.backupCount) == ("H", 6 * 3600, 10)
    handler.close()
    by_size = log_file_handler(load(tmp_path, f"--log_file_prefix={log_file}"))
    assert isinstance(by_size, RotatingFileHandler) and by_size.maxBytes == 100_000_000
    by_size.close()
    for bad in ("mode=daily", "when=fortnight", "interval=0"):
        assert f"log_rotate_{bad.split('=')[0]}" in load_error(tmp_path, f"--log_rotate_{bad}")
