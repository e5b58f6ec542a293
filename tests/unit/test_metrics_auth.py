"""Flower's recipe for protecting ``/metrics`` in ``flowerconfig.py``
(``Metrics.get = tornado.web.authenticated(Metrics.get)``): it loads with or without Tornado
and makes ``/metrics`` take the pages' authentication, with a 401 challenge for scrapers."""

from __future__ import annotations

import base64
import importlib.util
import logging
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from stamen.compat import flower_import
from stamen.compat.flower.views.monitor import Healthcheck, Metrics
from stamen.config import ConfigError, Settings, load_settings
from stamen.web.auth import sign_value
from tests.unit.conftest import AppHarness, make_harness

RECIPE = """
    import tornado.web
    from flower.views.monitor import Metrics

    Metrics.get = tornado.web.authenticated(Metrics.get)
"""

RECIPE_FROM_IMPORT = """
    from tornado.web import authenticated
    from flower.views.monitor import Metrics

    Metrics.get = authenticated(Metrics.get)
"""

ORIGINAL_GET = Metrics.__dict__["get"]
ORIGINAL_HEALTH_GET = Healthcheck.__dict__["get"]


def load(tmp_path: Path, conf: str, warnings: list[str] | None = None) -> Settings:
    (tmp_path / "flowerconfig.py").write_text(textwrap.dedent(conf))
    sink = warnings if warnings is not None else []
    return load_settings([], {}, tmp_path, warn=sink.append)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def no_tornado(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tornado absent: as it is in Stamen's environment, or made so for this test when
    something installed it (a ``None`` in ``sys.modules`` makes it unimportable)."""
    if importlib.util.find_spec("tornado") is not None:
        for name in [m for m in sys.modules if m == "tornado" or m.startswith("tornado.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "tornado", None)


@pytest.fixture
def real_tornado(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A "real" Tornado on ``sys.path`` whose ``authenticated`` wraps like Tornado's does."""
    site = tmp_path / "site" / "tornado"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("REAL = True\n")
    (site / "web.py").write_text(
        textwrap.dedent(
            """
            import functools

            def authenticated(method):
                @functools.wraps(method)
                def wrapper(self, *args, **kwargs):
                    if not self.current_user:
                        raise RuntimeError("login")
                    return method(self, *args, **kwargs)
                return wrapper
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "tornado" or m.startswith("tornado.")]:
        monkeypatch.delitem(sys.modules, name)


# --- loading the recipe --------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [RECIPE, RECIPE_FROM_IMPORT])
def test_recipe_loads_without_tornado(tmp_path: Path, no_tornado: None, recipe: str) -> None:
    warnings: list[str] = []
    s = load(tmp_path, recipe + "    basic_auth = ['u:p']\n", warnings)
    assert s.protect_metrics is True
    assert s.basic_auth == ["u:p"]
    assert warnings == []
    if "tornado" in s.config_namespace:  # ``import tornado.web``
        assert s.config_namespace["tornado"].__name__ == "stamen.compat.tornado"
    else:  # ``from tornado.web import authenticated``
        assert s.config_namespace["authenticated"].__module__ == "stamen.compat.tornado.web"
    # Nothing registered under Tornado's own names for anybody else.
    assert sys.modules.get("tornado") is None and "tornado.web" not in sys.modules
    assert Metrics.__dict__["get"] is ORIGINAL_GET  # put back for the next file


def test_tornado_stand_in_provides_only_authenticated(tmp_path: Path, no_tornado: None) -> None:
    with pytest.raises(ConfigError, match=r"No module named 'tornado\.ioloop'"):
        load(tmp_path, "import tornado.ioloop\n")
    with pytest.raises(ConfigError, match="ImportError"):
        load(tmp_path, "from tornado.web import RequestHandler\n")


def test_recipe_with_a_real_tornado(tmp_path: Path, real_tornado: None) -> None:
    warnings: list[str] = []
    s = load(tmp_path, RECIPE + "    basic_auth = ['u:p']\n", warnings)
    assert s.config_namespace["tornado"].REAL is True  # the file gets the real Tornado
    assert s.protect_metrics is True
    assert warnings == []
    assert Metrics.__dict__["get"] is ORIGINAL_GET


def test_real_tornado_is_not_shadowed(real_tornado: None) -> None:
    module = flower_import("tornado.web", None, None, ("authenticated",), 0)
    assert module.__name__ == "tornado.web"
    assert flower_import("tornado", None, None, (), 0).REAL is True


def test_no_recipe_leaves_metrics_open(tmp_path: Path) -> None:
    s = load(tmp_path, "from flower.views.monitor import Metrics\nbasic_auth = ['u:p']\n")
    assert s.protect_metrics is False
    assert Settings().protect_metrics is False


def test_other_replacement_of_metrics_get_protects_with_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    conf = """
        from flower.views.monitor import Metrics, Healthcheck

        def not_found(self):
            self.send_error(404)

        Metrics.get = not_found
        Healthcheck.get = not_found
    """
    s = load(tmp_path, conf, warnings)
    assert s.protect_metrics is True
    path = tmp_path / "flowerconfig.py"
    assert warnings == [
        f"{path} replaces flower.views.monitor.Metrics.get; Stamen runs no Tornado handlers "
        "and takes this as tornado.web.authenticated: /metrics requires authentication",
        f"{path} replaces flower.views.monitor.Healthcheck.get, which has no effect under "
        "Stamen: /healthcheck stays open",
    ]
    assert Metrics.__dict__["get"] is ORIGINAL_GET
    assert Healthcheck.__dict__["get"] is ORIGINAL_HEALTH_GET


def test_stand_in_is_restored_when_the_file_fails(tmp_path: Path) -> None:
    conf = RECIPE + "    raise RuntimeError('boom')\n"
    with pytest.raises(ConfigError, match="boom"):
        load(tmp_path, conf)
    assert Metrics.__dict__["get"] is ORIGINAL_GET
    assert load(tmp_path, "basic_auth = ['u:p']\n").protect_metrics is False


# --- serving /metrics -----------------------------------------------------------------------


@contextmanager
def harness_from(tmp_path: Path, conf: str, **extra: Any) -> Iterator[AppHarness]:
    """An app with what ``conf`` (a flowerconfig.py text) configures."""
    s = load(tmp_path, conf)
    overrides = {
        "protect_metrics": s.protect_metrics,
        "basic_auth": s.basic_auth,
        "auth": s.auth,
        "api_tokens": s.api_tokens,
        "config_file": s.config_file,
        "unauthenticated_api": False,
        **extra,
    }
    harnesses = make_harness(tmp_path, **overrides)
    try:
        yield next(harnesses)
    finally:
        harnesses.close()


@pytest.fixture
def app(tmp_path: Path, no_tornado: None, request: pytest.FixtureRequest) -> Iterator[AppHarness]:
    with harness_from(tmp_path, request.param) as h:
        yield h


@pytest.mark.parametrize(
    "app",
    [
        RECIPE + "    basic_auth = ['u:p']\n    api_tokens = ['prom:s3cret']\n",
        RECIPE_FROM_IMPORT + "    basic_auth = ['u:p']\n    api_tokens = ['prom:s3cret']\n",
    ],
    indirect=True,
)
def test_protected_metrics_with_basic_auth_and_tokens(app: AppHarness) -> None:
    c = app.client
    r = c.get("/metrics", follow_redirects=False)
    assert (r.status_code, r.text) == (401, "Access denied")
    assert r.headers["www-authenticate"] == 'Basic realm="flower", Bearer realm="flower"'
    assert c.get("/metrics", headers=basic("u", "wrong")).status_code == 401
    r = c.get("/metrics", headers=bearer("nope"))
    assert (r.status_code, r.text) == (401, "Invalid API token")
    assert "www-authenticate" in r.headers

    r = c.get("/metrics", headers=basic("u", "p"))
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain"
    assert "flower_events_total" in r.text
    assert c.get("/metrics", headers=bearer("s3cret")).status_code == 200
    assert c.get("/healthcheck").status_code in (200, 503)  # stays open


@pytest.mark.parametrize("app", [RECIPE + "    basic_auth = ['u:p']\n"], indirect=True)
def test_protected_metrics_with_basic_auth_only(app: AppHarness) -> None:
    r = app.client.get("/metrics")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="flower"'
    assert app.client.get("/metrics", headers=basic("u", "p")).status_code == 200


@pytest.mark.parametrize(
    "app",
    [RECIPE + "    auth = '.*@corp.com'\n    api_tokens = ['prom:s3cret']\n"],
    indirect=True,
)
def test_protected_metrics_with_oauth_is_a_401_not_a_redirect(app: AppHarness) -> None:
    c = app.client
    r = c.get("/metrics", follow_redirects=False)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="flower"'
    assert c.get("/metrics", headers=bearer("s3cret")).status_code == 200
    secret = app.services.settings.cookie_secret
    c.cookies.set("user", sign_value(secret, "user", "me@corp.com"))
    assert c.get("/metrics").status_code == 200  # a logged-in browser, as for pages


@pytest.mark.parametrize(
    "app",
    [
        "from flower.views.monitor import Metrics\nbasic_auth = ['u:p']\n",
        "basic_auth = ['u:p']\napi_tokens = ['prom:s3cret']\n",
    ],
    indirect=True,
)
def test_without_the_recipe_metrics_stay_open(app: AppHarness) -> None:
    assert app.client.get("/metrics").status_code == 200
    assert app.client.get("/api/workers").status_code == 401  # the rest is still guarded


def test_recipe_with_a_real_tornado_protects_metrics(tmp_path: Path, real_tornado: None) -> None:
    with harness_from(tmp_path, RECIPE + "    basic_auth = ['u:p']\n") as h:
        assert h.client.get("/metrics").status_code == 401
        assert h.client.get("/metrics", headers=basic("u", "p")).status_code == 200


def test_recipe_without_any_auth_keeps_metrics_open_and_warns(
    tmp_path: Path, no_tornado: None, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="stamen.web.app"),
        harness_from(tmp_path, RECIPE) as h,
    ):
        assert h.client.get("/metrics").status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "stamen.web.app"]
    assert warnings == [
        f"{tmp_path / 'flowerconfig.py'} wraps Metrics.get in tornado.web.authenticated, "
        "which has no effect without --basic_auth or --auth: /metrics stays open"
    ]


def test_recipe_with_oauth_and_no_tokens_warns_about_scrapers(
    tmp_path: Path, no_tornado: None, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="stamen.web.app"),
        harness_from(tmp_path, RECIPE + "    auth = '.*@corp.com'\n") as h,
    ):
        assert h.client.get("/metrics", follow_redirects=False).status_code == 401
    warnings = [r.getMessage() for r in caplog.records if r.name == "stamen.web.app"]
    assert len(warnings) == 1 and "--api_tokens" in warnings[0]
