"""Compile a parsed search query (``stamen.search.parser``) into an indexed PostgreSQL condition.

The PostgreSQL twin of ``stamen.search.sql``: the same tree, the same matches, other means.
The store appends the condition to ``SELECT ... FROM tasks WHERE`` (``%s`` placeholders,
psycopg style), so a search costs index lookups, not a scan (DESIGN rule 3):

* Substring terms become ``column ILIKE '%term%'`` on each searchable column (an ``OR``
  over the columns for a plain term, so it never spans two fields, as in Flower), ANDed
  with the same test on ``SEARCH_TEXT``, all those columns in one value, which the
  ``pg_trgm`` GIN index ``tasks_trgm`` serves.
* ``state:`` and the state arm of plain terms compare SQLite's ``NOCASE`` folding (ASCII
  only), written as ``translate(state, 'A..Z', 'a..z')`` and served by an expression index.
* ``kwargs:k=v`` tests the ``kwargs_pairs`` array the writer stores next to each task: the
  normalised pairs Flower indexes (``kwargs_pairs`` of the stored text, computed in Python
  at write time with the very function the SQLite ``stamen_kwpair`` uses), with a GIN index.
  So the pair rule is exact and indexed, without the narrowing caveats of the SQLite side.

Where this differs from Flower (and from the SQLite compiler):

* Case folding. ``ILIKE`` folds both sides with the database's ``lower()`` (its ``LC_CTYPE``;
  ``C.UTF-8`` or any ``*.UTF-8`` locale folds Unicode one-to-one, a plain ``C`` locale folds
  ASCII only). As in SQLite, queries whose ``casefold()`` is not a plain lowercase also search
  the typed spelling (``Term.original``), so ``Straße`` finds ``straße`` and ``STRASSE``, but
  ``strasse`` does not find ``Straße``.
* A term containing NUL matches nothing; PostgreSQL text cannot hold NUL, so the writer stores
  a stored NUL as U+FFFD.
* Plain terms match the state text through ``states`` (as in SQLite).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from stamen.store.schema import FTS_COLUMNS

from .parser import And, KwargPair, Node, Or, StateIs, Term

__all__ = [
    "SEARCH_COLUMNS",
    "SEARCH_TEXT",
    "compile_query",
    "has_kwargs_pair",
    "like_pattern",
    "nocase",
    "nocase_c",
]

#: Columns a plain term looks into (the same as SQLite's ``tasks_fts``).
SEARCH_COLUMNS: tuple[str, ...] = FTS_COLUMNS
_ASCII_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ASCII_LOWER = str.maketrans(_ASCII_UPPER, _ASCII_UPPER.lower())


#: All searchable text of a task in one value, for the one trigram index (``tasks_trgm``).
#: A term found in a column is found here, so ``SEARCH_TEXT ILIKE p`` is a safe pre-filter
#: that one GIN lookup answers; the per-column conditions ANDed with it keep the result
#: exact (a term never spans two fields). One index instead of one per column also makes
#: writes cheaper. The schema indexes exactly this expression text.
SEARCH_TEXT = (
    "(" + " || E'\\x01' || ".join(f"coalesce(tasks.{c}, '')" for c in SEARCH_COLUMNS) + ")"
)


def nocase(expr: str) -> str:
    """SQLite's ``COLLATE NOCASE`` folding of ``expr`` (ASCII letters only) in PostgreSQL.

    Immutable, so expression indexes use it; the schema builds them with this very text.
    """
    return f"translate({expr}, '{_ASCII_UPPER}', '{_ASCII_UPPER.lower()}')"


def nocase_c(expr: str) -> str:
    """``nocase(expr)`` in code point order (``COLLATE "C"``, SQLite's order), the form the
    ``tasks_by_<column>`` indexes hold: filters compare it (equality is the same under any
    deterministic collation) and sorts order by it, so one index serves both."""
    return f'({nocase(expr)}) COLLATE "C"'


def ascii_lower(text: str) -> str:
    """The Python side of ``nocase``: what a parameter compared to ``nocase(col)`` must be."""
    return text.translate(_ASCII_LOWER)


def like_pattern(text: str) -> str:
    """``%text%`` for ``LIKE``/``ILIKE`` with the default ``\\`` escape, wildcards escaped."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def compile_query(node: Node | None, states: Iterable[str]) -> tuple[str, list[object]]:
    """Return ``(sql, params)``: a condition on table ``tasks`` matching the same tasks as
    ``stamen.search.sql.compile_query`` (see the module docstring). ``None`` matches all.
    """
    if node is None:
        return "TRUE", []
    sql, params = _compile_cached(node, frozenset(s for s in states if isinstance(s, str)))
    return sql, list(params)


def has_kwargs_pair(node: Node) -> bool:
    """Whether a ``kwargs:key=value`` test occurs anywhere in ``node`` (the reader orders
    such searches so that the planner cannot guess their selectivity wrong)."""
    if isinstance(node, KwargPair):
        return True
    if isinstance(node, (And, Or)):
        return any(has_kwargs_pair(child) for child in node.children)
    return False


_Compiled = tuple[str, tuple[object, ...]]
_FALSE: _Compiled = ("FALSE", ())


@functools.lru_cache(maxsize=512)
def _compile_cached(node: Node, states: frozenset[str]) -> _Compiled:
    return _compile(node, states)


def _compile(node: Node, states: frozenset[str]) -> _Compiled:
    if isinstance(node, Term):
        return _term(node, states)
    if isinstance(node, StateIs):
        return _state_is(node.value, states)
    if isinstance(node, KwargPair):
        # The writer stores NUL as U+FFFD (PostgreSQL text cannot hold it); so does the query.
        return "tasks.kwargs_pairs @> ARRAY[%s]::text[]", (node.pair.replace("\0", "\ufffd"),)
    parts = [_compile(child, states) for child in node.children]
    joiner = " OR " if isinstance(node, Or) else " AND "
    return (
        "(" + joiner.join(sql for sql, _ in parts) + ")",
        tuple(param for _, params in parts for param in params),
    )


def _term(term: Term, states: frozenset[str]) -> _Compiled:
    if "\0" in term.value:
        return _FALSE
    spellings = [term.value]
    if term.original is not None and term.original != term.value:
        spellings.append(term.original)
    columns = SEARCH_COLUMNS if term.field is None else (term.field,)
    inner = " OR ".join(f"tasks.{column} ILIKE %s" for column in columns)
    arms = [f"({SEARCH_TEXT} ILIKE %s AND ({inner}))" for _ in spellings]
    params: list[object] = [
        pattern for text in spellings for pattern in [like_pattern(text)] * (len(columns) + 1)
    ]
    if term.field is None:
        # Flower's combined text also holds the state.
        named = sorted(state for state in states if term.value in state.casefold())
        if named:
            arms.append(f"{nocase_c('tasks.state')} = ANY(%s)")
            params.append(sorted({ascii_lower(state) for state in named}))
    sql = arms[0] if len(arms) == 1 else "(" + " OR ".join(arms) + ")"
    return sql, tuple(params)


def _state_is(value: str, states: frozenset[str]) -> _Compiled:
    # NOCASE equality is ASCII-only; a stored state that casefold()s to the value but
    # differs in non-ASCII case (an exotic custom state) is added by name.
    folded = {ascii_lower(value)}
    folded.update(ascii_lower(state) for state in states if state.casefold() == value)
    if len(folded) == 1:
        return f"{nocase_c('tasks.state')} = %s", (folded.pop(),)
    return f"{nocase_c('tasks.state')} = ANY(%s)", (sorted(folded),)
