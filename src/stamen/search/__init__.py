"""Task search: Flower's query language (spec 6.3) parsed and compiled to indexed SQL.

``parse_query`` (pure, cached) gives a tree or raises ``SearchError`` with Flower's message;
``compile_query`` turns the tree into a condition on ``tasks`` that uses the FTS5 trigram
index; ``register_functions`` adds the SQL helper that condition may call.
"""

from __future__ import annotations

from .parser import (
    FIELDS,
    MAX_DEPTH,
    MAX_QUERY_LENGTH,
    MAX_TOKENS,
    MIN_TERM_LENGTH,
    And,
    KwargPair,
    Node,
    Or,
    SearchError,
    StateIs,
    Term,
    kwargs_pairs,
    parse_query,
)
from .sql import compile_query, register_functions

__all__ = [
    "FIELDS",
    "MAX_DEPTH",
    "MAX_QUERY_LENGTH",
    "MAX_TOKENS",
    "MIN_TERM_LENGTH",
    "And",
    "KwargPair",
    "Node",
    "Or",
    "SearchError",
    "StateIs",
    "Term",
    "compile_query",
    "kwargs_pairs",
    "parse_query",
    "register_functions",
]
