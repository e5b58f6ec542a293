"""Where Stamen listens (``listen.bind_sockets``/``bind_unix_socket``, made as Flower's
Tornado makes them) and Flower's ``python -m flower -A proj flower`` command line form.

The sockets are real but nothing is served: binding is all that is checked, plus the
one-line exit status 3 of ``stamen`` when it cannot listen (which fails before anything
else starts)."""

from __future__ import annotations

import errno
import socket
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stamen import cli, listen
from stamen.config import ConfigError, Settings
from tests.net import can_bind_ipv6

needs_ipv6 = pytest.mark.skipif(not can_bind_ipv6("::"), reason="no IPv6 on this machine")


@pytest.fixture
def bound() -> Iterator[list[socket.socket]]:
    """Sockets a test made, closed after it."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def _bind(bound: list[socket.socket], address: str, port: int = 0) -> list[socket.socket]:
    sockets = listen.bind_sockets(address, port)
    bound.extend(sockets)
    return sockets


# --- TCP -------------------------------------------------------------------------------------


@needs_ipv6
def test_every_interface_means_ipv4_and_ipv6_on_one_port(bound: list[socket.socket]) -> None:
    sockets = _bind(bound, "")
    assert sorted(s.family for s in sockets) == [socket.AF_INET, socket.AF_INET6]
    assert {s.getsockname()[0] for s in sockets} == {"0.0.0.0", "::"}
    assert len({s.getsockname()[1] for s in sockets}) == 1  # port 0: the same port for both
    ipv6 = next(s for s in sockets if s.family == socket.AF_INET6)
    assert ipv6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    port = sockets[0].getsockname()[1]
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.create_connection((host, port), timeout=5) as client:
            assert client.family == family


@needs_ipv6
def test_double_colon_is_ipv6_only_as_in_flower(bound: list[socket.socket]) -> None:
    [sock] = _bind(bound, "::")
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_without_ipv6_every_interface_is_ipv4(
    bound: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "has_ipv6", False)
    [sock] = _bind(bound, "")
    assert sock.getsockname()[0] == "0.0.0.0"


@pytest.mark.parametrize("code", [errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL])
def test_ipv6_switched_off_falls_back_to_ipv4(
    bound: list[socket.socket], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """``socket.has_ipv6`` says yes but the kernel says no (a module not loaded, IPv6
    disabled in a container): listen on IPv4 only, as before."""
    real_socket = socket.socket

    class Socket(real_socket):  # type: ignore[misc, valid-type]
        def bind(self, address: Any) -> None:
            if self.family == socket.AF_INET6:
                raise OSError(code, "no IPv6 here")
            super().bind(address)

    monkeypatch.setattr(socket, "has_ipv6", True)
    monkeypatch.setattr(socket, "socket", Socket)
    [sock] = _bind(bound, "")
    assert sock.family == socket.AF_INET


def test_loopback_only(bound: list[socket.socket]) -> None:
    [sock] = _bind(bound, "127.0.0.1")
    assert sock.getsockname()[0] == "127.0.0.1"


def test_a_port_in_use(bound: list[socket.socket]) -> None:
    [holder] = _bind(bound, "127.0.0.1")
    port = holder.getsockname()[1]
    with pytest.raises(listen.ListenError) as caught:
        listen.bind_sockets("127.0.0.1", port)
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    with pytest.raises(listen.ListenError, match=f"cannot listen on 0.0.0.0:{port}: Address"):
        listen.bind_sockets("", port)


def test_an_address_that_does_not_resolve() -> None:
    with pytest.raises(listen.ListenError, match=r"cannot listen on no-such-host\.invalid:0: "):
        listen.bind_sockets("no-such-host.invalid", 0)


# --- Unix socket -----------------------------------------------------------------------------


def test_a_regular_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_text("keep me")
    with pytest.raises(listen.ListenError) as caught:
        listen.bind_unix_socket(str(path))
    assert str(caught.value) == (
        f"invalid value for --unix_socket: {path} exists and is not a socket"
    )
    assert path.read_text() == "keep me"


def test_a_stale_socket_file_is_replaced(tmp_path: Path, bound: list[socket.socket]) -> None:
    path = tmp_path / "stamen.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))
    sock = listen.bind_unix_socket(str(path))
    bound.append(sock)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))  # the new socket listens


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's abstract sockets")
def test_an_abstract_socket_name_has_no_file(bound: list[socket.socket]) -> None:
    name = f"\0stamen-test-{uuid.uuid4().hex}"
    bound.append(listen.bind_unix_socket(name))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(name)


# --- the command: one line, exit status 3 ----------------------------------------------------


@pytest.fixture
def in_empty_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    # main() passes -b & co. through Celery's variables, as ``celery`` does; restore them.
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_LOADER"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("in_empty_dir")
def test_stamen_on_a_regular_file_is_one_line_and_status_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "x"
    path.touch()
    assert cli.main(["-b", "memory://", f"--unix_socket={path}"]) == 3
    err = capsys.readouterr().err
    assert (
        err
        == f"stamen: error: invalid value for --unix_socket: {path} exists and is not a socket\n"
    )


@pytest.mark.usefixtures("in_empty_dir")
def test_stamen_on_a_port_in_use_is_one_line_and_status_3(
    capsys: pytest.CaptureFixture[str], bound: list[socket.socket]
) -> None:
    [holder] = _bind(bound, "127.0.0.1")
    port = holder.getsockname()[1]
    assert cli.main(["-b", "memory://", f"--port={port}", "--address=127.0.0.1"]) == 3
    err = capsys.readouterr().err
    assert err == f"stamen: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


# --- python -m stamen -A proj flower ---------------------------------------------------------


@pytest.mark.parametrize("word", cli.SERVER_WORDS)
def test_flower_or_stamen_as_the_command_is_the_server(word: str) -> None:
    inv = cli.parse_invocation(["-A", "proj", word, "--port=5555", "--debug"])
    assert inv.command is None
    assert inv.celery == {"app": "proj"}
    assert inv.options == ["--port=5555", "--debug"]
    assert cli.parse_invocation([word]).command is None
    # Celery's options after the word are still Celery's (ours are taken anywhere).
    assert cli.parse_invocation([word, "-A", "proj", "-q"]).celery == {"app": "proj", "quiet": True}


def test_the_word_is_only_the_command() -> None:
    assert cli.parse_invocation(["--conf", "flower"]).options == ["--conf", "flower"]
    assert cli.parse_invocation(["demo", "--port=1"]).command == "demo"
    assert cli.parse_invocation(["check", "http://x", "--user=u"]).args == [
        "http://x",
        "--user=u",
    ]
    assert cli.parse_invocation(["db", "upgrade"]).args == ["upgrade"]
    for argv, extra in ((["flower", "demo"], "demo"), (["flower", "stamen"], "stamen")):
        with pytest.raises(ConfigError, match=f"unexpected argument '{extra}'"):
            cli.parse_invocation(argv)
    with pytest.raises(ConfigError, match="unexpected argument 'flower'"):
        cli.parse_invocation(["demo", "flower"])


@pytest.mark.usefixtures("in_empty_dir")
def test_main_serves_for_the_flower_word(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Settings] = []

    def fake_run_server(settings: Settings, celery_app: Any, *, quiet: bool) -> int:
        calls.append(settings)
        return 0

    monkeypatch.setattr(cli, "run_server", fake_run_server)
    assert cli.main(["-b", "memory://", "flower", "--port=6011"]) == 0
    assert [s.port for s in calls] == [6011]


def test_help_shows_the_flower_word(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "flower, stamen" in out and "python -m stamen -A proj flower" in out
