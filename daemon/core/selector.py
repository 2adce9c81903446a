"""The node-selector language that decides which pools serve which nodes.

The syntax follows Calico's selectors::

    rack == "0" && zone in {"a", "b"} || !has(spine) && host starts with 'edge-'

``parse`` turns text into an immutable AST of :class:`Selector` values;
``str()`` of a parsed selector is canonical text that parses back to an equal
AST, so stored selectors are normalised once, on the way in. Everything here is pure:
no I/O, no shared state, safe to call from any thread or task.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from .errors import SelectorSyntaxError

__all__ = [
    "ALL",
    "All",
    "And",
    "Contains",
    "EndsWith",
    "Equals",
    "Has",
    "In",
    "Not",
    "NotEquals",
    "NotIn",
    "Or",
    "Selector",
    "StartsWith",
    "parse",
    "validate",
]

#: Deeper nesting than this ('(' and '!' combined) is rejected, which bounds the
#: recursion of the parser and of matches()/explain()/str() on the result.
MAX_NESTING = 100

_KEY_RE = re.compile(r"[A-Za-z0-9_./-]+")
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./-")
# ASCII only, so that what looks like a space in a manifest but is not one
# (U+00A0 pasted from a web page) is reported instead of silently accepted.
_WHITESPACE = frozenset(" \t\n\r\f\v")


def _check_key(key: str) -> None:
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid label key {key!r}: must match {_KEY_RE.pattern}")


def _check_value(value: str) -> None:
    # The language has no escapes, so such a value could never be printed
    # back as a selector; refuse it here rather than emit unparseable text.
    if '"' in value and "'" in value:
        raise ValueError(f"selector value {value!r} contains both quote characters")


def _quote(value: str) -> str:
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    # Only reachable for label values shown by explain(), never for selector text.
    return '"' + value.replace('"', '\\"') + '"'


def _join_facts(facts: Iterable[str]) -> str:
    return " and ".join(dict.fromkeys(facts))


class Selector(ABC):
    """A parsed node selector: an immutable, hashable AST node."""

    __slots__ = ()

    @abstractmethod
    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with these labels is selected."""

    @abstractmethod
    def explain(self, labels: Mapping[str, str]) -> str:
        """The facts about ``labels`` that decide :meth:`matches`, for humans.

        The text states facts ('rack is "1", not "0"', 'label rack is absent')
        rather than verdicts, so the same reason reads right under ``!``.
        """

    @abstractmethod
    def __str__(self) -> str:
        """Canonical text with the same meaning; ``parse(str(s)) == s`` for parsed ``s``."""


@dataclass(frozen=True, slots=True)
class All(Selector):
    """``all()``: selects every node."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return True

    def explain(self, labels: Mapping[str, str]) -> str:
        return "all() selects every node"

    def __str__(self) -> str:
        return "all()"


ALL: Selector = All()


@dataclass(frozen=True, slots=True)
class Has(Selector):
    """``has(key)``: the label is present, whatever its value."""

    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def explain(self, labels: Mapping[str, str]) -> str:
        return f"label {self.key} is {'present' if self.key in labels else 'absent'}"

    def __str__(self) -> str:
        return f"has({self.key})"


class _LabelTest(Selector):
    """A test of one label's value: absent labels answer ``if_absent``."""

    __slots__ = ()

    key: str
    #: What matches() answers when the label is absent.
    if_absent: ClassVar[bool] = False

    @abstractmethod
    def _test(self, actual: str) -> bool: ...

    @abstractmethod
    def _explain_present(self, actual: str) -> str: ...

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        return self.if_absent if actual is None else self._test(actual)

    def explain(self, labels: Mapping[str, str]) -> str:
        actual = labels.get(self.key)
        if actual is None:
            return f"label {self.key} is absent"
        return self._explain_present(actual)


@dataclass(frozen=True, slots=True)
class _ValueTest(_LabelTest):
    """``key <op> "value"``; subclasses say how the present value is tested."""

    key: str
    value: str

    op: ClassVar[str]

    def __post_init__(self) -> None:
        _check_key(self.key)
        _check_value(self.value)

    @abstractmethod
    def _describe(self, actual: str, passed: bool) -> str: ...

    def _explain_present(self, actual: str) -> str:
        return self._describe(actual, self._test(actual))

    def __str__(self) -> str:
        return f"{self.key} {self.op} {_quote(self.value)}"


class _EqualityTest(_ValueTest):
    __slots__ = ()

    def _describe(self, actual: str, passed: bool) -> str:
        if actual == self.value:
            return f"{self.key} is {_quote(actual)}"
        return f"{self.key} is {_quote(actual)}, not {_quote(self.value)}"


@dataclass(frozen=True, slots=True)
class Equals(_EqualityTest):
    """``key == "v"``; false when the label is absent."""

    op: ClassVar[str] = "=="

    def _test(self, actual: str) -> bool:
        return actual == self.value


@dataclass(frozen=True, slots=True)
class NotEquals(_EqualityTest):
    """``key != "v"``; true when the label is absent (Calico semantics)."""

    op: ClassVar[str] = "!="
    if_absent: ClassVar[bool] = True

    def _test(self, actual: str) -> bool:
        return actual != self.value


class _SubstringTest(_ValueTest):
    __slots__ = ()

    #: What a failed test says, e.g. "does not start with" (``op`` says a passed one).
    negated_verb: ClassVar[str]
    #: The str method that tests the label's value against the selector's string.
    _method: ClassVar[str]

    def _test(self, actual: str) -> bool:
        return bool(getattr(actual, self._method)(self.value))

    def _describe(self, actual: str, passed: bool) -> str:
        verb = self.op if passed else self.negated_verb
        return f"{self.key} is {_quote(actual)}, which {verb} {_quote(self.value)}"


@dataclass(frozen=True, slots=True)
class Contains(_SubstringTest):
    """``key contains "s"``; false when the label is absent."""

    op, negated_verb, _method = "contains", "does not contain", "__contains__"


@dataclass(frozen=True, slots=True)
class StartsWith(_SubstringTest):
    """``key starts with "s"``; false when the label is absent."""

    op, negated_verb, _method = "starts with", "does not start with", "startswith"


@dataclass(frozen=True, slots=True)
class EndsWith(_SubstringTest):
    """``key ends with "s"``; false when the label is absent."""

    op, negated_verb, _method = "ends with", "does not end with", "endswith"


@dataclass(frozen=True, slots=True)
class _SetTest(_LabelTest):
    """``key [not] in {...}``; the set is kept sorted and deduplicated so
    that selectors differing only in element order compare equal."""

    key: str
    values: tuple[str, ...]

    op: ClassVar[str]
    if_absent: ClassVar[bool]

    def __post_init__(self) -> None:
        _check_key(self.key)
        for value in self.values:
            _check_value(value)
        object.__setattr__(self, "values", tuple(sorted(set(self.values))))

    def _set_text(self) -> str:
        return "{" + ", ".join(_quote(v) for v in self.values) + "}"

    def _explain_present(self, actual: str) -> str:
        where = "in" if actual in self.values else "not in"
        return f"{self.key} is {_quote(actual)}, {where} {self._set_text()}"

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self._set_text()}"


@dataclass(frozen=True, slots=True)
class In(_SetTest):
    """``key in {"a", "b"}``; false when the label is absent."""

    op: ClassVar[str] = "in"
    if_absent: ClassVar[bool] = False

    def _test(self, actual: str) -> bool:
        return actual in self.values


@dataclass(frozen=True, slots=True)
class NotIn(_SetTest):
    """``key not in {"a", "b"}``; true when the label is absent."""

    op: ClassVar[str] = "not in"
    if_absent: ClassVar[bool] = True

    def _test(self, actual: str) -> bool:
        return actual not in self.values


def _is_atom(selector: Selector) -> bool:
    # Atoms print without parentheses after '!'. Comparisons are not atoms:
    # '!rack == "0"' would parse the same, but reads like '(!rack) == "0"'.
    return isinstance(selector, (All, Has, Not))


@dataclass(frozen=True, slots=True)
class Not(Selector):
    """``!expr``."""

    operand: Selector

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.matches(labels)

    def explain(self, labels: Mapping[str, str]) -> str:
        return self.operand.explain(labels)

    def __str__(self) -> str:
        inner = str(self.operand)
        return f"!{inner}" if _is_atom(self.operand) else f"!({inner})"


@dataclass(frozen=True, slots=True)
class _Chain(Selector):
    """``a OP b OP ...``, n-ary so that long chains do not make deep trees.

    Both chains explain themselves the same way: by the first operand whose
    outcome decides the chain (a false one for &&, a true one for ||), or by
    all of them when none does.
    """

    operands: tuple[Selector, ...]
    #: The outcome of one operand that decides the whole chain.
    _decisive: ClassVar[bool]

    def __post_init__(self) -> None:
        if len(self.operands) < 2:
            raise ValueError(f"{type(self).__name__} needs at least two operands")

    def matches(self, labels: Mapping[str, str]) -> bool:
        # && is false at its first false operand, || true at its first true one.
        if any(op.matches(labels) is self._decisive for op in self.operands):
            return self._decisive
        return not self._decisive

    def explain(self, labels: Mapping[str, str]) -> str:
        for op in self.operands:
            if op.matches(labels) is self._decisive:
                return op.explain(labels)
        return _join_facts(op.explain(labels) for op in self.operands)


@dataclass(frozen=True, slots=True)
class And(_Chain):
    """``a && b && ...``."""

    _decisive: ClassVar[bool] = False

    def __str__(self) -> str:
        return " && ".join(f"({op})" if isinstance(op, Or) else str(op) for op in self.operands)


@dataclass(frozen=True, slots=True)
class Or(_Chain):
    """``a || b || ...``."""

    _decisive: ClassVar[bool] = True

    def __str__(self) -> str:
        # && binds tighter, so no operand of || ever needs parentheses.
        return " || ".join(str(op) for op in self.operands)


# --- tokenizer ---------------------------------------------------------------

_TokenKind = Literal["key", "string", "punct", "end", "error"]
_TWO_CHAR_PUNCT = ("==", "!=", "&&", "||")
_ONE_CHAR_PUNCT = frozenset("!(){},")
_HINTS = {"=": "==", "&": "&&", "|": "||"}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _TokenKind
    #: Source text for key/punct, the unquoted value for string, the reason for error.
    text: str
    column: int


def _tokenize(text: str) -> list[_Token]:
    """All tokens up to the end, or up to and including the first lexical error.

    A lexical error becomes a token instead of an exception so that a syntax
    error earlier in the text is reported first: errors come out in reading order.
    """
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _WHITESPACE:
            i += 1
        if i >= n:
            tokens.append(_Token("end", "", n + 1))
            return tokens
        ch, column = text[i], i + 1
        if ch in _KEY_CHARS:
            start = i
            while i < n and text[i] in _KEY_CHARS:
                i += 1
            tokens.append(_Token("key", text[start:i], column))
        elif ch in "\"'":
            close = text.find(ch, i + 1)
            if close < 0:
                tokens.append(_Token("error", f"expected {ch!r} to close string", column))
                return tokens
            tokens.append(_Token("string", text[i + 1 : close], column))
            i = close + 1
        elif text.startswith(_TWO_CHAR_PUNCT, i):
            tokens.append(_Token("punct", text[i : i + 2], column))
            i += 2
        elif ch in _ONE_CHAR_PUNCT:
            tokens.append(_Token("punct", ch, column))
            i += 1
        else:
            hint = f" (did you mean {_HINTS[ch]!r}?)" if ch in _HINTS else ""
            tokens.append(_Token("error", f"unexpected character {ch!r}{hint}", column))
            return tokens


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "end of selector"
    if token.kind == "string":
        return f"string {_quote(token.text)}"
    return repr(token.text)


# --- parser ------------------------------------------------------------------

_VALUE_OPERATORS: dict[str, type[_ValueTest]] = {
    "==": Equals,
    "!=": NotEquals,
    "contains": Contains,
}
_OPERATOR_LIST = "==, !=, in, not in, contains, starts with or ends with"
_PRIMARY_LIST = "a label key, has(...), all(), '!' or '('"


class _Parser:
    """Recursive descent over the grammar::

        selector := or_expr END | END
        or_expr  := and_expr ("||" and_expr)*
        and_expr := unary ("&&" unary)*
        unary    := "!"* primary
        primary  := "(" or_expr ")" | "has" "(" KEY ")" | "all" "(" ")"
                  | KEY ("==" | "!=" | "contains" | "starts" "with" | "ends" "with") STRING
                  | KEY ["not"] "in" "{" [STRING ("," STRING)*] "}"

    ``has`` and ``all`` are keywords only before '(', so they remain usable
    as label keys.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = _tokenize(text)
        self._pos = 0
        self._depth = 0

    def parse(self) -> Selector:
        if self._peek().kind == "end":
            return ALL
        selector = self._or_expr()
        token = self._peek()
        if token.kind != "end":
            raise self._error(
                token, f"unexpected {_describe(token)}, expected '&&', '||' or end of selector"
            )
        return selector

    # Token access. The token list ends with "end" or "error"; reading past it
    # keeps returning that last token, and reaching an error token raises it.

    def _peek(self, ahead: int = 0) -> _Token:
        token = self._tokens[min(self._pos + ahead, len(self._tokens) - 1)]
        if token.kind == "error":
            raise self._error(token, token.text)
        return token

    def _next(self) -> _Token:
        token = self._peek()
        if token.kind != "end":
            self._pos += 1
        return token

    def _at(self, kind: _TokenKind, text: str | None = None, ahead: int = 0) -> bool:
        token = self._peek(ahead)
        return token.kind == kind and (text is None or token.text == text)

    def _expect(self, kind: _TokenKind, text: str | None, what: str, where: str) -> _Token:
        token = self._peek()
        if token.kind != kind or (text is not None and token.text != text):
            raise self._error(token, f"expected {what} {where}, found {_describe(token)}")
        return self._next()

    def _error(self, token: _Token, reason: str) -> SelectorSyntaxError:
        return SelectorSyntaxError(self._text, token.column, reason)

    def _enter(self, token: _Token) -> None:
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise self._error(token, f"nesting deeper than {MAX_NESTING} levels")

    # Grammar rules.

    def _or_expr(self) -> Selector:
        return self._chain("||", Or, self._and_expr)

    def _and_expr(self) -> Selector:
        return self._chain("&&", And, self._unary)

    def _chain(self, punct: str, node: type[_Chain], operand: Callable[[], Selector]
               ) -> Selector:
        operands = [operand()]
        while self._at("punct", punct):
            self._next()
            operands.append(operand())
        return _flatten(node, operands)

    def _unary(self) -> Selector:
        # Iterative, so a run of '!' costs no stack; it still counts as nesting
        # because the resulting tree is that deep.
        bangs = 0
        while self._at("punct", "!"):
            self._enter(self._next())
            bangs += 1
        selector = self._primary()
        for _ in range(bangs):
            selector = Not(selector)
        self._depth -= bangs
        return selector

    def _primary(self) -> Selector:
        token = self._peek()
        if token.kind == "punct" and token.text == "(":
            self._enter(self._next())
            inner = self._or_expr()
            self._expect("punct", ")", "')'", f"to close '(' at column {token.column}")
            self._depth -= 1
            return inner
        if token.kind != "key":
            raise self._error(token, f"unexpected {_describe(token)}, expected {_PRIMARY_LIST}")
        self._next()
        if token.text == "has" and self._at("punct", "("):
            self._next()
            key = self._expect("key", None, "label key", "after 'has('")
            self._expect("punct", ")", "')'", f"to close 'has({key.text}'")
            return Has(key.text)
        if token.text == "all" and self._at("punct", "("):
            self._next()
            self._expect("punct", ")", "')'", "after 'all('")
            return ALL
        return self._comparison(token)

    def _comparison(self, key: _Token) -> Selector:
        op = self._peek()
        if op.text in _VALUE_OPERATORS and op.kind in ("key", "punct"):
            self._next()
            return _VALUE_OPERATORS[op.text](key.text, self._string(f"after {op.text!r}"))
        if op.kind == "key" and op.text in ("starts", "ends"):
            self._next()
            self._expect("key", "with", "'with'", f"after {op.text!r}")
            value = self._string(f"after '{op.text} with'")
            return StartsWith(key.text, value) if op.text == "starts" else EndsWith(key.text, value)
        if op.kind == "key" and op.text == "in":
            self._next()
            return In(key.text, self._set("after 'in'"))
        if op.kind == "key" and op.text == "not":
            self._next()
            self._expect("key", "in", "'in'", "after 'not'")
            return NotIn(key.text, self._set("after 'not in'"))
        hint = ""
        if key.text in ("has", "all"):
            hint = f" (or '(' for {key.text}(...))"
        raise self._error(
            op,
            f"expected operator after label key {key.text!r}{hint}, found {_describe(op)}; "
            f"operators are {_OPERATOR_LIST}",
        )

    def _string(self, where: str) -> str:
        return self._expect("string", None, "quoted string", where).text

    def _set(self, where: str) -> tuple[str, ...]:
        self._expect("punct", "{", "'{'", where)
        values: list[str] = []
        if self._at("punct", "}"):
            self._next()
            return ()
        values.append(self._expect("string", None, "quoted string or '}'", "in set").text)
        while not self._at("punct", "}"):
            self._expect("punct", ",", "',' or '}'", "in set")
            values.append(self._string("after ',' in set"))
        self._next()
        return tuple(values)


def _flatten(kind: type[_Chain], operands: list[Selector]) -> Selector:
    # '(a && b) && c' and 'a && b && c' mean the same; flattening here keeps
    # one canonical AST for both, so parse(str(s)) == s holds.
    if len(operands) == 1:
        return operands[0]
    flat: list[Selector] = []
    for op in operands:
        if isinstance(op, kind):
            flat.extend(op.operands)
        else:
            flat.append(op)
    return kind(tuple(flat))


def parse(text: str) -> Selector:
    """Parse selector text; empty or whitespace-only text means ``all()``.

    Raises :class:`SelectorSyntaxError` (with a 1-based column) for any text
    that is not a selector, and nothing else, whatever the input.
    """
    return _Parser(text).parse()


def validate(text: str) -> str:
    """Parse ``text`` and return its canonical form; raises SelectorSyntaxError."""
    return str(parse(text))
