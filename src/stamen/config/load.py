"""``load_settings``: Flower's precedence over the sources, ending in one ``Settings``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stamen.config.errors import invalid_value
from stamen.config.options import DEFAULT_CONF, OPTIONS, OPTIONS_BY_NAME
from stamen.config.parse import convert_text
from stamen.config.resolve import absolute_path, resolve_values
from stamen.config.settings import Settings
from stamen.config.sources import (
    parse_command_line,
    read_config_namespace,
    read_env_extras,
    read_environ,
    run_config_file,
)

log = logging.getLogger(__name__)
SOURCE_DEFAULT, SOURCE_ENV, SOURCE_FILE, SOURCE_CLI = "default", "env", "file", "cli"


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
            raise invalid_value(label, str(exc)) from None
    env = read_environ(environ, warn)

    conf_label, conf = cli.get("conf") or env.get("conf") or ("--conf", DEFAULT_CONF)
    conf_path = Path(absolute_path(conf, cwd))
    namespace: dict[str, Any] = {}
    from_file: dict[str, tuple[str, Any]] = {}
    config_file: str | None = None
    protect_metrics = False
    if conf_path.exists() or conf != DEFAULT_CONF:
        if not conf_path.exists():
            raise invalid_value(conf_label, f"config file not found: {conf_path}")
        namespace, patches = run_config_file(conf_path)
        config_file = str(conf_path)
        from_file = read_config_namespace(namespace, conf_path, warn)
        from_file.pop("conf", None)
        protect_metrics = patches.metrics_protected
        if protect_metrics and not patches.metrics_recipe:
            warn(
                f"{conf_path} replaces flower.views.monitor.Metrics.get; Stamen runs no "
                "Tornado handlers and takes this as tornado.web.authenticated: /metrics "
                "requires authentication"
            )
        if patches.healthcheck_get is not None:
            warn(
                f"{conf_path} replaces flower.views.monitor.Healthcheck.get, which has no "
                "effect under Stamen: /healthcheck stays open"
            )

    values: dict[str, Any] = {opt.name: opt.default for opt in OPTIONS}
    labels: dict[str, str] = {opt.name: "--" + opt.name for opt in OPTIONS}
    sources = dict.fromkeys(values, SOURCE_DEFAULT)
    for source, layer in ((SOURCE_ENV, env), (SOURCE_FILE, from_file), (SOURCE_CLI, cli)):
        for name, (label, value) in layer.items():
            values[name], labels[name], sources[name] = value, label, source
    values["conf"] = conf

    resolve_values(values, labels, cwd, warn)
    return Settings(
        **values,
        **read_env_extras(environ),
        config_file=config_file,
        config_namespace=namespace,
        protect_metrics=protect_metrics,
        sources=sources,
    )
