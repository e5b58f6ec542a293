"""The ``stamen`` command and the ``celery flower`` / ``celery stamen`` plugin commands.

Nothing here starts a server: ``run_server`` and the demo are replaced by recorders, and the
end-to-end checks only exercise failures that stop before serving.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner

from stamen import __version__, celery_command, cli
from stamen.config import OPTIONS, ConfigError, Settings

# --- parse_invocation ------------------------------------------------------------------------


def test_celery_options_are_taken_anywhere() -> None:
    inv = cli.parse_invocation(
        ["--port=1", "-A", "proj", "--broker=redis://h/0", "-q", "--result_backend", "rpc://"]
    )
    assert inv.celery == {
        "app": "proj",
        "broker": "redis://h/0",
        "quiet": True,
        "result_backend": "rpc://",
    }
    assert inv.quiet is True
    assert inv.options == ["--port=1"]
    assert inv.command is None


def test_conf_is_not_celery_config() -> None:
    inv = cli.parse_invocation(["--conf=x.py", "--config", "celeryconfig"])
    assert inv.options == ["--conf=x.py"]
    assert inv.celery == {"config": "celeryconfig"}


def test_subcommand_is_the_first_word() -> None:
    inv = cli.parse_invocation(["--debug", "demo", "--port", "5556"])
    assert inv.command == "demo"
    assert inv.options == ["--debug", "--port", "5556"]
    assert cli.parse_invocation(["--conf", "demo"]).command is None  # a value, not a command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve-me"], "unknown command 'serve-me' (commands: demo, check, db)"),
        (["demo", "extra"], "unexpected argument 'extra'"),
        (["-A"], "option -A requires a value (-A APP)"),
        (["--quiet=yes"], "option --quiet does not take a value"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cli.parse_invocation(argv)


# --- main -------------------------------------------------------------------------------------


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stamen ")
    for opt in OPTIONS:
        assert (f"--{opt.name}" if opt.cli else opt.name) in out
    assert "[default: 5555]" in out and "-A, --app APP" in out and "demo" in out
    assert cli.main(["-help"]) == 0


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"stamen {__version__}\n"


def test_bad_value_is_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--port=abc"]) == 2
    err = capsys.readouterr().err
    assert err == "stamen: error: invalid value for --port: 'abc' is not an integer\n"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """Record ``run_server`` calls instead of serving; run in an empty directory."""
    calls: list[dict[str, Any]] = []

    def fake_run_server(settings: Settings, celery_app: Any, *, quiet: bool) -> int:
        calls.append({"settings": settings, "app": celery_app, "quiet": quiet})
        return 0

    monkeypatch.setattr(cli, "run_server", fake_run_server)
    monkeypatch.setattr(celery_command, "run_server", fake_run_server)
    monkeypatch.chdir(tmp_path)
    # main() passes -b & co. through Celery's variables, as ``celery`` does; restore them.
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_LOADER"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return calls


def _write_app(directory: Path) -> str:
    module = f"proj_{uuid.uuid4().hex[:8]}"
    (directory / f"{module}.py").write_text(
        "from celery import Celery\napp = Celery('proj', broker='memory://')\n"
    )
    return module


def test_main_builds_the_app_and_serves(
    served: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _write_app(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "flowerconfig.py").write_text("max_tasks = 42\n")
    assert cli.main(["-A", module, "--port", "6001", "-q"]) == 0
    [call] = served
    assert call["quiet"] is True
    assert call["app"].main == "proj"
    assert call["settings"].port == 6001
    assert call["settings"].max_tasks == 42


def test_workdir_changes_directory_before_loading(
    served: list[dict[str, Any]], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    module = _write_app(work)
    (work / "flowerconfig.py").write_text("port = 6002\n")
    assert cli.main(["--workdir", str(work), "--app", module]) == 0
    assert served[0]["settings"].port == 6002
    assert served[0]["quiet"] is False


def test_broker_option_reaches_celery(served: list[dict[str, Any]]) -> None:
    assert cli.main(["-b", "memory://", "--port=6003"]) == 0
    assert os.environ["CELERY_BROKER_URL"] == "memory://"
    assert served[0]["settings"].port == 6003


def test_missing_app_module_is_one_line(
    served: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-A", "no_such_module_xyz"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "stamen: error: unable to load Celery app 'no_such_module_xyz': "
        "No module named 'no_such_module_xyz'\n"
    )
    assert served == []


def test_missing_app_attribute_is_one_line(
    served: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    module = _write_app(tmp_path)
    assert cli.main(["-A", f"{module}:nope"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"stamen: error: unable to load Celery app '{module}:nope': "
        f"module '{module}' has no attribute 'nope'\n"
    )
    assert cli.main(["-A", f"{module}.nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_demo_subcommand(served: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    import stamen.demo

    seen: list[Settings] = []
    monkeypatch.setattr(stamen.demo, "run_demo", lambda settings: seen.append(settings) or 0)
    assert cli.main(["demo", "--port=6004"]) == 0
    assert seen[0].port == 6004
    assert served == []


def test_unknown_options_warn_and_go_on(
    served: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-b", "memory://", "--colour=blue"]) == 0
    assert capsys.readouterr().err == "stamen: warning: ignoring unknown options: --colour\n"
    assert len(served) == 1


# --- the celery plugin commands, in process ---------------------------------------------------


def test_split_misplaced_celery_args() -> None:
    remaining, misplaced = celery_command.split_misplaced_celery_args(
        ["--port=1", "--broker=redis://", "-A", "proj", "-q", "--debug", "--conf", "x.py"]
    )
    assert remaining == ["--port=1", "--debug", "--conf", "x.py"]
    assert misplaced == ["--broker", "-A", "-q"]


@pytest.mark.parametrize("command", [celery_command.flower, celery_command.stamen])
def test_plugin_command_uses_celery_context(served: list[dict[str, Any]], command: Any) -> None:
    from celery import Celery

    app = Celery("ctxapp", broker="memory://")
    obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
    result = CliRunner().invoke(command, ["--port", "6005", "--debug"], obj=obj)
    assert result.exit_code == 0, result.output
    [call] = served
    assert call["app"] is app and call["quiet"] is True
    assert call["settings"].port == 6005 and call["settings"].debug is True


def test_plugin_command_warns_about_misplaced_celery_args(
    served: list[dict[str, Any]],
) -> None:
    result = CliRunner().invoke(celery_command.flower, ["--broker=redis://", "--port=6006"])
    assert result.exit_code == 0
    assert result.stderr == (
        "stamen: warning: You have incorrectly specified the following celery arguments "
        "after flower command: ['--broker']. Please specify them after celery command "
        "instead following this template: celery [celery args] flower [flower args].\n"
    )
    assert served[0]["settings"].port == 6006


def test_plugin_command_bad_value(served: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(celery_command.flower, ["--port=abc"])
    assert result.exit_code == 2
    assert result.stderr == "stamen: error: invalid value for --port: 'abc' is not an integer\n"
    assert served == []


def test_plugin_command_help() -> None:
    result = CliRunner().invoke(celery_command.flower, ["--help"])
    assert result.exit_code == 0
    assert "Monitor and administer the Celery cluster" in result.output
    assert "--port=INT" in result.output and "--max_task_age" in result.output
    result = CliRunner().invoke(celery_command.stamen, ["-help"])
    assert result.exit_code == 0 and "--port=INT" in result.output


# --- end to end, through the installed entry points ------------------------------------------


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CELERY_"))}
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _celery() -> str:
    return str(Path(sys.executable).with_name("celery"))


def test_python_m_stamen_bad_value_exits_2(tmp_path: Path) -> None:
    result = _run(sys.executable, "-m", "stamen", "--port=abc", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "stamen: error: invalid value for --port: 'abc' is not an integer\n"
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", ["flower", "stamen"])
def test_celery_subcommand_bad_value_exits_2(tmp_path: Path, command: str) -> None:
    result = _run(_celery(), "-b", "memory://", command, "--port=abc", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "stamen: error: invalid value for --port: 'abc' is not an integer"
    ]


def test_celery_flower_misplaced_args_and_bad_config(tmp_path: Path) -> None:
    (tmp_path / "flowerconfig.py").write_text(
        textwrap.dedent(
            """
            from flower.utils.template import humanize
            auth_provider = 'flower.views.auth.GithubLoginHandler'
            auth = '.*@.*example.com'
            """
        )
    )
    result = _run(_celery(), "flower", "--broker=memory://", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "stamen: warning: You have incorrectly specified the following celery arguments "
        "after flower command: ['--broker']. Please specify them after celery command "
        "instead following this template: celery [celery args] flower [flower args].",
        "stamen: error: Invalid '--auth' option: .*@.*example.com",
    ]


def test_celery_flower_help(tmp_path: Path) -> None:
    result = _run(_celery(), "flower", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: celery flower [OPTIONS] [FLOWER OPTIONS]...")
    assert "--basic_auth" in result.stdout
