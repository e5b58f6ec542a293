"""Table tests for the search language parser (spec 6.3): trees, errors, positions, limits."""

from __future__ import annotations

import pytest

from stamen.search import (
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


def t(value: str, field: str | None = None) -> Term:
    return Term(field, value)


PARSES: list[tuple[str, Node | None]] = [
    # Empty or blank: match everything.
    ("", None),
    ("   \t\n ", None),
    # Spec 6.3 examples.
    ("customer", t("customer")),
    ("name:fetch", t("fetch", "name")),
    ("state:FAILURE", StateIs("failure")),
    ("state:failure", StateIs("failure")),
    ("kwargs:priority=high", KwargPair("priority", "high")),
    ("kwargs:priority=HIGH", KwargPair("priority", "high")),
    ("customer result:timeout", And((t("customer"), t("timeout", "result")))),
    (
        "(state:FAILURE OR state:RETRY) result:timeout",
        And((Or((StateIs("failure"), StateIs("retry"))), t("timeout", "result"))),
    ),
    ('args:"hello world"', t("hello world", "args")),
    ('kwargs:label="some value"', KwargPair("label", "some value")),
    ("NAME:tasks.fetch", t("tasks.fetch", "name")),
    ("first OR second third", Or((t("first"), And((t("second"), t("third")))))),
    ("stateSTARTED", t("statestarted")),
    ("uuid:abc", t("uuid:abc")),
    ("first (first second)", And((t("first"), t("second")))),
    # Operators: uppercase only; explicit AND equals juxtaposition; OR looser than AND.
    ("foo AND bar", And((t("foo"), t("bar")))),
    ("foo and bar", And((t("foo"), t("and"), t("bar")))),
    ("one OR two OR three", Or((t("one"), t("two"), t("three")))),
    ("aaa bbb OR ccc ddd", Or((And((t("aaa"), t("bbb"))), And((t("ccc"), t("ddd")))))),
    ("aaa (bbb OR ccc)", And((t("aaa"), Or((t("bbb"), t("ccc")))))),
    ("(aaa OR bbb) OR (ccc OR aaa)", Or((t("aaa"), t("bbb"), t("ccc")))),
    ("((aaa))", t("aaa")),
    ("aaa aaa", t("aaa")),
    ("aaa AAA", t("aaa")),
    ("(((((aaa)))))", t("aaa")),  # 5 levels are allowed
    ("aaa(bbb)ccc", And((t("aaa"), t("bbb"), t("ccc")))),
    ("(aaa)OR(bbb)", Or((t("aaa"), t("bbb")))),
    # Quoting: operators and parentheses become text; escapes; quotes inside a token.
    ('"AND"', t("and")),
    ('"NOT"', t("not")),
    ('"a (b) c"', t("a (b) c")),
    ('"say \\"hi\\""', t('say "hi"')),
    ('"back\\\\slash"', t("back\\slash")),
    ('ab"cd"', t("abcd")),
    ('\\"quoted', t('"quoted')),
    ('"-foo"', t("-foo")),
    ('"uuid:abc"', t("uuid:abc")),
    ('"name:abc"', t("name:abc")),
    ("{'foo'", t("{'foo'")),
    ("a\\nb", t("a\\nb")),  # other backslashes are literal
    ('"  padded "', t("  padded ")),
    # Qualifiers.
    ("Worker:celery@host", t("celery@host", "worker")),
    ("RESULT:TimeOut", t("timeout", "result")),
    ("kwargs:priority", t("priority", "kwargs")),
    ('kwargs:" priority = high "', KwargPair("priority", "high")),
    ("kwargs:a=b", KwargPair("a", "b")),  # pairs are exempt from the length rule
    ("kwargs:flag=", KwargPair("flag", "")),
    ("kwargs:a=b=c", KwargPair("a", "b=c")),
    ("state:x", StateIs("x")),  # exempt from the length rule
    ("name:a:b:c", t("a:b:c", "name")),
    ("foo:name:abc", t("foo:name:abc")),
    ("args:-xyz", t("-xyz", "args")),
    ("abc-def", t("abc-def")),
    # Case folding.
    ("CUSTOMER", t("customer")),
    ("Straße", Term(None, "strasse", "Straße")),
    ("Ärger", t("ärger")),  # a one-to-one lowercase needs no original spelling
]


@pytest.mark.parametrize(("query", "expected"), PARSES)
def test_parses(query: str, expected: Node | None) -> None:
    assert parse_query(query) == expected


ERRORS: list[tuple[str, str]] = [
    ("ab", "Substring search terms must contain at least 3 characters at position 0."),
    ("  ab  ", "Substring search terms must contain at least 3 characters at position 0."),
    ("customer ab", "Substring search terms must contain at least 3 characters at position 9."),
    ("name:ab", "Substring search terms must contain at least 3 characters at position 0."),
    ("args:-x", "Substring search terms must contain at least 3 characters at position 0."),
    ('"a b"', "Substring search terms must contain at least 3 characters at position 0."),
    ("kwargs:ab", "Substring search terms must contain at least 3 characters at position 0."),
    ("foo or bar", "Substring search terms must contain at least 3 characters at position 4."),
    ('abc "def', "Unterminated quoted phrase at position 4."),
    ('args:"hello', "Unterminated quoted phrase at position 5."),
    ('"abc\\"', "Unterminated quoted phrase at position 0."),
    ('""', "Empty search term at position 0."),
    ('abc "  "', "Empty search term at position 4."),
    ("NOT abc", "NOT is not supported at position 0."),
    ("abc NOT def", "NOT is not supported at position 4."),
    ("abc OR NOT def", "NOT is not supported at position 7."),
    ("abc AND NOT def", "NOT is not supported at position 8."),
    ("-abc", "Negation with '-' is not supported at position 0."),
    ("abc -def", "Negation with '-' is not supported at position 4."),
    ("-", "Negation with '-' is not supported at position 0."),
    ('-"abc"', "Negation with '-' is not supported at position 0."),
    ("-name:abc", "Negation with '-' is not supported at position 0."),
    ("name:", "Search qualifier requires a value at position 0."),
    ('name:""', "Search qualifier requires a value at position 0."),
    ("abc STATE:", "Search qualifier requires a value at position 4."),
    ("kwargs: priority=high", "Search qualifier requires a value at position 0."),
    ("name:(abc)", "Search qualifier requires a value at position 0."),
    ("abc OR", "OR must be followed by a search term at position 4."),
    ("abc OR OR def", "OR must be followed by a search term at position 4."),
    ("abc OR AND def", "OR must be followed by a search term at position 4."),
    ("(abc OR) def", "OR must be followed by a search term at position 5."),
    ("abc AND", "AND must be followed by a search term at position 4."),
    ("abc AND OR def", "AND must be followed by a search term at position 4."),
    ("(abc AND)", "AND must be followed by a search term at position 5."),
    ("AND abc", "Expected a search term at position 0."),
    ("OR abc", "Expected a search term at position 0."),
    ("abc (OR def)", "Expected a search term at position 5."),
    ("abc)", "Unexpected ')' at position 3."),
    (")", "Unexpected ')' at position 0."),
    ("(abc)) def", "Unexpected ')' at position 5."),
    ("()", "Empty group at position 0."),
    ("abc (  )", "Empty group at position 4."),
    ("(abc", "Missing closing parenthesis at position 0."),
    ("abc (def (ghi)", "Missing closing parenthesis at position 4."),
    ("abc (", "Missing closing parenthesis at position 4."),
    ("((((((abc))))))", "Query nesting exceeds 5 levels at position 5."),
    ("abc (((((( def", "Query nesting exceeds 5 levels at position 9."),
    ("x" * 2049, "Query exceeds 2048 characters."),
    (" ".join(["abc"] * 129), "Query exceeds 128 tokens."),
    ("(abc) " * 43, "Query exceeds 128 tokens."),  # parentheses count as tokens
    (" OR ".join(["abc"] * 65), "Query exceeds 128 tokens."),  # and so do operators
]


@pytest.mark.parametrize(("query", "message"), ERRORS)
def test_errors(query: str, message: str) -> None:
    with pytest.raises(SearchError) as caught:
        parse_query(query)
    assert str(caught.value) == message


def test_limits_are_inclusive() -> None:
    assert parse_query("x" * 2048) == t("x" * 2048)
    assert parse_query(" " * 10 + "x" * 2048 + " " * 10) == t("x" * 2048)  # trimmed first
    assert isinstance(parse_query(" ".join(f"t{i:03}" for i in range(128))), And)
    assert isinstance(parse_query(" OR ".join(["abc", "def"] * 32)), Or)  # 127 tokens


def test_error_attributes() -> None:
    with pytest.raises(SearchError) as caught:
        parse_query("abc  ab")
    assert caught.value.reason == "Substring search terms must contain at least 3 characters"
    assert caught.value.position == 5
    with pytest.raises(SearchError) as caught:
        parse_query("a" * 3000)
    assert caught.value.position is None
    assert isinstance(caught.value, ValueError)


def test_errors_are_cached_and_raised_afresh() -> None:
    errors = []
    for _ in range(2):
        with pytest.raises(SearchError) as caught:
            parse_query("cached ab")
        errors.append(caught.value)
    assert errors[0] is not errors[1]
    assert str(errors[0]) == str(errors[1])


def test_parse_is_cached() -> None:
    assert parse_query("cache the query") is parse_query("cache the query")


def test_non_text_is_converted() -> None:
    assert parse_query(12345) == t("12345")  # type: ignore[arg-type]


def test_nodes_are_hashable_values() -> None:
    tree = parse_query("(aaa OR bbb) kwargs:x=y state:ok")
    assert tree == parse_query("(aaa OR bbb) kwargs:x=y state:ok")
    assert hash(tree) == hash(parse_query("(aaa OR bbb)  kwargs:x=y  state:ok"))
    assert KwargPair("priority", "high").pair == "priority=high"


@pytest.mark.parametrize(
    ("kwargs", "pairs"),
    [
        ({"n": 5, "flag": True, "S": "High"}, {"n=5", "flag=true", "s=high"}),
        ("{'n': 5, 'flag': True, 'S': 'High'}", {"n=5", "flag=true", "s=high"}),
        ({"x": None}, {"x="}),
        ("{'x': None, 'y': ''}", {"x=", "y="}),
        ("{'priority': 'HIGH', 'label': 'some value'}", {"priority=high", "label=some value"}),
        ("{'nested': {'A': [1, 2]}}", {"nested={'a': [1, 2]}"}),
        ('{"json": "style"}', {"json=style"}),
        ({1: "Straße"}, {"1=strasse"}),
        ("  {'lead': 'space'}", {"lead=space"}),
        ("{'truncated': 'valu...", set()),
        ("['not', 'a', 'dict']", set()),
        ("(1, 2)", set()),
        ("", set()),
        ("{}", set()),
        ("{'a': object()}", set()),
        ("{" * 10000, set()),
        ("{'a': " * 500 + "1" + "}" * 500, set()),  # too deep for the compiler
        (None, set()),
        (42, set()),
        (["a=b"], set()),
        (b"{'a': 1}", set()),
    ],
)
def test_kwargs_pairs(kwargs: object, pairs: set[str]) -> None:
    assert kwargs_pairs(kwargs) == frozenset(pairs)


def test_kwargs_pairs_survives_a_failing_str() -> None:
    class Bad:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert kwargs_pairs({"a": Bad()}) == frozenset()
