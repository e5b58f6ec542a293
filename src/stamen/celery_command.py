"""``celery flower`` and ``celery stamen``: Stamen as a Celery CLI plugin.

Celery finds these through the ``celery.commands`` entry-point group, exactly as it finds
Flower's ``flower`` command, so ``celery -A proj flower --port=5555`` keeps working after
replacing Flower. Celery has already built the app (``ctx.obj.app``) from its global options;
everything after the subcommand is Flower's options, passed through unprocessed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import click

from stamen.cli import HELP_FLAGS, fail, options_help, print_warning, run_server
from stamen.config import ConfigError, load_settings

#: Celery's global options; after the subcommand they are not ours and are ignored, as in
#: Flower. The first group takes a value.
CELERY_VALUE_OPTIONS = frozenset(
    {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir"}
)
CELERY_FLAG_OPTIONS = frozenset({"-C", "--no-color", "-q", "--quiet", "--version", "--skip-checks"})

MISPLACED_CELERY_ARGS = (
    "You have incorrectly specified the following celery arguments after {command} command: "
    "{names}. Please specify them after celery command instead following this template: "
    "celery [celery args] {command} [{command} args]."
)


def split_misplaced_celery_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate Celery global options given after the subcommand from the rest.

    Returns ``(remaining, misplaced_names)``. A misplaced value-taking option also swallows
    its value when given as a separate word (``--broker redis://``), since we accept that form
    for our own options.
    """
    remaining: list[str] = []
    misplaced: list[str] = []
    index = 0
    while index < len(args):
        token = args[index]
        name, has_value, _ = token.partition("=")
        if name in CELERY_VALUE_OPTIONS or name in CELERY_FLAG_OPTIONS:
            misplaced.append(name)
            following = args[index + 1] if index + 1 < len(args) else ""
            if (
                name in CELERY_VALUE_OPTIONS
                and not has_value
                and following
                and not following.startswith("-")
            ):
                index += 1
        else:
            remaining.append(token)
        index += 1
    return remaining, misplaced


class _OptionsHelpCommand(click.Command):
    """A click command whose ``--help`` also lists Stamen's (Flower's) options."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write("\n" + options_help(formatter.width or 100) + "\n")


def _run(ctx: click.Context, args: Sequence[str]) -> None:
    command = ctx.info_name or "flower"
    remaining, misplaced = split_misplaced_celery_args(args)
    if misplaced:
        print_warning(MISPLACED_CELERY_ARGS.format(command=command, names=misplaced))
    if HELP_FLAGS.intersection(remaining):
        click.echo(ctx.get_help())
        ctx.exit(0)
    try:
        settings = load_settings(remaining, os.environ, os.getcwd(), warn=print_warning)
    except ConfigError as exc:
        ctx.exit(fail(str(exc)))
    obj: Any = ctx.obj
    if obj is not None:
        app, quiet = obj.app, bool(getattr(obj, "quiet", False))
    else:  # invoked outside ``celery`` (tests): Celery's default app
        from celery._state import get_current_app

        app, quiet = get_current_app(), False
    code = run_server(settings, app, quiet=quiet)
    if code:
        ctx.exit(code)


_CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}


@click.command(name="flower", cls=_OptionsHelpCommand, context_settings=_CONTEXT)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[FLOWER OPTIONS]...")
@click.pass_context
def flower(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Monitor and administer the Celery cluster in a web UI and REST API (Stamen, a drop-in
    replacement for Flower: same options, API and metrics)."""
    _run(ctx, args)


@click.command(name="stamen", cls=_OptionsHelpCommand, context_settings=_CONTEXT)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[OPTIONS]...")
@click.pass_context
def stamen(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Monitor and administer the Celery cluster in a web UI and REST API (the same as
    'celery flower', under Stamen's own name)."""
    _run(ctx, args)
