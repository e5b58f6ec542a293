"""Where Stamen listens: the sockets, bound the way Flower's Tornado binds them.

``--address=''`` listens on every IPv4 and IPv6 interface (``bind_sockets``), a
``--unix_socket`` replaces a stale socket file but no other file (``bind_unix_socket``),
and a port or path that cannot be used is one ``ListenError`` line for the user, before
anything else starts. ``stamen.server`` hands the sockets to uvicorn.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from typing import Any

#: The exit status when Stamen cannot listen where it is told to (a port in use, a
#: ``--unix_socket`` path that is not a socket...): uvicorn's status for a failed start.
EXIT_CANNOT_LISTEN = 3
BACKLOG = 2048  # uvicorn's default


class ListenError(Exception):
    """Stamen cannot listen where it was told to; the message is one line for the user."""


def _where(host: str, port: int) -> str:
    """``host:port``, ``[v6]:port``, and ``*:port`` for every interface."""
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def bind_sockets(address: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening TCP sockets for ``--address``/``--port``, made as Tornado's ``bind_sockets``
    (so Flower) makes them: one per address the name resolves to, ``''`` meaning every
    interface of both families (``0.0.0.0`` and ``::``, the IPv6 one with ``IPV6_V6ONLY`` so
    that the two do not clash), and ``::`` IPv6 only. With port 0 every socket gets the port
    the first one was given. IPv6 is skipped for ``''`` and ``localhost`` when the host does
    not support it. Raises ``ListenError``."""
    host = address or None
    family = socket.AF_UNSPEC if socket.has_ipv6 else socket.AF_INET
    try:
        found = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ListenError(f"cannot listen on {_where(address, port)}: {reason}") from None
    infos = sorted(set(found), key=lambda info: (info[0], str(info[4])))
    attempts = 5 if port == 0 else 1  # port 0: the port IPv4 got may be taken on IPv6
    for attempt in range(attempts):
        sockets: list[socket.socket] = []
        try:
            _bind_each(infos, address, sockets, backlog)
        except _Taken:
            for sock in sockets:
                sock.close()
            if attempt + 1 < attempts:
                continue
            raise ListenError(f"cannot listen on {_where(address, port)}: no free port") from None
        except ListenError:
            for sock in sockets:
                sock.close()
            raise
        if not sockets:
            raise ListenError(f"cannot listen on {_where(address, port)}: no usable address")
        return sockets
    raise AssertionError("unreachable")  # pragma: no cover


class _Taken(Exception):
    """Port 0: the port the first socket was given is in use for another family."""


def _bind_each(infos: list[Any], address: str, sockets: list[socket.socket], backlog: int) -> None:
    bound_port: int | None = None
    for af, socktype, proto, _name, sockaddr in infos:
        if sys.platform == "darwin" and address == "localhost" and af == socket.AF_INET6:
            if sockaddr[3] != 0:  # macOS's link-local fe80::1%lo0, skipped as Tornado does
                continue
        any_port = sockaddr[1] == 0
        if any_port and bound_port is not None:
            sockaddr = (sockaddr[0], bound_port, *sockaddr[2:])
        sock: socket.socket | None = None
        try:
            sock = socket.socket(af, socktype, proto)
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(backlog)
        except OSError as exc:
            if sock is not None:
                sock.close()
            if (
                af == socket.AF_INET6
                and address in ("", "localhost")
                and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
            ):
                continue  # IPv6 off on this host (a default Docker network): IPv4 only
            if exc.errno == errno.EADDRINUSE and any_port and bound_port is not None:
                raise _Taken from None
            where = _where(sockaddr[0], sockaddr[1])
            raise ListenError(f"cannot listen on {where}: {_reason(exc)}") from None
        sock.setblocking(False)
        sockets.append(sock)
        bound_port = sock.getsockname()[1]


def bind_unix_socket(path: str, backlog: int = BACKLOG, mode: int = 0o777) -> socket.socket:
    """A listening Unix socket at ``path``, as Tornado's ``bind_unix_socket`` makes it for
    Flower's ``--unix_socket`` (mode 0o777): a socket file left by an earlier run is
    replaced, any other file there is an error; a name starting with a NUL byte is Linux's
    abstract namespace (no file). Raises ``ListenError``."""
    in_filesystem = not path.startswith("\0")
    if in_filesystem:
        _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if in_filesystem:
            os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on --unix_socket={path}: {_reason(exc)}") from None
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"cannot listen on --unix_socket={path}: {_reason(exc)}") from None
    if not stat.S_ISSOCK(existing.st_mode):
        raise ListenError(f"invalid value for --unix_socket: {path} exists and is not a socket")
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        reason = _reason(exc)
        raise ListenError(
            f"cannot replace the socket file --unix_socket={path}: {reason}"
        ) from None


def listen(settings: Any) -> list[socket.socket]:
    """The sockets ``settings`` asks for: ``--unix_socket`` if set, else TCP on
    ``--address``/``--port``. Raises ``ListenError``."""
    if settings.unix_socket:
        return [bind_unix_socket(settings.unix_socket)]
    return bind_sockets(settings.address or "", settings.port)


def describe(sockets: list[socket.socket]) -> str:
    """Where the sockets listen, for the log: ``0.0.0.0:5555, [::]:5555``."""
    names = []
    for sock in sockets:
        name = sock.getsockname()
        names.append(_where(name[0], name[1]) if isinstance(name, tuple) else f"unix socket {name}")
    return ", ".join(names)
