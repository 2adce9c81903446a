"""Tests for the node-selector language: semantics, errors, canonical text."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topoipam.daemon.core.errors import InvalidInput, SelectorSyntaxError
from topoipam.daemon.core.selector import (
    ALL,
    MAX_NESTING,
    All,
    And,
    Equals,
    Has,
    In,
    Not,
    NotIn,
    Or,
    Selector,
    parse,
    validate,
)

# --- semantics ---------------------------------------------------------------

EMPTY: dict[str, str] = {}
R0 = {"rack": "0"}
R1 = {"rack": "1"}
R0ZA = {"rack": "0", "zone": "a"}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        # all() and the empty selector
        ("all()", EMPTY, True),
        ("all()", R0, True),
        ("", EMPTY, True),
        (" \t\n ", R1, True),
        # ==
        ('rack == "0"', R0, True),
        ('rack == "0"', R1, False),
        ('rack == "0"', EMPTY, False),
        ("rack == '0'", R0, True),
        ('rack=="0"', R0, True),
        ('rack == ""', {"rack": ""}, True),
        ('rack == ""', EMPTY, False),
        # !=: true when absent
        ('rack != "0"', R0, False),
        ('rack != "0"', R1, True),
        ('rack != "0"', EMPTY, True),
        ("rack!='0'", R1, True),
        # has / !has
        ("has(rack)", R0, True),
        ("has(rack)", {"rack": ""}, True),
        ("has(rack)", EMPTY, False),
        ("!has(rack)", EMPTY, True),
        ("!has(rack)", R0, False),
        ("! has ( rack )", EMPTY, True),
        # in / not in
        ('rack in {"0", "1"}', R0, True),
        ('rack in {"0", "1"}', {"rack": "2"}, False),
        ('rack in {"0", "1"}', EMPTY, False),
        ("rack in {}", R0, False),
        ("rack in {'0'}", R0, True),
        ('rack not in {"0", "1"}', R0, False),
        ('rack not in {"0", "1"}', {"rack": "2"}, True),
        ('rack not in {"0", "1"}', EMPTY, True),
        ("rack not in {}", EMPTY, True),
        ("rack not in {}", R0, True),
        ('rack in{"0"}', R0, True),
        # contains / starts with / ends with: false when absent
        ('host contains "edge"', {"host": "r1-edge-3"}, True),
        ('host contains "edge"', {"host": "r1-core-3"}, False),
        ('host contains "edge"', EMPTY, False),
        ('host contains ""', {"host": "x"}, True),
        ('host starts with "r1-"', {"host": "r1-edge"}, True),
        ('host starts with "r1-"', {"host": "r2-edge"}, False),
        ('host starts with "r1-"', EMPTY, False),
        ('host ends with "-3"', {"host": "r1-edge-3"}, True),
        ('host ends with "-3"', {"host": "r1-edge-4"}, False),
        ('host ends with "-3"', EMPTY, False),
        ('host  starts\twith\n"r"', {"host": "rx"}, True),
        # quotes of the other kind inside a string
        ("""note == 'say "hi"'""", {"note": 'say "hi"'}, True),
        ('''note == "it's"''', {"note": "it's"}, True),
        ('''note contains "'"''', {"note": "it's"}, True),
        # label keys with every allowed character; keywords as keys
        ('topology.kubernetes.io/zone-a_1 == "z"', {"topology.kubernetes.io/zone-a_1": "z"}, True),
        ('has == "x"', {"has": "x"}, True),
        ('all != "x"', {"all": "y"}, True),
        ('in in {"x"}', {"in": "x"}, True),
        ('not not in {"x"}', {"not": "y"}, True),
        ("has(has)", {"has": ""}, True),
        # && and ||
        ('rack == "0" && zone == "a"', R0ZA, True),
        ('rack == "0" && zone == "b"', R0ZA, False),
        ('rack == "1" || zone == "a"', R0ZA, True),
        ('rack == "1" || zone == "b"', R0ZA, False),
        # && binds tighter than ||
        ("has(x) && has(y) || has(rack)", R0, True),
        ("has(rack) || has(x) && has(y)", R0, True),
        ("has(x) && (has(y) || has(rack))", R0, False),
        ("(has(rack) || has(x)) && has(y)", R0, False),
        # negation applies to the next term only
        ("!has(x) && has(rack)", R0, True),
        ("!(has(x) || has(rack))", R0, False),
        ('!rack == "1"', R0, True),
        ("!!has(rack)", R0, True),
        ("!!!has(rack)", R0, False),
        # parentheses
        ("((has(rack)))", R0, True),
        ("( ( all ( ) ) )", EMPTY, True),
        ('(rack == "0") && (zone == "a")', R0ZA, True),
    ],
)
def test_matches(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse(selector).matches(labels) is expected


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "column", "fragment"),
    [
        ("rack", 5, "expected operator after label key 'rack'"),
        ('rack "0"', 6, "expected operator after label key 'rack', found string \"0\""),
        ("has rack", 5, "or '(' for has(...)"),
        ('rack == "0', 9, """expected '"' to close string"""),
        ("rack == '0", 9, """expected "'" to close string"""),
        ("rack == 0", 9, "expected quoted string after '==', found '0'"),
        ('rack == "0" )', 13, "unexpected ')'"),
        ("has(a))", 7, "unexpected ')'"),
        (")", 1, "unexpected ')'"),
        ("()", 2, "unexpected ')'"),
        ("(has(a)", 8, "expected ')' to close '(' at column 1, found end of selector"),
        ("has(a", 6, "expected ')' to close 'has(a'"),
        ("has()", 5, "expected label key after 'has('"),
        ("all(", 5, "expected ')' after 'all('"),
        ("all(x)", 5, "expected ')' after 'all('"),
        ('rack = "0"', 6, "unexpected character '=' (did you mean '=='?)"),
        ("has(a) & has(b)", 8, "did you mean '&&'?"),
        ("has(a) | has(b)", 8, "did you mean '||'?"),
        ("has(a) has(b)", 8, "unexpected 'has', expected '&&', '||' or end of selector"),
        ("has(a) &&", 10, "unexpected end of selector"),
        ("&& has(a)", 1, "unexpected '&&'"),
        ("!", 2, "unexpected end of selector"),
        ('rack in "0"', 9, "expected '{' after 'in', found string \"0\""),
        ('rack in {"0",}', 14, "expected quoted string after ',' in set, found '}'"),
        ("rack in {,}", 10, "expected quoted string or '}' in set"),
        ('rack in {"0" "1"}', 14, "expected ',' or '}' in set"),
        ('rack in {"0"', 13, "expected ',' or '}' in set, found end of selector"),
        ('rack not "0"', 10, "expected 'in' after 'not'"),
        ('rack starts "r"', 13, "expected 'with' after 'starts'"),
        ('rack ends on "r"', 11, "expected 'with' after 'ends'"),
        ("rack starts with r", 18, "expected quoted string after 'starts with'"),
        ("rack@ == 'x'", 5, "unexpected character '@'"),
        ("rack\u00a0== 'x'", 5, "unexpected character '\\xa0'"),
        # the first error in reading order wins over a later lexical error
        ('has(a) ) "unterminated', 8, "unexpected ')'"),
        (
            "(" * (MAX_NESTING + 1) + "all()" + ")" * (MAX_NESTING + 1),
            MAX_NESTING + 1,
            f"nesting deeper than {MAX_NESTING} levels",
        ),
        ("!" * (MAX_NESTING + 1) + "all()", MAX_NESTING + 1, "nesting deeper than"),
        ("(!" * 60 + "all()" + ")" * 60, 2 * 50 + 1, "nesting deeper than"),
    ],
)
def test_syntax_errors(selector: str, column: int, fragment: str) -> None:
    with pytest.raises(SelectorSyntaxError) as info:
        parse(selector)
    err = info.value
    assert err.selector == selector
    assert fragment in err.reason
    assert err.column == column
    assert f"at column {column}" in str(err)


def test_syntax_error_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        validate("rack ==")


def test_nesting_up_to_the_limit_is_accepted() -> None:
    deep = "(" * MAX_NESTING + "has(a)" + ")" * MAX_NESTING
    assert parse(deep) == Has("a")
    bangs = "!" * MAX_NESTING + "has(a)"
    selector = parse(bangs)
    assert str(selector) == bangs
    assert selector.matches({"a": "1"}) is True  # an even number of '!'
    assert selector.explain({}) == "label a is absent"


@pytest.mark.parametrize("text", ["(" * 100_000, "!" * 100_000, "(!" * 50_000, "{" * 1000])
def test_pathological_input_raises_syntax_error(text: str) -> None:
    with pytest.raises(SelectorSyntaxError):
        parse(text)


def test_long_flat_chains_do_not_recurse() -> None:
    # n-ary And/Or keep the tree shallow however long the chain is.
    text = " || ".join(" && ".join(f"has(k{i}_{j})" for j in range(50)) for i in range(200))
    selector = parse(text)
    assert selector.matches({f"k199_{j}": "" for j in range(50)}) is True
    assert selector.matches({}) is False
    assert parse(str(selector)) == selector


# --- canonical text ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", "all()"),
        ("  all ( )  ", "all()"),
        ("rack=='0'", 'rack == "0"'),
        ("""note == 'say "hi"'""", """note == 'say "hi"'"""),
        ('''note == "it's"''', '''note == "it's"'''),
        ('zone in {"b","a","b"}', 'zone in {"a", "b"}'),
        ("zone not in { }", "zone not in {}"),
        ("zone in {'x\"', \"y'\"}", """zone in {'x"', "y'"}"""),
        ('host  starts   with "r"', 'host starts with "r"'),
        ('host ends with "r"', 'host ends with "r"'),
        ('host contains "r"', 'host contains "r"'),
        ("! has ( a )", "!has(a)"),
        ('!(a == "x")', '!(a == "x")'),
        ('!a == "x"', '!(a == "x")'),
        ("!(has(a) && has(b))", "!(has(a) && has(b))"),
        ("(has(a) && has(b)) && has(c)", "has(a) && has(b) && has(c)"),
        ("has(a) || (has(b) || has(c))", "has(a) || has(b) || has(c)"),
        ("(has(a) && has(b)) || has(c)", "has(a) && has(b) || has(c)"),
        ("(has(a) || has(b)) && has(c)", "(has(a) || has(b)) && has(c)"),
        ("((((has(a)))))", "has(a)"),
        ("!!has(a)", "!!has(a)"),
        ("!(!has(a))", "!!has(a)"),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    assert validate(text) == canonical
    assert validate(canonical) == canonical


def test_ast_shape() -> None:
    selector = parse('rack == "0" && zone in {"b", "a"} || !has(spine)')
    assert selector == Or(
        (And((Equals("rack", "0"), In("zone", ("a", "b")))), Not(Has("spine"))),
    )
    assert hash(selector) == hash(parse(str(selector)))
    assert isinstance(selector, Selector)


def test_all() -> None:
    assert isinstance(ALL, All)
    assert parse("all()") == ALL
    assert parse("") == ALL
    assert str(ALL) == "all()"
    assert ALL.matches({}) is True


def test_set_order_and_duplicates_do_not_matter() -> None:
    assert NotIn("k", ("b", "a", "b")) == NotIn("k", ("a", "b"))
    assert NotIn("k", ("b", "a")).values == ("a", "b")


@pytest.mark.parametrize(
    "make",
    [
        lambda: Has("bad key"),
        lambda: Has(""),
        lambda: Equals("k", "both \" and '"),
        lambda: In("k", ("ok", "both \" and '")),
        lambda: And((Has("a"),)),
        lambda: Or(()),
    ],
)
def test_constructors_refuse_what_cannot_be_printed(make: Callable[[], Selector]) -> None:
    with pytest.raises(ValueError):
        make()


# --- explain -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "labels", "reason"),
    [
        ("all()", EMPTY, "all() selects every node"),
        ('rack == "0"', R0, 'rack is "0"'),
        ('rack == "0"', R1, 'rack is "1", not "0"'),
        ('rack == "0"', EMPTY, "label rack is absent"),
        ('rack != "0"', R1, 'rack is "1", not "0"'),
        ('rack != "0"', R0, 'rack is "0"'),
        ('rack != "0"', EMPTY, "label rack is absent"),
        ("has(rack)", R0, "label rack is present"),
        ("!has(rack)", R0, "label rack is present"),
        ("has(rack)", EMPTY, "label rack is absent"),
        ('zone in {"a", "b"}', R0ZA, 'zone is "a", in {"a", "b"}'),
        ('zone in {"b"}', R0ZA, 'zone is "a", not in {"b"}'),
        ('zone not in {"b"}', R0ZA, 'zone is "a", not in {"b"}'),
        ('zone not in {"b"}', EMPTY, "label zone is absent"),
        ('host contains "dg"', {"host": "edge"}, 'host is "edge", which contains "dg"'),
        ('host contains "x"', {"host": "edge"}, 'host is "edge", which does not contain "x"'),
        ('host starts with "e"', {"host": "edge"}, 'host is "edge", which starts with "e"'),
        ('host starts with "x"', {"host": "edge"}, 'host is "edge", which does not start with "x"'),
        ('host ends with "e"', {"host": "edge"}, 'host is "edge", which ends with "e"'),
        ('host ends with "x"', {"host": "edge"}, 'host is "edge", which does not end with "x"'),
        ('host ends with "x"', EMPTY, "label host is absent"),
        ('note == "x"', {"note": 'say "hi"'}, """note is 'say "hi"', not "x\""""),
        # && names the first failing term, or every term when all pass
        ('rack == "0" && zone == "b"', R0ZA, 'zone is "a", not "b"'),
        ('rack == "0" && zone == "a"', R0ZA, 'rack is "0" and zone is "a"'),
        # || names the first passing term, or every term when none passes
        ('has(x) || rack == "0"', R0, 'rack is "0"'),
        ("has(x) || has(y)", R0, "label x is absent and label y is absent"),
        ("has(x) || !has(x)", EMPTY, "label x is absent"),
        ("has(x) && has(x)", {"x": ""}, "label x is present"),
    ],
)
def test_explain(selector: str, labels: dict[str, str], reason: str) -> None:
    assert parse(selector).explain(labels) == reason


# --- properties --------------------------------------------------------------

KEYS = ["a", "b", "rack", "zone", "has", "all", "in", "not", "k.io/x-y_1"]
VALUES = ["", "0", "1", "ab", "b", 'x"y', "x'y", " sp ", "{}", "&&"]
TOKENS = [
    "==",
    "!=",
    "!",
    "&&",
    "||",
    "(",
    ")",
    "{",
    "}",
    ",",
    "has",
    "all",
    "in",
    "not",
    "contains",
    "starts",
    "with",
    "ends",
    "a",
    "rack",
    '"x"',
    "'y'",
    '"',
    "'",
    " ",
    "\t",
    "=",
    "&",
    "|",
    "@",
    "()",
    "has(",
    "{}",
]

whitespace = st.sampled_from([" ", "  ", "\t", "\n", " \r\n "])
optional_whitespace = st.one_of(st.just(""), whitespace)
keys = st.sampled_from(KEYS)


@st.composite
def string_literals(draw: st.DrawFn) -> str:
    value = draw(st.sampled_from(VALUES))
    quote = draw(st.sampled_from([q for q in "\"'" if q not in value]))
    return quote + value + quote


@st.composite
def atoms(draw: st.DrawFn) -> str:
    w0: Callable[[], str] = lambda: draw(optional_whitespace)  # noqa: E731
    w1: Callable[[], str] = lambda: draw(whitespace)  # noqa: E731
    key = draw(keys)
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return f"has{w0()}({w0()}{key}{w0()})"
    if kind == 1:
        return f"all{w0()}({w0()})"
    if kind == 2:
        op = draw(st.sampled_from(["==", "!="]))
        return f"{key}{w0()}{op}{w0()}{draw(string_literals())}"
    if kind == 3:
        return f"{key}{w1()}contains{w0()}{draw(string_literals())}"
    if kind in (4, 5):
        word = "starts" if kind == 4 else "ends"
        return f"{key}{w1()}{word}{w1()}with{w0()}{draw(string_literals())}"
    items = draw(st.lists(string_literals(), max_size=3))
    body = f"{w0()},{w0()}".join(items)
    op = "in" if kind == 6 else f"not{w1()}in"
    return f"{key}{w1()}{op}{w0()}{{{w0()}{body}{w0()}}}"


# Generated text is tagged with its precedence level so that children are
# parenthesised only where the grammar needs it (and sometimes where it does not).
OR, AND, UNARY = 0, 1, 2
Tagged = tuple[str, int]


def _child(draw: st.DrawFn, tagged: Tagged, level: int) -> str:
    text, own = tagged
    if own < level or draw(st.integers(0, 5)) == 0:
        return f"({draw(optional_whitespace)}{text}{draw(optional_whitespace)})"
    return text


def _extend(children: st.SearchStrategy[Tagged]) -> st.SearchStrategy[Tagged]:
    @st.composite
    def negation(draw: st.DrawFn) -> Tagged:
        return f"!{draw(optional_whitespace)}{_child(draw, draw(children), UNARY)}", UNARY

    def joined(op: str, level: int) -> st.SearchStrategy[Tagged]:
        @st.composite
        def build(draw: st.DrawFn) -> Tagged:
            tagged = draw(st.lists(children, min_size=2, max_size=4))
            parts = [_child(draw, t, level) for t in tagged]
            sep = f"{draw(optional_whitespace)}{op}{draw(optional_whitespace)}"
            return sep.join(parts), level

        return build()

    return st.one_of(negation(), joined("&&", AND), joined("||", OR))


selector_texts = st.recursive(atoms().map(lambda t: (t, UNARY)), _extend, max_leaves=12).map(
    lambda tagged: tagged[0]
)
label_sets = st.dictionaries(
    keys, st.sampled_from([*VALUES, "xab", "abx", "0ab", "both \" and '"]), max_size=6
)


@given(st.text(max_size=60))
def test_parse_arbitrary_text_only_raises_syntax_errors(text: str) -> None:
    _parse_or_syntax_error(text)


@given(st.lists(st.sampled_from(TOKENS), max_size=25), st.sampled_from(["", " "]))
def test_parse_token_soup_only_raises_syntax_errors(tokens: list[str], sep: str) -> None:
    _parse_or_syntax_error(sep.join(tokens))


def _parse_or_syntax_error(text: str) -> None:
    try:
        selector = parse(text)
    except SelectorSyntaxError as err:
        assert err.selector == text
        assert 1 <= err.column <= len(text) + 1
        assert err.reason
    else:
        assert isinstance(selector, Selector)
        assert parse(str(selector)) == selector


@settings(max_examples=300)
@given(selector_texts, st.lists(label_sets, min_size=1, max_size=5))
def test_canonical_text_round_trips(text: str, label_dicts: list[dict[str, str]]) -> None:
    selector = parse(text)
    canonical = str(selector)
    again = parse(canonical)
    assert again == selector
    assert str(again) == canonical
    for labels in label_dicts:
        assert again.matches(labels) is selector.matches(labels)
        assert again.explain(labels) == selector.explain(labels)


@given(selector_texts, label_sets)
def test_negation_inverts(text: str, labels: dict[str, str]) -> None:
    selector = parse(text)
    assert parse(f"!({text})").matches(labels) is not selector.matches(labels)
    assert parse(f"!({text})").explain(labels) == selector.explain(labels)
