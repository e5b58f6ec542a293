"""The documentation says what the code does."""

from __future__ import annotations

from pathlib import Path

from stamen.config import OPTIONS
from stamen.docs_options import render

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_options_page_is_generated_from_the_registry() -> None:
    assert (DOCS / "options.md").read_text() == render(), (
        "docs/options.md is stale: run `python -m stamen.docs_options`"
    )


def test_every_option_is_documented() -> None:
    text = (DOCS / "options.md").read_text()
    for option in OPTIONS:
        assert f"`--{option.name}`" in text or f"`{option.name}`" in text, option.name
