"""Reading request arguments the way Flower's clients send them.

Flower takes every argument from the query string or a form-encoded body (last one wins,
whitespace stripped) and answers bad values with 400 and a fixed text. Unlike Flower we do
not HTML-escape values on input (that corrupted queue names and searches with ``&``);
values are escaped where they are rendered instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.datastructures import FormData
from starlette.requests import Request

from stamen.web.errors import ApiError

T = TypeVar("T")

_TRUE = frozenset({"y", "yes", "t", "true", "on", "1"})
_FALSE = frozenset({"n", "no", "f", "false", "off", "0"})


def strtobool(value: str) -> bool:
    """Python's old ``distutils`` rule, which Flower uses for boolean arguments."""
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(value)


_TYPE_NAMES: dict[Callable[..., Any], str] = {int: "int", float: "float", bool: "bool", str: "str"}


class Args:
    """The merged arguments of one request."""

    def __init__(self, query: list[tuple[str, str]], form: FormData | None = None) -> None:
        self._values: dict[str, str] = {}
        for key, value in query:
            self._values[key] = value
        if form is not None:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    self._values[key] = value

    @classmethod
    async def of(cls, request: Request) -> Args:
        form = None
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and (
            content_type.startswith("application/x-www-form-urlencoded")
            or content_type.startswith("multipart/form-data")
        ):
            form = await request.form()
        return cls(request.query_params.multi_items(), form)

    def raw(self, name: str) -> str | None:
        value = self._values.get(name)
        return None if value is None else value.strip()

    def get(
        self,
        name: str,
        kind: Callable[[str], T] = str,  # type: ignore[assignment]
        default: T | None = None,
        *,
        required: bool = False,
    ) -> T | None:
        """The converted value; 400 ``Missing argument``/``Invalid argument`` as Flower."""
        value = self.raw(name)
        if value is None or (required and value == ""):
            if required:
                raise ApiError(400, f"Missing argument {name}")
            return default
        try:
            if kind is bool:
                return strtobool(value)  # type: ignore[return-value]
            return kind(value)
        except (TypeError, ValueError):
            raise ApiError(
                400, f"Invalid argument '{value}' of type '{_TYPE_NAMES.get(kind, 'str')}'"
            ) from None
