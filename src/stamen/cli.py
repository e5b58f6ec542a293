"""The ``stamen`` command: Celery's global options and Flower's options on one command line.

``stamen [COMMAND] [celery options] [options]`` builds the Celery app the way ``celery -A``
does, resolves ``Settings`` with ``config.load_settings`` and hands both to the server, or
to a subcommand from ``SUBCOMMANDS`` (``flower`` or ``stamen`` as the command is the
server, for Flower's ``python -m flower -A proj flower`` form). The ``celery flower`` /
``celery stamen`` plugin (``celery_command``) reuses the helpers here so that both entry
points behave the same. Errors are one line on stderr and exit status 2, never a
traceback (the server's: see ``server.serve``).
"""

from __future__ import annotations

import os
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stamen import __version__
from stamen.config import (
    OPTION_GROUPS,
    OPTIONS,
    ConfigError,
    Settings,
    load_settings,
    parse_command_line,
)

PROG = "stamen"
EXIT_USAGE = 2
HELP_FLAGS = frozenset({"-h", "--help", "-help"})
#: Words that name the server itself, as the Celery subcommand does: ``python -m flower`` is
#: Celery's command line, so its users write ``python -m flower -A proj flower --port=5555``;
#: ``python -m stamen -A proj flower --port=5555`` (or ``... stamen ...``) runs the same as
#: ``python -m stamen -A proj --port=5555``.
SERVER_WORDS = ("flower", "stamen")


@dataclass(frozen=True)
class CeleryOption:
    """A Celery global option that ``stamen`` accepts itself (``celery`` takes them before
    the subcommand)."""

    flags: tuple[str, ...]
    dest: str
    metavar: str | None  # None for a flag
    help: str


CELERY_OPTIONS: tuple[CeleryOption, ...] = (
    CeleryOption(("-A", "--app"), "app", "APP",
                 "the Celery app, as for 'celery -A' (module, package or module:attribute)"),
    CeleryOption(("-b", "--broker"), "broker", "URL",
                 "broker URL (default: the app's, or CELERY_BROKER_URL)"),
    CeleryOption(("--result-backend",), "result_backend", "URL",
                 "result backend URL (default: the app's, or CELERY_RESULT_BACKEND)"),
    CeleryOption(("--loader",), "loader", "LOADER", "Celery loader class"),
    CeleryOption(("--config",), "config", "MODULE",
                 "Celery configuration module (Stamen's own file is --conf)"),
    CeleryOption(("--workdir",), "workdir", "DIR", "change to this directory first"),
    CeleryOption(("-q", "--quiet"), "quiet", None, "do not print the startup banner"),
)  # fmt: skip
_CELERY_FLAGS = {flag.replace("_", "-"): opt for opt in CELERY_OPTIONS for flag in opt.flags}


@dataclass
class Invocation:
    """What the command line asked for, once Celery's options are taken out."""

    command: str | None = None
    celery: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    @property
    def quiet(self) -> bool:
        return bool(self.celery.get("quiet"))


@dataclass(frozen=True)
class Subcommand:
    """An entry of ``SUBCOMMANDS``: ``run`` gets the settings and the invocation."""

    name: str
    help: str
    run: Callable[[Settings, Invocation], int | None]
    uses_app: bool = False
    takes_args: bool = False
    #: Options the subcommand parses itself (``--name=value``/``--name value``, ``_``/``-``
    #: alike, after the command word): passed on in ``Invocation.args`` with the words, in
    #: order, instead of to ``load_settings`` (which would warn about them).
    options: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()  # the same, for options without a value


def _run_demo(settings: Settings, invocation: Invocation) -> int | None:
    from stamen.demo import run_demo

    return run_demo(settings)


def _run_check(settings: Settings, invocation: Invocation) -> int | None:
    from stamen.check import run_check

    return run_check(invocation.args, quiet=invocation.quiet)


def _run_db(settings: Settings, invocation: Invocation) -> int | None:
    from stamen.store.manage import upgrade
    from stamen.store.sqlite import StoreError

    if invocation.args != ["upgrade"]:
        return fail("usage: db upgrade [--db=PATH_OR_URL]")
    from stamen.services import sqlite_path
    from stamen.store import is_postgres_url

    db = settings.db if is_postgres_url(settings.db) else sqlite_path(settings.db)
    try:
        sys.stdout.write(upgrade(db) + "\n")
    except StoreError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand(
        "demo", "serve a simulated cluster, to try Stamen without a broker", _run_demo
    ),
    "check": Subcommand(
        "check",
        "check a running Stamen or Flower: reachable, UI, auth, workers, history, /metrics. "
        "check URL [--user=U --password=P | --token=T] [--timeout=S] [--require-auth] "
        "[--insecure]; exit 0 ok, 1 not reachable, 2 no workers, 3 auth problem",
        _run_check,
        takes_args=True,
        options=("user", "password", "token", "timeout"),
        flags=("require_auth", "insecure"),
    ),
    "db": Subcommand(
        "db",
        "db upgrade: create or migrate the history database named by --db (a SQLite file "
        "or a postgresql:// URL) to this version's schema",
        _run_db,
        takes_args=True,
    ),
}


# --- output ------------------------------------------------------------------------------


def print_warning(message: str) -> None:
    """One warning line on stderr (logging is not configured yet while options load)."""
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def fail(message: str) -> int:
    """Report a usage or configuration error in one line; returns the exit status."""
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return EXIT_USAGE


def _rows(rows: list[tuple[str, str]], width: int, column: int | None = None) -> list[str]:
    column = column or min(max(len(left) for left, _ in rows) + 4, 34)
    lines = []
    for left, text in rows:
        wrapped = textwrap.wrap(text, max(width - column, 30)) or [""]
        if len(left) + 4 > column:
            lines.append(f"  {left}")
            lines.extend(" " * column + part for part in wrapped)
        else:
            lines.append(f"  {left.ljust(column - 2)}{wrapped[0]}")
            lines.extend(" " * column + part for part in wrapped[1:])
    return lines


def options_help(width: int = 100) -> str:
    """The option list, grouped, generated from the registry (also used by ``celery flower
    --help``)."""
    lines = [
        "Options are Flower's: --name=value or --name value (- and _ alike), also",
        "FLOWER_<NAME> environment variables and the --conf file (default flowerconfig.py).",
        "The command line wins over the file, the file over the environment.",
    ]
    for group, title in OPTION_GROUPS.items():
        rows = []
        for opt in (o for o in OPTIONS if o.group == group):
            left = f"--{opt.name}" if opt.cli else opt.name
            left += "" if opt.type == "bool" else f"={opt.metavar}"
            note = "" if opt.cli else " [config file only]"
            rows.append((left, f"{opt.help} [default: {opt.show_default()}]{note}"))
        lines += ["", f"{title}:", *_rows(rows, width, column=32)]
    return "\n".join(lines)


def format_help(width: int = 100) -> str:
    """``stamen --help``."""
    commands = [("(none)", "run the web server and the event monitor")]
    commands += [
        (
            ", ".join(SERVER_WORDS),
            "the same as no command, for Flower's form: 'python -m flower -A proj flower' "
            f"becomes 'python -m {PROG} -A proj flower'",
        )
    ]
    commands += [(sub.name, sub.help) for sub in SUBCOMMANDS.values()]
    celery_rows = [
        (", ".join(opt.flags) + (f" {opt.metavar}" if opt.metavar else ""), opt.help)
        for opt in CELERY_OPTIONS
    ]
    celery_rows += [("-h, --help", "show this help"), ("--version", "show the version")]
    lines = [
        f"usage: {PROG} [COMMAND] [CELERY OPTIONS] [OPTIONS]",
        "",
        "Monitor and administer Celery clusters; a drop-in replacement for Flower",
        f"('{PROG} -A proj' runs what 'celery -A proj flower' runs).",
        "",
        "Commands:",
        *_rows(commands, width),
        "",
        "Celery options:",
        *_rows(celery_rows, width),
        "",
        options_help(width),
    ]
    return "\n".join(lines)


# --- parsing -----------------------------------------------------------------------------


def parse_invocation(argv: Sequence[str]) -> Invocation:
    """Take Celery's options (anywhere on the line) and the subcommand out of ``argv``;
    the rest is left for ``load_settings``. Raises ``ConfigError`` for usage errors."""
    invocation = Invocation()
    rest: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        flag, has_value, value = token.partition("=")
        opt = _CELERY_FLAGS.get(flag.replace("_", "-")) if token.startswith("-") else None
        if opt is None:
            rest.append(token)
        elif opt.metavar is None:
            if has_value:
                raise ConfigError(f"option {flag} does not take a value")
            invocation.celery[opt.dest] = True
        elif has_value:
            invocation.celery[opt.dest] = value
        elif index + 1 < len(argv):
            invocation.celery[opt.dest] = argv[index + 1]
            index += 1
        else:
            raise ConfigError(f"option {flag} requires a value ({flag} {opt.metavar})")
        index += 1

    drop: set[int] = set()
    positionals = parse_command_line(rest).positionals
    own = _subcommand_options(rest, positionals)
    positionals = [(i, w) for i, w in positionals if i not in own]
    if positionals and positionals[0][1] in SERVER_WORDS:
        drop.add(positionals[0][0])  # "stamen -A proj flower ...": the server, as without
        if len(positionals) > 1:
            raise ConfigError(f"unexpected argument {positionals[1][1]!r}")
        positionals = []
    if positionals:
        first_index, word = positionals[0]
        if word not in SUBCOMMANDS:
            raise ConfigError(f"unknown command {word!r} (commands: {', '.join(SUBCOMMANDS)})")
        invocation.command = word
        drop.add(first_index)
        extra = positionals[1:]
        if extra and not SUBCOMMANDS[word].takes_args:
            raise ConfigError(f"unexpected argument {extra[0][1]!r}")
        taken = {i for i, _ in extra} | set(own)
        invocation.args = [rest[i] for i in sorted(taken)]
        drop.update(taken)
    invocation.options = [token for i, token in enumerate(rest) if i not in drop]
    return invocation


def _subcommand_options(rest: list[str], positionals: list[tuple[int, str]]) -> list[int]:
    """Indexes in ``rest`` of the options (and their separate values) that the subcommand
    named by the first word parses itself; empty when it declares none."""
    if not positionals or positionals[0][1] not in SUBCOMMANDS:
        return []
    subcommand = SUBCOMMANDS[positionals[0][1]]
    taken: list[int] = []
    index = positionals[0][0] + 1
    while index < len(rest):
        token = rest[index]
        name = token.lstrip("-").partition("=")[0].replace("-", "_")
        if token.startswith("--") and name in subcommand.flags:
            taken.append(index)
        elif token.startswith("--") and name in subcommand.options:
            taken.append(index)
            if "=" not in token and index + 1 < len(rest):
                taken.append(index + 1)
                index += 1
        index += 1
    return taken


def apply_celery_options(celery: dict[str, Any]) -> None:
    """Do what ``celery``'s own global options do before the app is loaded: change directory
    and pass broker, backend, loader and config module through Celery's variables."""
    if celery.get("workdir"):
        try:
            os.chdir(celery["workdir"])
        except OSError as exc:
            raise ConfigError(f"invalid value for --workdir: {exc.strerror or exc}") from None
    for dest, variable in (
        ("loader", "CELERY_LOADER"),
        ("broker", "CELERY_BROKER_URL"),
        ("result_backend", "CELERY_RESULT_BACKEND"),
        ("config", "CELERY_CONFIG_MODULE"),
    ):
        if celery.get(dest):
            os.environ[variable] = celery[dest]


def load_celery_app(name: str | None) -> Any:
    """The Celery app named like ``celery -A`` takes it, or Celery's default app.

    A module or attribute that does not exist is a one-line ``ConfigError``; an exception
    raised by the user's own module is printed with its traceback first, because that is the
    only way to find the bug in it.
    """
    from celery._state import get_current_app
    from celery.app.utils import find_app

    if not name:
        return get_current_app()
    module, _, attribute = name.partition(":")
    try:
        return find_app(name)
    except ModuleNotFoundError as exc:
        if attribute and exc.name == name:  # find_app's retry of "module:attr" as a module
            raise ConfigError(
                f"unable to load Celery app {name!r}: module {module!r} has no attribute "
                f"{attribute!r}"
            ) from None
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise ConfigError(f"unable to load Celery app {name!r}: {exc}") from None
        traceback.print_exc()
        raise ConfigError(f"unable to load Celery app {name!r}: {exc}") from None
    except AttributeError as exc:
        raise ConfigError(f"unable to load Celery app {name!r}: {exc}") from None
    except Exception as exc:
        traceback.print_exc()
        raise ConfigError(f"unable to load Celery app {name!r}: {exc}") from None


def _broker_problem(celery_app: Any) -> str | None:
    """Why the broker URL cannot work at all (an unknown scheme, a transport whose library
    is missing), found before serving; None when it may (reachability is checked later,
    and retried)."""
    try:
        with celery_app.connection_for_read() as connection:
            connection.get_transport_cls()  # imports the transport; connects to nothing
    except (KeyError, ImportError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return f"unusable broker: {reason}"
    return None


def _socket_problem(unix_socket: str) -> str | None:
    """Why ``--unix_socket`` cannot be bound: its folder is missing (the server would
    only find out after starting everything else)."""
    if unix_socket and not Path(unix_socket).parent.is_dir():
        return f"invalid value for --unix_socket: the folder of {unix_socket} does not exist"
    return None


def run_server(settings: Settings, celery_app: Any, *, quiet: bool) -> int | None:
    """Start the monitor; imported late so that ``--help`` and config errors stay fast."""
    from stamen.server import serve
    from stamen.store.sqlite import StoreError

    problem = _broker_problem(celery_app) or _socket_problem(settings.unix_socket)
    if problem:
        return fail(problem)
    try:
        return serve(settings, celery_app, quiet=quiet)
    except StoreError as exc:  # the history cannot be opened: say why, in one line
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1


# --- entry point -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int | None:
    """Run ``stamen``; returns the exit status (``None`` means 0)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if HELP_FLAGS.intersection(args):
        sys.stdout.write(format_help() + "\n")
        return 0
    if "--version" in args:
        sys.stdout.write(f"{PROG} {__version__}\n")
        return 0
    try:
        invocation = parse_invocation(args)
        apply_celery_options(invocation.celery)
        settings = load_settings(invocation.options, os.environ, os.getcwd(), warn=print_warning)
        if invocation.command is None:
            app = load_celery_app(invocation.celery.get("app"))
            return run_server(settings, app, quiet=invocation.quiet)
        subcommand = SUBCOMMANDS[invocation.command]
        if not subcommand.uses_app:
            unused = [f for f in ("app", "broker", "result_backend") if f in invocation.celery]
            if unused:
                names = ", ".join("--" + f.replace("_", "-") for f in unused)
                print_warning(f"'{PROG} {subcommand.name}' does not use {names}")
        return subcommand.run(settings, invocation)
    except ConfigError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
