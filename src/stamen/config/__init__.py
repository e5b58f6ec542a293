"""Options and configuration: the single registry, the frozen ``Settings``, and ``load_settings``.

This sits at the edge of the pipeline: ``cli`` and ``celery_command`` call ``load_settings``
once and hand the resulting ``Settings`` to whatever they run; nothing else reads the
environment, the config file or the command line.

Sources follow Flower 2.2 (defaults < ``FLOWER_<NAME>`` environment < ``flowerconfig.py`` /
``--conf`` < command line), with deliberate supersets: ``--name value`` works as well as
``--name=value``, unknown options are reported instead of silently dropped, and a boolean must
be a real boolean word everywhere (Tornado took ``--debug=no`` as true).

One job a module: ``options`` (the registry), ``checks`` (single-value checks), ``parse``
(text and Python values to typed values), ``sources`` (command line, environment, config
file), ``resolve`` (checks across the merged values), ``settings`` (``Settings``) and
``load`` (the precedence). This package re-exports what the rest of Stamen uses.
"""

from stamen.config.checks import validate_auth_pattern
from stamen.config.errors import ConfigError
from stamen.config.load import load_settings
from stamen.config.options import (
    DEFAULT_BUCKETS,
    DEFAULT_TASKS_COLUMNS,
    OPTION_GROUPS,
    OPTIONS,
    OPTIONS_BY_NAME,
    TASK_COLUMNS,
    options_reference,
)
from stamen.config.parse import parse_duration, strtobool
from stamen.config.resolve import resolve_auth_provider
from stamen.config.settings import Settings, mask_url_password, settings_fields
from stamen.config.sources import parse_command_line

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_TASKS_COLUMNS",
    "OPTIONS",
    "OPTIONS_BY_NAME",
    "OPTION_GROUPS",
    "TASK_COLUMNS",
    "ConfigError",
    "Settings",
    "load_settings",
    "mask_url_password",
    "options_reference",
    "parse_command_line",
    "parse_duration",
    "resolve_auth_provider",
    "settings_fields",
    "strtobool",
    "validate_auth_pattern",
]
