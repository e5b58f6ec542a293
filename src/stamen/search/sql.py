"""Compile a parsed search query (``stamen.search.parser``) into an indexed SQLite condition.

The store appends the condition to ``SELECT ... FROM tasks WHERE`` so a search costs index
lookups, not a scan of every task (DESIGN rule 3). Substring terms go through the FTS5
trigram index ``tasks_fts``; ``state:`` uses the ``tasks_by_state`` index; ``kwargs:k=v`` is
narrowed by the index and confirmed by the SQL function ``stamen_kwpair`` (registered with
``register_functions`` on every connection), which applies Flower's exact pair rule.

Sibling index lookups are merged into one FTS5 ``MATCH`` expression (``a b`` becomes
``"a" AND "b"``), so FTS5 intersects its posting lists itself.

Where this differs from Flower's in-memory engine (all rare, none worth a scan):

* Case folding. Flower compares ``str.casefold()`` text; FTS5 folds with SQLite's own
  one-to-one table. A stored ``ß``/``ẞ``, a Latin ligature (``ﬀ ﬁ ﬂ ﬃ ﬄ ﬅ ﬆ``) or a
  dotted ``İ`` is found by a query spelling the same character (in any case), but not by
  its full folding (``ss``, ``ff``, ``st``, ``i̇``...) as Flower would. Queries containing
  such characters search both the folded and the typed spelling (``Term.original``), so
  ``Straße`` finds ``straße``, ``STRASSE`` and ``strasse``. The FTS narrowing of
  ``kwargs:key=value`` folds the same way (``kwargs:x=strasse`` misses a stored
  ``{'x': 'Straße'}``); refusing to narrow on every ``ss``/``st``/``fi`` instead would turn
  common queries into scans. SQLite's table is also older than Python's Unicode, so case
  pairs added to Unicode recently may not fold.
* A term containing a NUL character matches nothing (Flower could match it across the
  ``\\0`` separators of its combined text; FTS5 cannot take NUL in a query).
* ``kwargs:key=value`` narrows by FTS only with key/value parts that a Python repr (or the
  store's JSON) of the kwargs contains verbatim: no quotes, backslashes, brackets, commas
  or float exponents. If the stored kwargs text is written some other way (a literal with
  escapes like ``'\\x41'``) and the part is spelt differently there, that task can be
  missed; Celery always sends reprs. Stored JSON with ``true``/``false``/``null`` yields
  pairs (the store writes real dicts that way) where Flower, given such a *string*, would
  find none.
* Plain terms match the state text through ``states``, the distinct states the caller
  says are stored; a state missing from that list is not matched by a plain term.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from .parser import KwargPair, Node, Or, StateIs, Term, kwargs_pairs

__all__ = ["compile_query", "register_functions"]

#: Characters that make a kwargs part unsafe for FTS narrowing: a repr may escape or
#: re-space them, so the stored text need not contain the part verbatim.
_REPR_SENSITIVE = frozenset("'\"\\[](){},")
_MIN_PHRASE = 3  # FTS5 trigram phrases shorter than this match nothing
_FTS_IN = "tasks.id IN (SELECT rowid FROM tasks_fts WHERE tasks_fts MATCH ?)"


def uses_fts(expr: str) -> bool:
    """Whether a compiled condition looks anything up in the search index."""
    return _FTS_IN in expr


def fts_not_driving(expr: str) -> str:
    """The same condition, but SQLite may no longer drive the query from the index.

    For a broad term, walking the sort index and probing the (materialised) match set is
    far cheaper than fetching and sorting every match; a unary ``+`` on ``tasks.id`` is
    SQLite's way to say so. The rows selected do not change.
    """
    return expr.replace(_FTS_IN, "+" + _FTS_IN)


def is_lookup(expr: str) -> bool:
    """Whether a compiled condition is one search-index lookup and nothing else."""
    return expr == _FTS_IN


def counts_as_fts(expr: str) -> str | None:
    """A count of the tasks matching ``expr`` straight from the search index (whose rows
    are the stored tasks, one each) when ``expr`` is nothing but one index lookup; that
    skips visiting every matching task row, several times cheaper for a broad term."""
    return "SELECT count(*) FROM tasks_fts WHERE tasks_fts MATCH ?" if is_lookup(expr) else None


def fts_slots(expr: str) -> list[int]:
    """Positions, among a compiled condition's parameters, of its FTS5 ``MATCH`` queries.

    Compiled conditions hold no literals, so every ``?`` is a parameter.
    """
    slots: list[int] = []
    start = expr.find(_FTS_IN)
    while start >= 0:
        slots.append(expr.count("?", 0, start))
        start = expr.find(_FTS_IN, start + len(_FTS_IN))
    return slots


def with_id_sets(expr: str) -> str:
    """The same condition with each search-index lookup replaced by membership in a JSON
    array of task ids, passed in place of that lookup's ``MATCH`` parameter (the caller
    asks the index itself, restricted to the rows it cares about)."""
    return expr.replace(_FTS_IN, _IDS_IN)


_IDS_IN = "tasks.id IN (SELECT value FROM json_each(?))"
_ASCII_LOWER = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "abcdefghijklmnopqrstuvwxyz",
)


def compile_query(node: Node | None, states: Iterable[str]) -> tuple[str, list[object]]:
    """Return ``(sql, params)``: a condition on table ``tasks`` that holds exactly for the
    tasks Flower's engine would match (see the module docstring for the rare exceptions).

    ``node`` comes from ``parse_query`` (``None`` matches every task). ``states`` are the
    distinct states currently stored; plain terms also match them as text, as Flower's
    combined text includes the state. Compiled conditions are cached per (node, states).
    """
    if node is None:
        return "1", []
    sql, params = _compile_cached(node, frozenset(s for s in states if isinstance(s, str)))
    return sql, list(params)


def register_functions(conn: sqlite3.Connection) -> None:
    """Register ``stamen_kwpair(kwargs_text, pair)`` (1 when the task's normalised kwargs
    contain ``pair``, else 0) on ``conn``. The store calls this on every connection.
    """
    conn.create_function("stamen_kwpair", 2, _kwpair, deterministic=True)


def _kwpair(kwargs_text: object, pair: object) -> int:
    if kwargs_text is None or not isinstance(pair, str):
        return 0
    return int(pair in _cached_pairs(kwargs_text))


@functools.lru_cache(maxsize=4096)
def _cached_pairs(kwargs_text: object) -> frozenset[str]:
    """``kwargs_pairs`` of a stored kwargs column.

    Cached because a query confirms the pair on many rows and ``literal_eval`` is slow, and
    because many tasks of one type share the same kwargs text. The store keeps a kwargs
    value that arrived as a real dict (not Celery's usual repr string) as JSON; Flower would
    have indexed that dict, so JSON that ``literal_eval`` rejects (``true``, ``null``) is
    read back as JSON.
    """
    pairs = kwargs_pairs(kwargs_text)
    if pairs or not isinstance(kwargs_text, str) or not kwargs_text.startswith("{"):
        return pairs
    try:
        return kwargs_pairs(orjson.loads(kwargs_text))
    except orjson.JSONDecodeError:
        return pairs


@dataclass(frozen=True, slots=True)
class _Part:
    """A compiled node: ``fts`` (an FTS5 MATCH expression) AND ``sql`` (a condition).

    Keeping the FTS side apart until rendering lets And/Or merge it with siblings.
    """

    fts: str | None = None
    sql: str | None = None
    params: tuple[object, ...] = ()


_FALSE = _Part(sql="0")


@functools.lru_cache(maxsize=512)
def _compile_cached(node: Node, states: frozenset[str]) -> tuple[str, tuple[object, ...]]:
    return _render(_compile(node, states))


def _render(part: _Part) -> tuple[str, tuple[object, ...]]:
    if part.fts is None:
        assert part.sql is not None  # every node yields at least one side
        return part.sql, part.params
    if part.sql is None:
        return _FTS_IN, (part.fts,)
    return f"({_FTS_IN} AND {part.sql})", (part.fts, *part.params)


def _compile(node: Node, states: frozenset[str]) -> _Part:
    if isinstance(node, Term):
        return _term(node, states)
    if isinstance(node, StateIs):
        return _state_is(node.value, states)
    if isinstance(node, KwargPair):
        return _kwarg_pair(node)
    parts = [_compile(child, states) for child in node.children]
    combine = _or if isinstance(node, Or) else _and
    return combine(parts)


def _and(parts: list[_Part]) -> _Part:
    fts = [part.fts for part in parts if part.fts is not None]
    sql = [part.sql for part in parts if part.sql is not None]
    return _Part(
        fts=" AND ".join(f"({expr})" for expr in fts) if fts else None,
        sql=(sql[0] if len(sql) == 1 else f"({' AND '.join(sql)})") if sql else None,
        params=tuple(param for part in parts if part.sql is not None for param in part.params),
    )


def _or(parts: list[_Part]) -> _Part:
    pure = [part.fts for part in parts if part.sql is None and part.fts is not None]
    mixed = [part for part in parts if part.sql is not None]
    merged = " OR ".join(f"({expr})" for expr in pure) if pure else None
    if not mixed:
        return _Part(fts=merged)
    sql: list[str] = []
    params: list[object] = []
    if merged is not None:
        sql.append(_FTS_IN)
        params.append(merged)
    for part in mixed:
        text, values = _render(part)
        sql.append(text)
        params.extend(values)
    return _Part(sql=f"({' OR '.join(sql)})", params=tuple(params))


def _term(term: Term, states: frozenset[str]) -> _Part:
    if "\0" in term.value:
        return _FALSE
    spellings = [term.value]
    if term.original is not None and term.original != term.value:
        spellings.append(term.original)
    prefix = "" if term.field is None else f"{{{term.field}}} : "
    fts = " OR ".join(f"{prefix}{_phrase(text)}" for text in spellings)
    if term.field is not None:
        return _Part(fts=fts)
    # Flower's combined text also holds the state, which the FTS table does not.
    named = sorted(state for state in states if term.value in state.casefold())
    if not named:
        return _Part(fts=fts)
    # COLLATE NOCASE lets SQLite use tasks_by_state for this arm of the OR; it adds only
    # states differing in ASCII case from a listed one, and those are listed too.
    marks = ", ".join("?" * len(named))
    return _Part(
        sql=f"({_FTS_IN} OR tasks.state COLLATE NOCASE IN ({marks}))",
        params=(fts, *named),
    )


def _state_is(value: str, states: frozenset[str]) -> _Part:
    # NOCASE equality is ASCII-only; a stored state that casefold()s to the value but
    # differs in non-ASCII case (an exotic custom state) is added by name.
    ascii_value = value.translate(_ASCII_LOWER)
    extra = sorted(
        state
        for state in states
        if state.casefold() == value and state.translate(_ASCII_LOWER) != ascii_value
    )
    if not extra:
        return _Part(sql="tasks.state = ? COLLATE NOCASE", params=(value,))
    marks = ", ".join("?" * len(extra))
    return _Part(
        sql=f"(tasks.state = ? COLLATE NOCASE OR tasks.state COLLATE NOCASE IN ({marks}))",
        params=(value, *extra),
    )


def _kwarg_pair(node: KwargPair) -> _Part:
    confirm = _Part(sql="stamen_kwpair(tasks.kwargs, ?)", params=(node.pair,))
    if node.original is not None:  # FTS folding would disagree with casefold(); no narrowing
        return confirm
    narrow = [_phrase(text) for text in (node.key, node.value) if _narrows(text)]
    if not narrow:
        return confirm
    fts = " AND ".join(f"{{kwargs}} : {phrase}" for phrase in narrow)
    return _Part(fts=fts, sql=confirm.sql, params=confirm.params)


def _narrows(text: str) -> bool:
    """Whether a kwargs key/value surely appears verbatim in the stored text of matching
    kwargs (a Python repr, or JSON for dicts the store serialised itself)."""
    return (
        len(text) >= _MIN_PHRASE
        and "\0" not in text
        and text.isprintable()
        and _REPR_SENSITIVE.isdisjoint(text)
        and not _is_float_with_exponent(text)
    )


def _is_float_with_exponent(text: str) -> bool:
    # Python writes 1e+16 and 1e-05 where JSON has 1e16 and 1e-5.
    if "e" not in text:
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


def _phrase(text: str) -> str:
    """An FTS5 string literal: any text inside double quotes, with quotes doubled."""
    return '"' + text.replace('"', '""') + '"'
