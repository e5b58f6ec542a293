"""Error answers in Flower's shape: a status and a plain-text message, never a traceback."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response


class ApiError(Exception):
    """Raised by a handler to answer ``status`` with ``message`` as plain text."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def plain(status: int, message: str = "", headers: dict[str, str] | None = None) -> Response:
    return Response(
        message,
        status_code=status,
        media_type="text/plain; charset=UTF-8",
        headers=headers,
    )


class FlowerJSON(Response):
    """JSON as Flower writes it: ``application/json; charset=UTF-8`` and ``</`` escaped."""

    media_type = "application/json; charset=UTF-8"

    def render(self, content: Any) -> bytes:
        try:
            body = orjson.dumps(content, default=str)
        except TypeError:  # an integer past 64 bits (a client sent it; the audit log kept it)
            body = json.dumps(content, default=str, ensure_ascii=False, separators=(",", ":"))
            body = body.encode()
        return body.replace(b"</", b"<\\/")


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return plain(exc.status, exc.message)
