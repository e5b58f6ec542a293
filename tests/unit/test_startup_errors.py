"""What cannot work stops Stamen at start with one line naming the cause, never a
traceback: a history that cannot be opened (a missing folder, an unreachable PostgreSQL
server, the PostgreSQL driver not installed; exit status 1) and a broker URL no transport
serves or a unix socket in a missing folder (exit status 2, as for any bad option)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import stamen.store
from stamen import cli


@pytest.fixture(autouse=True)
def _in_empty_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_LOADER"):
        monkeypatch.delenv(name, raising=False)
    yield


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("stamen: error:")]
    assert len(lines) == 1, err
    assert not [line for line in err.splitlines() if line[:1].isspace()], err  # no hint lines
    return lines[0]


def test_a_history_file_in_a_missing_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "missing" / "history"
    assert cli.main(["--persistent=True", f"--db={target}", "--port=0"]) == 1
    assert f"cannot open the history file {target}.sqlite3" in _one_line_error(capsys)
    assert cli.main(["db", "upgrade", f"--db={target}"]) == 1
    assert "cannot open the history file" in _one_line_error(capsys)


def test_an_unreachable_postgresql_server(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("psycopg")
    # Port 1 on loopback: refused at once, nothing listens there.
    assert cli.main(["--db=postgresql://nobody@127.0.0.1:1/test", "--port=0"]) == 1
    assert "cannot connect to PostgreSQL" in _one_line_error(capsys)


def test_postgresql_without_its_driver_says_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # "import psycopg" fails
    monkeypatch.delitem(sys.modules, "stamen.store.postgres", raising=False)
    monkeypatch.delattr(stamen.store, "postgres", raising=False)
    url = "--db=postgresql://nobody@127.0.0.1:1/test"
    for args in (["db", "upgrade", url], [url, "--port=0"]):
        assert cli.main(args) == 1
        line = _one_line_error(capsys)
        assert "psycopg is not installed" in line and "pip install 'stamen[postgres]'" in line


@pytest.mark.parametrize(
    ("broker", "reason"),
    [
        ("foo://somewhere", "No such transport: foo"),
        pytest.param(
            "sqs://",
            "No module named",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("botocore") is not None,
                reason="the SQS transport's library is installed here",
            ),
        ),
    ],
)
def test_a_broker_url_no_transport_serves(
    capsys: pytest.CaptureFixture[str], broker: str, reason: str
) -> None:
    assert cli.main([f"--broker={broker}", "--port=0"]) == 2
    line = _one_line_error(capsys)
    assert "unusable broker" in line and reason in line


def test_a_unix_socket_in_a_missing_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sock = tmp_path / "missing" / "stamen.sock"
    assert cli.main([f"--unix_socket={sock}"]) == 2
    assert f"the folder of {sock} does not exist" in _one_line_error(capsys)
