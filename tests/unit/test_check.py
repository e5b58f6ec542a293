"""``stamen check``: its command line and its verdicts, against the in-process app (the
real processes are in tests/integration/test_check.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stamen import cli
from stamen.check import (
    EXIT_AUTH,
    EXIT_NO_WORKERS,
    EXIT_UNREACHABLE,
    FAIL,
    OK,
    Checker,
    Result,
    Target,
    exit_code,
    parse_args,
)
from tests.factories import lifecycle, worker_heartbeat, worker_online
from tests.unit.conftest import AppHarness, make_harness


def test_check_options_are_taken_out_of_flower_options() -> None:
    inv = cli.parse_invocation(
        ["check", "http://h:5555", "--token", "t", "--timeout=3", "--require-auth", "--port=1"]
    )
    assert inv.command == "check"
    assert inv.args == ["http://h:5555", "--token", "t", "--timeout=3", "--require-auth"]
    assert inv.options == ["--port=1"]


def test_credentials_from_url_options_and_environment() -> None:
    target = parse_args(["https://ann:p%40ss@h:8443/flower/"], {})
    assert (target.url, target.user, target.password) == ("https://h:8443/flower", "ann", "p@ss")
    target = parse_args(["h:5555", "--user=bob"], {"STAMEN_CHECK_PASSWORD": "pw"})
    assert (target.url, target.user, target.password) == ("http://h:5555", "bob", "pw")
    assert parse_args(["h"], {"STAMEN_CHECK_TOKEN": "tok"}).token == "tok"
    with pytest.raises(ValueError, match="timeout"):
        parse_args(["h", "--timeout=0"], {})
    with pytest.raises(ValueError, match="not an http"):
        parse_args(["ftp://h"], {})


def test_exit_code_is_the_first_failure() -> None:
    results = [
        Result("reachable", OK, ""),
        Result("auth", FAIL, "", EXIT_AUTH),
        Result("workers", FAIL, "", EXIT_NO_WORKERS),
    ]
    assert exit_code(results) == EXIT_AUTH
    assert exit_code(results[:1]) == 0


def run(h: AppHarness, **target: object) -> tuple[int, dict[str, Result]]:
    target.setdefault("url", "http://testserver")
    checker = Checker(Target(**target), transport=h.client._transport)  # type: ignore[arg-type]
    results = checker.run()
    checker.close()
    return exit_code(results), {r.name: r for r in results}


def test_verdicts_in_process(tmp_path: Path) -> None:
    for h in make_harness(tmp_path):
        code, results = run(h)
        assert code == EXIT_NO_WORKERS
        assert "no worker seen" in results["workers"].reason

        now = time.time()
        h.feed([worker_online("w1@host", now), worker_heartbeat("w1@host", now)])
        h.feed(lifecycle("t1", ts=now))
        code, results = run(h)
        assert results["workers"].status == OK, results["workers"]
        assert results["history"].status == OK
        assert code == 0, results


def test_token_and_basic_credentials_in_process(tmp_path: Path) -> None:
    overrides = {"basic_auth": ["ann:s3cret"], "api_tokens": ["ci:tok-123:viewer"]}
    for h in make_harness(tmp_path, unauthenticated_api=False, **overrides):
        code, results = run(h, token="wrong")
        assert code == EXIT_AUTH and "refused" in results["auth"].reason
        code, results = run(h, token="tok-123")
        assert results["auth"].status == OK and code == EXIT_NO_WORKERS
        code, results = run(h, user="ann", password="s3cret")
        assert results["auth"].status == OK and code == EXIT_NO_WORKERS


def test_a_wrong_url_prefix_is_the_only_verdict(tmp_path: Path) -> None:
    """Everything 404s below a wrong prefix: say so, not "authentication is not configured"."""
    for h in make_harness(tmp_path):
        code, results = run(h, url="http://testserver/wrong-prefix")
        assert list(results) == ["reachable"] and code == EXIT_UNREACHABLE
        assert "url_prefix" in results["reachable"].reason


def test_protected_metrics_take_the_credentials(tmp_path: Path) -> None:
    overrides = {"basic_auth": ["ann:s3cret"], "protect_metrics": True}
    for h in make_harness(tmp_path, unauthenticated_api=False, **overrides):
        results = run(h, user="ann", password="s3cret")[1]
        assert results["metrics"].status != FAIL, results["metrics"]
        checker = Checker(Target(url="http://testserver"), transport=h.client._transport)  # type: ignore[arg-type]
        verdict = checker.check_metrics()
        checker.close()
        assert (verdict.status, verdict.code) == (FAIL, EXIT_AUTH)
        assert "requires authentication" in verdict.reason
