"""Flower's task search language (spec 6.3), parsed into a small immutable syntax tree.

This is the pure front half of task search: ``parse_query`` turns the text typed into
``/api/tasks?search=`` or the tasks page search box into a tree of ``And`` / ``Or`` /
``Term`` / ``StateIs`` / ``KwargPair`` nodes, or raises ``SearchError`` carrying Flower's
exact message. ``stamen.search.sql`` compiles the tree into indexed SQL. Nothing here
touches the database, so the same tree can serve any store.

Values in the tree are case-folded (``str.casefold``) because Flower compares case-folded
text. Parsing is cached (LRU of 512 texts, failures included) because the tasks page sends
the same query on every refresh and page change.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from typing import TypeAlias

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
    "kwargs_pairs",
    "parse_query",
]

#: Qualifiers recognised before a colon (compared case-insensitively).
FIELDS = frozenset({"name", "state", "worker", "args", "kwargs", "result"})
MAX_QUERY_LENGTH = 2048
MAX_TOKENS = 128
MAX_DEPTH = 5
#: Substring terms need this many non-blank characters; it is also the FTS5 trigram width.
MIN_TERM_LENGTH = 3


class SearchError(ValueError):
    """A query Flower would reject; ``str()`` is Flower's message, shown to users verbatim.

    ``reason`` is the bare message and ``position`` the 0-based offset in the trimmed query
    (``None`` for the length and token-count limits, which Flower reports without one).
    """

    def __init__(self, reason: str, position: int | None = None) -> None:
        self.reason = reason
        self.position = position
        text = reason if position is None else f"{reason} at position {position}."
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class Term:
    """Case-folded substring ``value`` of one field (``field``) or of any field (``None``).

    ``original`` is the value as typed, kept only when it holds non-ASCII characters whose
    ``casefold()`` is not a plain one-to-one lowercase (``ß``, ligatures, ``İ``, final sigma,
    ...): SQLite's FTS index folds case with a simpler table, so the compiler also searches
    the typed spelling. It takes part in equality on purpose: ``strasse`` and ``Straße``
    are different index lookups even though Flower treats them alike.
    """

    field: str | None
    value: str
    original: str | None = None


@dataclass(frozen=True, slots=True)
class StateIs:
    """``state:X``: the task's state equals ``value`` case-insensitively (never a substring)."""

    value: str


@dataclass(frozen=True, slots=True)
class KwargPair:
    """``kwargs:key=value``: the normalised pair ``key=value`` is among the task's kwargs.

    ``key`` and ``value`` are trimmed and case-folded; ``original`` follows ``Term.original``
    (set only when folding the typed text is not a plain lowercase) and tells the compiler
    not to narrow through the FTS index, whose folding would disagree.
    """

    key: str
    value: str
    original: str | None = None

    @property
    def pair(self) -> str:
        """The ``key=value`` string compared against ``kwargs_pairs`` of a task."""
        return f"{self.key}={self.value}"


@dataclass(frozen=True, slots=True)
class And:
    """All children match. Built flattened and without duplicates, with 2+ children."""

    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """Any child matches. Built flattened and without duplicates, with 2+ children."""

    children: tuple[Node, ...]


#: Any node of a parsed query.
Node: TypeAlias = And | Or | Term | StateIs | KwargPair


def parse_query(text: str) -> Node | None:
    """Parse a search query; ``None`` means "match every task" (empty or blank query).

    Raises ``SearchError`` with Flower's message for every query Flower rejects. Results and
    failures are cached per text, so repeated requests do not re-parse.
    """
    if not isinstance(text, str):  # Flower converts whatever it got to text first
        text = str(text)
    outcome = _parse_cached(text)
    if isinstance(outcome, _Failure):
        # A fresh exception per call: re-raising one cached instance would keep growing its
        # traceback and share it between threads.
        raise SearchError(outcome.reason, outcome.position)
    return outcome


def kwargs_pairs(kwargs: object) -> frozenset[str]:
    """Normalised ``key=value`` pairs of a task's kwargs, as Flower indexes them.

    Accepts a dict, or a string that ``ast.literal_eval`` turns into a dict (Celery events
    carry kwargs as a repr string). Keys and values are rendered with ``str()`` and
    case-folded, ``None`` becomes an empty value (``{'x': None}`` -> ``x=``). Anything else
    (a list, a truncated repr, garbage) gives an empty set: this runs inside SQL on stored
    rows, so it must never raise.
    """
    if isinstance(kwargs, str):
        if "{" not in kwargs:  # no dict literal possible; skip the costly literal_eval
            return _NO_PAIRS
        try:
            kwargs = ast.literal_eval(kwargs)
        except Exception:  # ValueError, SyntaxError, RecursionError, MemoryError-ish...
            return _NO_PAIRS
    if not isinstance(kwargs, dict):
        return _NO_PAIRS
    try:
        return frozenset(
            f"{str(key).casefold()}={'' if value is None else str(value).casefold()}"
            for key, value in kwargs.items()
        )
    except Exception:  # a value whose __str__ raises (only possible for real dicts)
        return _NO_PAIRS


_NO_PAIRS: frozenset[str] = frozenset()


# --- tokens -------------------------------------------------------------------------------

_WORD, _LPAREN, _RPAREN, _AND, _OR, _NOT = range(6)
_OPERATORS = {"AND": _AND, "OR": _OR, "NOT": _NOT}
_ESCAPABLE = ('"', "\\")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: int
    position: int
    text: str = ""
    #: Length of the leading run of characters that were neither quoted nor escaped; only
    #: those can form a qualifier (``name:``) or a negation (``-``).
    bare_prefix: int = 0


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    position: int | None


def _tokenize(query: str) -> list[_Token]:
    """Split a trimmed query into tokens, resolving quotes and escapes.

    Whitespace separates words; ``(`` and ``)`` are tokens of their own wherever they
    appear outside quotes. A word may mix bare and quoted parts (``args:"a b"``). ``\\"``
    and ``\\\\`` are escapes inside and outside quotes; any other backslash is literal.
    """
    tokens: list[_Token] = []
    i, n = 0, len(query)
    while i < n:
        char = query[i]
        if char.isspace():
            i += 1
        elif char == "(":
            tokens.append(_Token(_LPAREN, i))
            i += 1
        elif char == ")":
            tokens.append(_Token(_RPAREN, i))
            i += 1
        else:
            start = i
            parts: list[str] = []
            bare_prefix: int | None = None  # set at the first quoted/escaped character
            while i < n:
                char = query[i]
                if char.isspace() or char in "()":
                    break
                if char == "\\" and i + 1 < n and query[i + 1] in _ESCAPABLE:
                    if bare_prefix is None:
                        bare_prefix = len(parts)
                    parts.append(query[i + 1])
                    i += 2
                elif char == '"':
                    if bare_prefix is None:
                        bare_prefix = len(parts)
                    i = _read_quoted(query, i, parts)
                else:
                    parts.append(char)
                    i += 1
            text = "".join(parts)
            if bare_prefix is None:
                kind = _OPERATORS.get(text, _WORD)
                tokens.append(_Token(kind, start, text, len(parts)))
            else:
                tokens.append(_Token(_WORD, start, text, bare_prefix))
    return tokens


def _read_quoted(query: str, quote: int, parts: list[str]) -> int:
    """Append the content of the quoted phrase opening at ``quote``; return the index after it."""
    i, n = quote + 1, len(query)
    while i < n:
        char = query[i]
        if char == "\\" and i + 1 < n and query[i + 1] in _ESCAPABLE:
            parts.append(query[i + 1])
            i += 2
        elif char == '"':
            return i + 1
        else:
            parts.append(char)
            i += 1
    raise SearchError("Unterminated quoted phrase", quote)


# --- grammar ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _parse_cached(text: str) -> Node | _Failure | None:
    try:
        return _parse(text)
    except SearchError as error:
        return _Failure(error.reason, error.position)


def _parse(text: str) -> Node | None:
    query = text.strip()
    if len(query) > MAX_QUERY_LENGTH:
        raise SearchError(f"Query exceeds {MAX_QUERY_LENGTH} characters.")
    if not query:
        return None
    tokens = _tokenize(query)
    if len(tokens) > MAX_TOKENS:
        raise SearchError(f"Query exceeds {MAX_TOKENS} tokens.")
    parser = _Parser(tokens)
    node = parser.parse_or(0)
    leftover = parser.peek()
    if leftover is not None:  # parse_or stops only at the end or at a ')'
        raise SearchError("Unexpected ')'", leftover.position)
    return node


class _Parser:
    """Recursive descent: ``or := and (OR and)*``, ``and := primary ([AND] primary)*``."""

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._index = 0

    def peek(self) -> _Token | None:
        if self._index < len(self._tokens):
            return self._tokens[self._index]
        return None

    def _advance(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    def _require_operand(self, operator: _Token, name: str) -> None:
        following = self.peek()
        if following is None or following.kind in (_RPAREN, _AND, _OR):
            raise SearchError(f"{name} must be followed by a search term", operator.position)

    def parse_or(self, depth: int) -> Node:
        children = [self.parse_and(depth)]
        while (token := self.peek()) is not None and token.kind == _OR:
            self._advance()
            self._require_operand(token, "OR")
            children.append(self.parse_and(depth))
        return _combine(Or, children)

    def parse_and(self, depth: int) -> Node:
        children = [self.parse_primary(depth)]
        while (token := self.peek()) is not None and token.kind not in (_RPAREN, _OR):
            if token.kind == _AND:
                self._advance()
                self._require_operand(token, "AND")
            children.append(self.parse_primary(depth))  # explicit or implicit AND
        return _combine(And, children)

    def parse_primary(self, depth: int) -> Node:
        token = self.peek()
        if token is None or token.kind in (_AND, _OR):
            # Only reachable at the very start of the query or of a group: every other
            # place checks for an operand before descending.
            raise SearchError("Expected a search term", 0 if token is None else token.position)
        if token.kind == _NOT:
            raise SearchError("NOT is not supported", token.position)
        if token.kind == _RPAREN:
            raise SearchError("Unexpected ')'", token.position)
        self._advance()
        if token.kind == _WORD:
            return _make_term(token)
        # An opening parenthesis.
        if depth + 1 > MAX_DEPTH:
            raise SearchError(f"Query nesting exceeds {MAX_DEPTH} levels", token.position)
        following = self.peek()
        if following is None:
            raise SearchError("Missing closing parenthesis", token.position)
        if following.kind == _RPAREN:
            raise SearchError("Empty group", token.position)
        node = self.parse_or(depth + 1)
        if self.peek() is None:
            raise SearchError("Missing closing parenthesis", token.position)
        self._advance()  # the ')' that stopped parse_or
        return node


def _combine(kind: type[And] | type[Or], children: list[Node]) -> Node:
    """Flatten same-kind children and drop duplicates (first one wins, order kept)."""
    flat: dict[Node, None] = {}
    for child in children:
        for item in child.children if isinstance(child, kind) else (child,):
            flat.setdefault(item, None)
    if len(flat) == 1:
        return next(iter(flat))
    return kind(tuple(flat))


# --- terms --------------------------------------------------------------------------------


def _make_term(token: _Token) -> Node:
    text = token.text
    colon = text.find(":", 0, token.bare_prefix)
    field = text[:colon].lower() if colon > 0 else ""
    if field in FIELDS:
        return _make_qualified(token, field, text[colon + 1 :])
    if not text.strip():
        raise SearchError("Empty search term", token.position)
    if token.bare_prefix and text.startswith("-"):
        raise SearchError("Negation with '-' is not supported", token.position)
    _check_length(text, token)
    return Term(None, text.casefold(), _original(text))


def _make_qualified(token: _Token, field: str, value: str) -> Node:
    if not value.strip():
        raise SearchError("Search qualifier requires a value", token.position)
    if field == "state":
        return StateIs(value.strip().casefold())
    if field == "kwargs" and "=" in value:
        key, _, wanted = value.partition("=")
        key, wanted = key.strip(), wanted.strip()
        typed = f"{key}={wanted}"
        return KwargPair(key.casefold(), wanted.casefold(), _original(typed))
    _check_length(value, token)
    return Term(field, value.casefold(), _original(value))


def _check_length(value: str, token: _Token) -> None:
    if sum(1 for char in value if not char.isspace()) < MIN_TERM_LENGTH:
        raise SearchError(
            f"Substring search terms must contain at least {MIN_TERM_LENGTH} characters",
            token.position,
        )


def _original(typed: str) -> str | None:
    """The typed text when ``casefold()`` does more than a one-to-one lowercase of it."""
    if typed.isascii():
        return None
    for char in typed:
        if not char.isascii():
            lower = char.lower()
            if len(lower) != 1 or char.casefold() != lower:
                return typed
    return None
