"""OpenAPI descriptions of parameters that handlers read with Flower's own rules."""

from __future__ import annotations

from typing import Any


def params(*specs: tuple[str, str, str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``openapi_extra`` for query parameters given as ``(name, type, description)``."""
    return {
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": {"type": kind},
                "description": text,
            }
            for name, kind, text in specs
        ]
    }
