"""Generates the reference files that must never drift from the code.

* ``docs/options.md``: every option (``stamen.docs_options``);
* ``docs/api.md``: every HTTP API route, from the OpenAPI schema the app serves;
* ``deploy/flowerconfig.py``: a configuration file template with every option, commented
  out at its default, with its help text and environment variable.

``python -m stamen.docs_generate`` rewrites all three (run it from the repository root);
unit tests fail when a file in the repository differs from what this produces, so an
option or API route added without regenerating is caught in CI rather than by a user.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stamen import docs_options
from stamen.config.options import DEFAULT_CONF, OPTION_GROUPS, OPTIONS, Option

# --- docs/api.md ------------------------------------------------------------------------------

API_HEADER = """# HTTP API

Flower's REST API, with Stamen's additions. Every `/api/*` route needs authentication when
any is configured (`--basic_auth`, `--auth` with a login cookie, or an `Authorization:
Bearer` token from `--api_tokens`); without authentication the API answers only when the
`FLOWER_UNAUTHENTICATED_API=true` environment variable is set, as in Flower. Routes that
change something also need a role (see [Authentication and roles](auth.md)) and are refused
under `--read_only`. With `--url_prefix=p` every path below starts with `/p`.

The running server describes the same routes interactively at `/api/docs` and as OpenAPI
at `/api/openapi.json`. Not listed here because they are not JSON APIs: the HTML pages,
`/live` (server-sent events for the pages), `/metrics` (Prometheus, see
[Metrics](metrics.md)), `/login`, `/logout` and `/static/`.

This page is generated from the application's OpenAPI schema
(`python -m stamen.docs_generate`).
"""

_METHOD_ORDER = ("get", "post", "put", "patch", "delete")


def openapi_schema() -> dict[str, Any]:
    """The schema of an app built with default settings (no broker is contacted)."""
    from celery import Celery

    from stamen.config import Settings
    from stamen.services import Services
    from stamen.web.app import create_app

    quiet = logging.getLogger("stamen")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the startup warnings (random cookie secret...) are noise
    try:
        with tempfile.TemporaryDirectory(prefix="stamen-docs-") as tmp:
            settings = dataclasses.replace(
                Settings(), persistent=True, db=str(Path(tmp) / "docs.sqlite3")
            )
            app = Celery("docs", broker="memory://")
            return create_app(Services(settings, app, ingest=False)).openapi()
    finally:
        quiet.setLevel(level)


def _cell(text: Any) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _param_type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_param_type(s) for s in schema["anyOf"] if s.get("type") != "null")
    if schema.get("type") == "array":
        return f"list of {_param_type(schema.get('items', {}))}"
    return str(schema.get("type") or "any")


def _body_fields(operation: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Form or JSON body fields, which Flower's API takes for most POST routes."""
    body = operation.get("requestBody", {}).get("content", {})
    rows = []
    for content in body.values():
        ref = content.get("schema", {}).get("$ref", "")
        model = schema.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[-1], {})
        required = set(model.get("required", []))
        for name, field in model.get("properties", {}).items():
            flag = " (required)" if name in required else ""
            rows.append(f"`{name}` body{flag}: {_cell(field.get('description'))}".rstrip(": "))
    return rows


def render_api(schema: dict[str, Any] | None = None) -> str:
    """``docs/api.md``: one section per path, a table of its parameters per method."""
    schema = schema or openapi_schema()
    lines = [API_HEADER, "", "| method | path | what it does |", "|---|---|---|"]
    sections: list[str] = []
    for path in sorted(schema["paths"]):
        item = schema["paths"][path]
        for method in (m for m in _METHOD_ORDER if m in item):
            op = item[method]
            summary = _cell(op.get("summary") or op.get("description", "").split("\n")[0])
            anchor = f"{method}-{path}".lower()
            anchor = "".join(c if c.isalnum() else "-" for c in anchor).strip("-")
            lines.append(f"| {method.upper()} | [`{path}`](#{anchor}) | {summary} |")
            sections += ["", f"## {method.upper()} `{path}` {{#{anchor}}}", ""]
            description = (op.get("description") or "").strip()
            if summary:
                sections.append(summary + ("." if not summary.endswith(".") else ""))
            if description and description != summary:
                sections += ["", textwrap.dedent(description)]
            params = op.get("parameters", [])
            body = _body_fields(op, schema)
            if params:
                sections += ["", "| parameter | in | type | required | meaning |"]
                sections.append("|---|---|---|---|---|")
                for p in params:
                    sections.append(
                        f"| `{p['name']}` | {p['in']} | {_param_type(p.get('schema', {}))} | "
                        f"{'yes' if p.get('required') else 'no'} | {_cell(p.get('description'))} |"
                    )
            if body:
                sections += ["", "Body: " + "; ".join(body) + "."]
    return "\n".join(lines + sections) + "\n"


# --- deploy/flowerconfig.py ----------------------------------------------------------------------

CONFIG_HEADER = '''\
"""Stamen (and Flower) configuration: every option, commented out at its default.

Save as flowerconfig.py in the directory Stamen starts in, or point to it with --conf.
The file is executed as Python: every top-level name that is an option is used (dashes
and underscores alike), everything else is ignored, so imports and helper code are fine.
Precedence, as in Flower: command line > this file > FLOWER_<NAME> variables > defaults.

Secrets (passwords, OAuth secrets, tokens, broker passwords) do not belong in this file:
read them from the environment, as the examples below do, and keep the environment file
readable by the service user only. A Flower flowerconfig.py loads unchanged.

Generated from Stamen's option registry by `python -m stamen.docs_generate`.
"""

import os  # noqa: F401 - the examples below read secrets from the environment
'''

#: Values worth showing instead of the bare default, by option name.
_EXAMPLES: dict[str, str] = {
    "basic_auth": 'basic_auth = os.environ["STAMEN_BASIC_AUTH"].split(",")  '
    "# user:password or user:$2b$... (bcrypt)",
    "oauth2_secret": 'oauth2_secret = os.environ["FLOWER_OAUTH2_SECRET"]',
    "cookie_secret": 'cookie_secret = os.environ["STAMEN_COOKIE_SECRET"]  '
    "# set it to keep logins across restarts",
    "api_tokens": "api_tokens = [f\"ci:{os.environ['STAMEN_CI_TOKEN']}:operator\"]",
    "broker_api": 'broker_api = os.environ["STAMEN_BROKER_API"]  '
    "# http://user:password@rabbit:15672/api/",
    "auth": r'auth = r".*@example\.com"',
    "url_prefix": 'url_prefix = "flower"  # served at https://host/flower/',
    "max_task_age": 'max_task_age = "7d"',
    "admins": 'admins = ["alice@example.com"]',
    "operators": 'operators = ["group:ops"]',
    "viewers": 'viewers = [".*@example.com"]',
}

_FORMAT_TASK = '''\
# def format_task(task):
#     """Called with a copy of each task shown on the task page and the tasks table;
#     return it changed. Not applied to the API. An exception shows the task unchanged."""
#     task.args = task.args[:200]
#     return task'''

_HOOK = """\
# --- Stamen extensions (Flower ignores these) ------------------------------------------------

# Custom pages and API routes: see docs/extending.md and
# deploy/examples/flowerconfig_custom_page.py.
#
# def stamen_routes(router, services):
#     @router.get("/my-dashboard")
#     async def my_dashboard(request): ...
"""


def _python_scalar(value: Any) -> str:
    if isinstance(value, float) and value == float("inf"):
        return 'float("inf")'
    return repr(value)


def _assignment(opt: Option, value: Any) -> list[str]:
    """``name = value`` as commented lines that are valid Python once uncommented."""
    if not opt.multiple:
        return [f"# {opt.name} = {_python_scalar(value)}"]
    items = [_python_scalar(v) for v in value]
    line = f"# {opt.name} = [{', '.join(items)}]"
    if len(line) <= 90:
        return [line]
    body = textwrap.wrap(", ".join(items) + ",", width=84)
    return [f"# {opt.name} = [", *(f"#     {part}" for part in body), "# ]"]


def render_config() -> str:
    """``deploy/flowerconfig.py``: grouped like ``--help``, every line valid when
    uncommented."""
    out = [CONFIG_HEADER]
    for group, title in OPTION_GROUPS.items():
        out += ["", f"# --- {title} " + "-" * max(3, 90 - len(title)), ""]
        for opt in (o for o in OPTIONS if o.group == group):
            where = f"env {opt.env_name}" if opt.cli else "this file only"
            help_lines = textwrap.wrap(
                f"{opt.help}. Type {opt.type_text}, default {opt.show_default()}; {where}.",
                width=90,
                initial_indent="# ",
                subsequent_indent="#   ",
            )
            out += help_lines
            if opt.name == "format_task":
                out.append(_FORMAT_TASK)
            elif opt.name == "conf":
                out.append(f"# (--conf names this file; default {DEFAULT_CONF!r})")
            else:
                out += _assignment(opt, opt.default)
                if opt.name in _EXAMPLES:
                    out.append(f"# {_EXAMPLES[opt.name]}")
            out.append("")
    out += ["", _HOOK]
    return "\n".join(out).rstrip("\n") + "\n"


# --- entry point ---------------------------------------------------------------------------------

#: Generated file (relative to the repository root) -> its renderer.
TARGETS: dict[str, Callable[[], str]] = {
    "docs/options.md": docs_options.render,
    "docs/api.md": render_api,
    "deploy/flowerconfig.py": render_config,
}


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0]) if argv else Path.cwd()
    for relative, render in TARGETS.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
