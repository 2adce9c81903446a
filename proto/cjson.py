"""``json.loads`` and ``json.dumps`` through CPython's C accelerator ``_json`` alone.

The CNI plugin is exec'd once per pod. ``import json`` costs it ~17 ms under
``python -I -S``, because ``json.decoder`` and ``json.scanner`` import ``re``
(and ``re`` imports ``enum``, ``functools``, ``collections``) only to build a few
regular expressions that the C accelerator makes unnecessary: ``json`` itself
parses and encodes with ``_json.make_scanner`` and ``_json.make_encoder``
whenever they exist. This module calls them directly, so it imports nothing but
``_json``, and gives what ``json.loads(s)`` and ``json.dumps(obj,
ensure_ascii=..., separators=...)`` give — the same values, the same text, the
same exceptions with the same messages (``tests/client/test_cjson.py`` compares
them on generated documents).

One detail needs code of its own: when the C scanner finds malformed JSON it
raises ``json.decoder.JSONDecodeError`` looked up in ``sys.modules``, and
without ``json.decoder`` loaded it fails with a bare SystemError that says
neither what nor where. Malformed input is therefore parsed a second time by
:func:`_locate_error`, a port of ``json.decoder``'s pure-Python parser without
``re``: slow, but only ever run for input that is about to be refused.
"""

from __future__ import annotations

import _json

# Only the type checker needs typing (see topoipam.client.cni).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WHITESPACE = " \t\n\r"
_DIGITS = "0123456789"
_HEX_DIGITS = "0123456789abcdefABCDEF"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}
_BACKSLASH = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
              "t": "\t"}


class JSONDecodeError(ValueError):
    """Malformed JSON; the message reads exactly like ``json.JSONDecodeError``'s."""

    def __init__(self, msg: str, doc: str, pos: int) -> None:
        lineno = doc.count("\n", 0, pos) + 1
        colno = pos - doc.rfind("\n", 0, pos)
        super().__init__(f"{msg}: line {lineno} column {colno} (char {pos})")
        self.msg, self.doc, self.pos, self.lineno, self.colno = msg, doc, pos, lineno, colno


class _Context:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


# typeshed's context type is the scanner itself; json passes its JSONDecoder.
_scan_once = _json.make_scanner(_Context())  # type: ignore[arg-type]


def loads(data: str | bytes | bytearray) -> Any:
    """``json.loads(data)``: bytes in UTF-8, -16 or -32 (detected as json does)."""
    if isinstance(data, str):
        if data.startswith("\ufeff"):
            raise JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
        text = data
    elif isinstance(data, bytes | bytearray):
        text = data.decode(_detect_encoding(data), "surrogatepass")
    else:
        raise TypeError(f"the JSON object must be str, bytes or bytearray, "
                        f"not {data.__class__.__name__}")
    try:
        value, end = _scan_once(text, _skip_whitespace(text, 0))
    except StopIteration as stop:
        raise JSONDecodeError("Expecting value", text, stop.value) from None
    except (SystemError, ValueError):
        # SystemError: the C scanner's error without json.decoder loaded;
        # ValueError: its JSONDecodeError when something else loaded it, or
        # int()'s digit limit, which the second parse raises again.
        value, end = _locate_error(text)
    end = _skip_whitespace(text, end)
    if end != len(text):
        raise JSONDecodeError("Extra data", text, end)
    return value


def dumps(value: Any, *, ensure_ascii: bool = True,
          separators: tuple[str, str] | None = None) -> str:
    """``json.dumps(value, ensure_ascii=..., separators=...)``, json's defaults otherwise."""
    quote = _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring
    if isinstance(value, str):
        return quote(value)
    item_separator, key_separator = separators or (", ", ": ")
    style = (ensure_ascii, item_separator, key_separator)
    cached = _ENCODERS.get(style)
    if cached is None:
        markers: dict[int, Any] = {}  # json's check_circular: the containers being encoded
        cached = _ENCODERS[style] = (markers, _json.make_encoder(
            markers, _not_serializable, quote, None, key_separator, item_separator,
            False, False, True))
    markers, encode = cached
    markers.clear()  # an encoding cut short by an error may have left some
    return "".join(encode(value, 0))


# The daemon encodes every etcd value and CNI answer: one C encoder per style,
# not one per call.
_ENCODERS: dict[tuple[bool, str, str], tuple[dict[int, Any], Any]] = {}


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


def _detect_encoding(data: bytes | bytearray) -> str:
    """json.detect_encoding: a BOM, else the pattern of NUL bytes at the start."""
    if data.startswith((b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00")):
        return "utf-32"
    if data.startswith((b"\xfe\xff", b"\xff\xfe")):
        return "utf-16"
    if data.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if len(data) >= 4:
        if not data[0]:
            return "utf-16-be" if data[1] else "utf-32-be"
        if not data[1]:
            return "utf-16-le" if data[2] or data[3] else "utf-32-le"
    elif len(data) == 2:
        if not data[0]:
            return "utf-16-be"
        if not data[1]:
            return "utf-16-le"
    return "utf-8"


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


# --- the second parse, for malformed input ----------------------------------
# A port of json.decoder.JSONObject / JSONArray / py_scanstring and
# json.scanner.py_make_scanner, with the regular expressions written out as
# loops. Positions and messages must match json's exactly.


def _locate_error(text: str) -> tuple[Any, int]:
    """Parse ``text`` from its first non-blank character; raises the error json would."""
    return _value(text, _skip_whitespace(text, 0))


def _value(text: str, index: int) -> tuple[Any, int]:
    """One value at ``index``; StopIteration(index) where there is none, as the scanners do."""
    char = text[index:index + 1]
    if char == '"':
        return _string(text, index + 1)
    if char == "{":
        return _object(text, index + 1)
    if char == "[":
        return _array(text, index + 1)
    for word, constant in (("null", None), ("true", True), ("false", False)):
        if text.startswith(word, index):
            return constant, index + len(word)
    number = _number(text, index)
    if number is not None:
        return number
    for word in ("NaN", "Infinity", "-Infinity"):
        if text.startswith(word, index):
            return _CONSTANTS[word], index + len(word)
    raise StopIteration(index)


def _number(text: str, index: int) -> tuple[int | float, int] | None:
    """``-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][-+]?[0-9]+)?`` at ``index``, or None."""
    end = index + (text[index:index + 1] == "-")
    if text[end:end + 1] == "0":
        end += 1
    elif text[end:end + 1] in tuple("123456789"):
        end = _digits_end(text, end)
    else:
        return None
    integer_end = end
    if text[end:end + 1] == "." and text[end + 1:end + 2] in tuple(_DIGITS):
        end = _digits_end(text, end + 1)
    if text[end:end + 1] in ("e", "E"):
        digits = end + 1 + (text[end + 1:end + 2] in ("-", "+"))
        if text[digits:digits + 1] in tuple(_DIGITS):
            end = _digits_end(text, digits)
    if end == integer_end:
        return int(text[index:end]), end
    return float(text[index:end]), end


def _digits_end(text: str, index: int) -> int:
    while index < len(text) and text[index] in _DIGITS:
        index += 1
    return index


def _expect_value(text: str, index: int) -> tuple[Any, int]:
    try:
        return _value(text, index)
    except StopIteration as stop:
        raise JSONDecodeError("Expecting value", text, stop.value) from None


def _string(text: str, end: int) -> tuple[str, int]:
    """_json.scanstring: ``end`` is just after the opening quote.

    Its messages and positions differ from py_scanstring's, and json.loads uses it.
    """
    chunks = []
    begin = end - 1
    while True:
        start = end
        while end < len(text) and text[end] not in '"\\' and text[end] >= " ":
            end += 1
        if end == len(text):
            raise JSONDecodeError("Unterminated string starting at", text, begin)
        chunks.append(text[start:end])
        terminator = text[end]
        end += 1
        if terminator == '"':
            break
        if terminator != "\\":
            raise JSONDecodeError("Invalid control character at", text, end - 1)
        if end == len(text):
            raise JSONDecodeError("Unterminated string starting at", text, begin)
        escape = text[end]
        if escape != "u":
            if escape not in _BACKSLASH:
                raise JSONDecodeError("Invalid \\escape", text, end - 1)
            chunks.append(_BACKSLASH[escape])
            end += 1
            continue
        code = _hex4(text, end)
        end += 5
        if 0xD800 <= code <= 0xDBFF and text[end:end + 2] == "\\u":
            low = _hex4(text, end + 1)
            if 0xDC00 <= low <= 0xDFFF:
                code = 0x10000 + (((code - 0xD800) << 10) | (low - 0xDC00))
                end += 6
        chunks.append(chr(code))
    return "".join(chunks), end


def _hex4(text: str, index: int) -> int:
    """The four hex digits after the ``u`` at ``index``, as the C scanner reads them.

    Stricter than json.decoder's ``int(digits, 16)``: no sign, blank or ``0x``,
    and the string must go on after them (the closing quote at least).
    """
    digits = text[index + 1:index + 5]
    if index + 5 < len(text) and all(c in _HEX_DIGITS for c in digits):
        return int(digits, 16)
    raise JSONDecodeError("Invalid \\uXXXX escape", text, index)


def _object(text: str, end: int) -> tuple[dict[str, Any], int]:
    """json.decoder.JSONObject: ``end`` is just after the ``{``."""
    pairs: dict[str, Any] = {}
    char = text[end:end + 1]
    if char != '"':
        end = _skip_whitespace(text, end)
        char = text[end:end + 1]
        if char == "}":
            return pairs, end + 1
        if char != '"':
            raise JSONDecodeError("Expecting property name enclosed in double quotes", text, end)
    end += 1
    while True:
        key, end = _string(text, end)
        end = _skip_whitespace(text, end)
        if text[end:end + 1] != ":":
            raise JSONDecodeError("Expecting ':' delimiter", text, end)
        value, end = _expect_value(text, _skip_whitespace(text, end + 1))
        pairs[key] = value
        end = _skip_whitespace(text, end)
        char = text[end:end + 1]
        end += 1
        if char == "}":
            return pairs, end
        if char != ",":
            raise JSONDecodeError("Expecting ',' delimiter", text, end - 1)
        end = _skip_whitespace(text, end)
        char = text[end:end + 1]
        end += 1
        if char != '"':
            raise JSONDecodeError("Expecting property name enclosed in double quotes",
                                  text, end - 1)


def _array(text: str, end: int) -> tuple[list[Any], int]:
    """json.decoder.JSONArray: ``end`` is just after the ``[``."""
    values: list[Any] = []
    end = _skip_whitespace(text, end)
    if text[end:end + 1] == "]":
        return values, end + 1
    while True:
        value, end = _expect_value(text, end)
        values.append(value)
        end = _skip_whitespace(text, end)
        char = text[end:end + 1]
        end += 1
        if char == "]":
            return values, end
        if char != ",":
            raise JSONDecodeError("Expecting ',' delimiter", text, end - 1)
        end = _skip_whitespace(text, end)
