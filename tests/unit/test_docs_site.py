"""The documentation site builds, the generated references are current, and the deployment
files keep their essentials (Docker does not run here, so the Dockerfile is read, not
built)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stamen.config import OPTIONS, Settings, load_settings
from stamen.docs_generate import TARGETS, render_api, render_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.mark.parametrize("relative", sorted(TARGETS))
def test_generated_files_are_current(relative: str) -> None:
    assert (ROOT / relative).read_text() == TARGETS[relative](), (
        f"{relative} is stale: run `python -m stamen.docs_generate`"
    )


def test_api_page_lists_every_api_route() -> None:
    text = render_api()
    for path in ("/api/workers", "/api/tasks", "/api/task/info/{taskid}", "/healthcheck"):
        assert f"`{path}`" in text


def _default_assignments(text: str) -> dict[str, Any]:
    """Uncomment the first ``# name = value`` block of each option and evaluate it."""
    values: dict[str, Any] = {}
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"# ([a-z0-9_]+) = (.*)$", line)
        if not match or match.group(1) in values:
            continue
        block = [line[2:]]
        if match.group(2) == "[":
            for follow in lines[index + 1 :]:
                block.append(follow[2:])
                if follow == "# ]":
                    break
        namespace: dict[str, Any] = {"os": os}
        exec("\n".join(block), namespace)
        values[match.group(1)] = namespace[match.group(1)]
    return values


def test_config_template_has_every_option_at_its_default() -> None:
    text = render_config()
    values = _default_assignments(text)
    for opt in OPTIONS:
        assert re.search(rf"^# {opt.name}\b|{opt.name}", text, re.M), opt.name
        if opt.name in ("conf", "format_task"):
            continue
        assert values[opt.name] == opt.default, opt.name


def test_config_template_loads_as_all_defaults(tmp_path: Path) -> None:
    settings = load_settings([f"--conf={DEPLOY / 'flowerconfig.py'}"], {}, tmp_path)
    defaults = Settings()
    for opt in OPTIONS:
        if opt.name not in ("cookie_secret", "conf"):
            assert getattr(settings, opt.name) == getattr(defaults, opt.name), opt.name


def test_dockerfile_essentials() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if re.match(r"[A-Z]+ ", line)]
    by_name: dict[str, list[str]] = {}
    for name, rest in instructions:
        by_name.setdefault(name, []).append(rest)
    assert by_name["FROM"] == ["python:3.12-slim"]
    assert any("pip install ." in run for run in by_name["RUN"])
    assert by_name["USER"] and by_name["USER"][-1] not in ("root", "0")
    assert by_name["EXPOSE"] == ["5555"]
    assert by_name["CMD"] == ['["stamen"]']
    assert any("/data" in v for v in by_name["VOLUME"])
    # The USER line comes after the install, so the install can write site-packages.
    assert text.index("\nUSER ") > text.index("pip install .")


def test_compose_stack_and_the_files_it_mounts() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "stamen", "prometheus", "grafana"} <= set(services)
    assert services["stamen"]["command"][0] == "stamen"
    assert "-E" in services["worker"]["command"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{source} mounted but missing"
    mounted = " ".join(v for s in services.values() for v in s.get("volumes", []))
    assert "./prometheus/prometheus.yml" in mounted
    assert "./grafana/stamen-dashboard.json" in mounted


def test_systemd_unit_is_hardened() -> None:
    lines = (DEPLOY / "systemd" / "stamen.service").read_text().splitlines()
    settings = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in lines if "=" in line}
    assert settings["User"] == "stamen"
    assert "stamen" in settings["ExecStart"] and "--persistent=True" in " ".join(lines)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "KillSignal": "SIGTERM",
        "StateDirectory": "stamen",
    }.items():
        assert settings.get(key) == value, key


def test_nginx_streams_server_sent_events() -> None:
    text = (DEPLOY / "nginx" / "stamen.conf").read_text()
    live = re.search(r"location = /flower/live \{(.*?)\}", text, re.S)
    assert live is not None
    assert "proxy_buffering off" in live.group(1)
    assert "X-Accel-Buffering" in live.group(1)
    assert "location /flower/" in text
    # The prefix must reach Stamen unchanged: no URI part after the upstream.
    assert re.search(r"proxy_pass http://stamen;", text)


def test_mkdocs_site_builds_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mkdocs is required in CI (it is in the test extra)")
        pytest.skip("mkdocs is not installed (pip install mkdocs)")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "index.html").exists()
