"""``stamen check URL``: is a running Stamen (or Flower) usable, and if not, why not?

The deployment guide's health check, as a command that monitoring and deploy scripts can
run: the instance answers, its UI answers, authentication is on and the credentials given
work, workers are online, a task history exists and ``/metrics`` answers. One line per
check, ``OK``/``WARN``/``FAIL`` plus the reason, and the guide's exit codes:

* ``0`` every check passed (warnings do not fail),
* ``1`` not reachable, unhealthy, or an endpoint that should answer does not,
* ``2`` no worker online,
* ``3`` an authentication problem (credentials refused or missing, API closed, or no
  authentication at all with ``--require-auth``).

When several checks fail the status is the first failure's in the order the checks run:
reachable (1), auth (3), workers (2, or 3 when the API refuses), history, metrics (1). That
order puts the failure that explains the later ones first: no credentials, no workers list.

Only ``GET`` requests are made, nothing changes. The API is Flower's, so the command
checks a Flower 2.x just as well. Credentials come from ``--user``/``--password``, the
URL (``http://user:password@host:5555``), ``--token`` (``Authorization: Bearer``, see
``--api_tokens``), or ``STAMEN_CHECK_PASSWORD`` / ``STAMEN_CHECK_TOKEN`` so that secrets
need not appear in ``ps``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_NO_WORKERS = 2
EXIT_AUTH = 3

UNAUTHENTICATED_API_HINT = "FLOWER_UNAUTHENTICATED_API"

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"


@dataclass(frozen=True)
class Result:
    """The outcome of one check; ``code`` is the exit status it asks for when it fails."""

    name: str
    status: str
    reason: str
    code: int = EXIT_OK

    def line(self) -> str:
        return f"{self.status:<5} {self.name:<9} {self.reason}"


@dataclass
class Target:
    """Where to look and how to authenticate."""

    url: str  # without credentials and without a trailing slash
    user: str | None = None
    password: str | None = None
    token: str | None = None
    timeout: float = 5.0
    verify: bool = True
    require_auth: bool = False

    @property
    def has_credentials(self) -> bool:
        return self.token is not None or self.user is not None

    def credential_kind(self) -> str:
        return "bearer token" if self.token is not None else "basic credentials"


@dataclass
class Probe:
    """One GET: the response, or why there was none."""

    status: int | None
    text: str = ""
    location: str = ""
    error: str = ""
    json: Any = field(default=None, repr=False)

    @property
    def to_login(self) -> bool:
        """OAuth mode answers a browser without its cookie with a redirect to ``/login``."""
        return self.status in (301, 302, 303, 307) and "/login" in self.location


class Checker:
    """Runs the checks against one ``Target`` with one HTTP client."""

    def __init__(self, target: Target, transport: httpx.BaseTransport | None = None) -> None:
        self.target = target
        self.client = httpx.Client(
            timeout=target.timeout,
            verify=target.verify,
            follow_redirects=False,
            transport=transport,
            headers={"User-Agent": "stamen-check", "Accept": "text/html,application/json"},
        )

    def close(self) -> None:
        self.client.close()

    # --- HTTP ---------------------------------------------------------------------------

    def get(self, path: str, *, credentials: bool = True) -> Probe:
        auth: httpx.Auth | None = None
        headers: dict[str, str] = {}
        if credentials and self.target.token is not None:
            headers["Authorization"] = f"Bearer {self.target.token}"
        elif credentials and self.target.user is not None:
            auth = httpx.BasicAuth(self.target.user, self.target.password or "")
        try:
            response = self.client.get(self.target.url + path, auth=auth, headers=headers)
        except httpx.TimeoutException:
            return Probe(None, error=f"no answer within {self.target.timeout:g} s")
        except httpx.HTTPError as exc:
            return Probe(None, error=_connection_error(exc))
        probe = Probe(response.status_code, response.text, response.headers.get("location", ""))
        if "json" in response.headers.get("content-type", ""):
            try:
                probe.json = response.json()
            except ValueError:
                probe.json = None
        return probe

    # --- the checks ---------------------------------------------------------------------

    def run(self) -> list[Result]:
        """Every check, in order; stops after the first when nothing, or something other
        than Stamen or Flower, answers there (every later verdict would mislead)."""
        reach = self.check_reachable()
        if reach.status == FAIL and not reach.reason.startswith("unhealthy"):
            return [reach]
        results = [reach, *self.check_ui_and_auth()]
        auth_failed = any(r.status == FAIL and r.code == EXIT_AUTH for r in results)
        if auth_failed:
            why = "skipped: needs working credentials"
            results += [Result("workers", SKIP, why), Result("history", SKIP, why)]
        else:
            results += [self.check_workers(), self.check_history()]
        results.append(self.check_metrics())
        return results

    def check_reachable(self) -> Result:
        probe = self.get("/healthcheck", credentials=False)
        if probe.status is None:
            return Result("reachable", FAIL, f"not reachable: {probe.error}", EXIT_UNREACHABLE)
        if probe.status == 200:
            return Result("reachable", OK, f"{self.target.url}/healthcheck answered OK")
        first = (probe.text.strip().splitlines() or [""])[0][:200]
        if probe.status == 503:
            return Result("reachable", FAIL, f"unhealthy: {first}", EXIT_UNREACHABLE)
        return Result(
            "reachable",
            FAIL,
            f"/healthcheck answered HTTP {probe.status}: not a Stamen or Flower at this URL "
            "(wrong port or url_prefix?)",
            EXIT_UNREACHABLE,
        )

    def check_ui_and_auth(self) -> list[Result]:
        """Whether authentication is on (asked without credentials), then whether the
        credentials given get in. Pages are the probe because Flower protects them whenever
        authentication is on; the API is the fallback for an instance serving no pages."""
        anonymous = self.get("/", credentials=False)
        path = "/"
        if anonymous.status == 404:
            path = "/api/workers?status=1"
            anonymous = self.get(path, credentials=False)
        if anonymous.status is None:
            return [Result("ui", FAIL, f"/ did not answer: {anonymous.error}", EXIT_UNREACHABLE)]

        protected = anonymous.status in (401, 403) or anonymous.to_login
        closed_api = anonymous.status == 401 and UNAUTHENTICATED_API_HINT in anonymous.text
        if closed_api or anonymous.status == 200:
            protected = False
        results: list[Result] = []
        if not protected:
            if path == "/":
                results.append(Result("ui", OK, "the UI answers at /"))
            else:
                results.append(Result("ui", WARN, "no page at / (HTTP 404): an API-only server?"))
            reason = (
                "authentication is not configured (no --basic_auth, --auth or --api_tokens): "
                "anyone who can reach this URL can see and control the cluster"
            )
            if self.target.require_auth:
                results.append(Result("auth", FAIL, reason, EXIT_AUTH))
            else:
                results.append(Result("auth", WARN, reason))
            return results

        how = "OAuth login" if anonymous.to_login else f"HTTP {anonymous.status}"
        if not self.target.has_credentials:
            return [
                Result("ui", OK, f"the UI answers at / ({how} without credentials)"),
                Result(
                    "auth",
                    FAIL,
                    f"authentication is on ({how}) but no credentials were given: use "
                    "--user/--password, user:password@ in the URL, or --token",
                    EXIT_AUTH,
                ),
            ]
        probe = self.get(path)
        kind = self.target.credential_kind()
        if probe.status == 200:
            return [
                Result("ui", OK, f"the UI answers at {path}"),
                Result("auth", OK, f"authentication is on and the {kind} are accepted"),
            ]
        if probe.status is None:
            return [Result("ui", FAIL, f"{path} did not answer: {probe.error}", EXIT_UNREACHABLE)]
        if probe.to_login:
            reason = (
                f"the {kind} are not enough: this instance uses an OAuth login, which a script "
                "cannot do; give an API token (--token) from --api_tokens"
            )
        else:
            reason = f"the {kind} are refused (HTTP {probe.status} on {path})"
        return [
            Result("ui", OK, f"the UI answers at / ({how})"),
            Result("auth", FAIL, reason, EXIT_AUTH),
        ]

    def check_workers(self) -> Result:
        probe = self.get("/api/workers?status=1")
        refused = self._api_refused("workers", probe)
        if refused is not None:
            return refused
        if not isinstance(probe.json, Mapping):
            return Result(
                "workers", FAIL, "/api/workers did not answer a JSON object", EXIT_UNREACHABLE
            )
        online = sorted(name for name, up in probe.json.items() if up)
        if online:
            shown = ", ".join(online[:5]) + (", ..." if len(online) > 5 else "")
            return Result("workers", OK, f"{len(online)} online: {shown}")
        if probe.json:
            reason = f"no worker online ({len(probe.json)} known, all offline)"
        else:
            reason = (
                "no worker seen: are workers running on the same broker, with events "
                "enabled (celery worker -E, or --enable_events)?"
            )
        return Result("workers", FAIL, reason, EXIT_NO_WORKERS)

    def check_history(self) -> Result:
        probe = self.get("/api/tasks?limit=1")
        refused = self._api_refused("history", probe)
        if refused is not None:
            return refused
        if not isinstance(probe.json, (Mapping, list)):
            return Result("history", FAIL, "/api/tasks did not answer JSON", EXIT_UNREACHABLE)
        if probe.json:
            return Result("history", OK, "tasks are recorded")
        return Result("history", WARN, "no task recorded yet (nothing sent since the start?)")

    def check_metrics(self) -> Result:
        probe = self.get("/metrics")
        if probe.status is None:
            return Result(
                "metrics", FAIL, f"/metrics did not answer: {probe.error}", EXIT_UNREACHABLE
            )
        if probe.status == 401:
            return Result(
                "metrics",
                FAIL,
                "/metrics requires authentication (flowerconfig.py protects it) and the "
                "credentials given, if any, are refused: give what Prometheus scrapes with",
                EXIT_AUTH,
            )
        if probe.status != 200:
            return Result(
                "metrics", FAIL, f"/metrics answered HTTP {probe.status}", EXIT_UNREACHABLE
            )
        series = [line for line in probe.text.splitlines() if line.startswith("flower_")]
        if not series:
            return Result("metrics", WARN, "/metrics answers but has no flower_* series yet")
        return Result("metrics", OK, f"/metrics answers ({len(series)} flower_* series)")

    def _api_refused(self, name: str, probe: Probe) -> Result | None:
        """The failure for an API answer that is not a 200, or ``None``."""
        if probe.status == 200:
            return None
        if probe.status is None:
            return Result(name, FAIL, f"the API did not answer: {probe.error}", EXIT_UNREACHABLE)
        if probe.status == 401 and UNAUTHENTICATED_API_HINT in probe.text:
            reason = (
                "the API is closed: no authentication is configured and "
                "FLOWER_UNAUTHENTICATED_API is not set on the server"
            )
            return Result(name, FAIL, reason, EXIT_AUTH)
        if probe.status in (401, 403) or probe.to_login:
            return Result(
                name, FAIL, f"the API refused the request (HTTP {probe.status})", EXIT_AUTH
            )
        return Result(name, FAIL, f"the API answered HTTP {probe.status}", EXIT_UNREACHABLE)


def exit_code(results: Sequence[Result]) -> int:
    """The first failure's code, in the order the checks ran; 0 when nothing failed."""
    return next((r.code for r in results if r.status == FAIL), EXIT_OK)


def _connection_error(exc: httpx.HTTPError) -> str:
    """``Connection refused`` rather than httpx's nested exception text."""
    cause: BaseException | None = exc
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(getattr(cause, "strerror", None) or cause or exc)
    return text.rsplit("] ", 1)[-1] or type(exc).__name__


# --- command line -------------------------------------------------------------------------


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> Target:
    """``URL [--user=U] [--password=P] [--token=T] [--timeout=S] [--require-auth]
    [--insecure]``; raises ``ValueError`` with a one-line message."""
    parser = argparse.ArgumentParser(prog="stamen check", add_help=False, allow_abbrev=False)
    parser.add_argument("url")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--token")
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--require-auth", "--require_auth", action="store_true")
    parser.add_argument("--insecure", action="store_true")
    parser.error = _raise_value_error  # type: ignore[method-assign]
    ns = parser.parse_args(list(argv))
    if ns.timeout <= 0:
        raise ValueError("--timeout must be a positive number of seconds")

    url = ns.url if "://" in ns.url else f"http://{ns.url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {ns.url!r}")
    user = ns.user if ns.user is not None else _unquote(parts.username)
    password = ns.password if ns.password is not None else _unquote(parts.password)
    if password is None and user is not None:
        password = environ.get("STAMEN_CHECK_PASSWORD", "")
    token = ns.token if ns.token is not None else environ.get("STAMEN_CHECK_TOKEN") or None
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port:
        netloc += f":{parts.port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return Target(
        url=clean,
        user=user,
        password=password,
        token=token,
        timeout=ns.timeout,
        verify=not ns.insecure,
        require_auth=ns.require_auth,
    )


def _unquote(value: str | None) -> str | None:
    return unquote(value) if value is not None else None


def _raise_value_error(message: str) -> None:
    raise ValueError(message)


def run_check(
    argv: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
    quiet: bool = False,
    out: Callable[[str], Any] | None = None,
) -> int:
    """Parse, check, print one line per check (only failures when ``quiet``); returns the
    exit status. A usage error is one line on stderr and status 64 (``EX_USAGE``), so it
    cannot be mistaken for one of the check's own statuses."""
    write = out or (lambda line: sys.stdout.write(line + "\n"))
    try:
        target = parse_args(argv, os.environ if environ is None else environ)
    except ValueError as exc:
        sys.stderr.write(f"stamen check: error: {exc}\n")
        return 64
    checker = Checker(target)
    try:
        results = checker.run()
    finally:
        checker.close()
    for result in results:
        if not quiet or result.status == FAIL:
            write(result.line())
    return exit_code(results)
