"""topoipam.proto.cjson gives what json gives: same values, same text, same errors.

Malformed input is compared twice: in this process (where json.decoder is
loaded, so the C scanner raises json's own error) and in a bare ``python -I
-S`` with nothing but cjson imported — the plugin's situation, where the C
scanner cannot build its error and cjson's second parse must say what json
says.
"""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from topoipam.proto import cjson

CLIENT = Path(cjson.__file__).parent

_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
            | st.text(max_size=12))
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)

# Hand-picked malformed and edge-case documents (every message json's C
# scanner and decoder can produce), then random mutations of valid documents.
CASES = [
    "", " ", "\ufeff1", '"ab\x01c"', r'"a\qb"', r'"\x"', r'"\u12"', r'"\u12G4"', r'"\u0x12"',
    r'"\ud800\u12"', r'"\ud800\udc00"', r'"\udc00"', '"abc', '"abc\\', '{"a" 1}', "[1 2]",
    '{"a":1 "b"}', "{,}", "[1,]", '{"a":}', "-", "-x", "1.", "01", "[1e]", "1e+", '{"a":1,}',
    '{"a\x01":1}', "[", "{", '{"a"', '{"a":', "[1", "nul", "tru", "-Infinity", "NaN",
    "Infinity", "[-Inf]", "1e5", "-0.5e-3", "1E400", '{"a": [1, {"b": "\\u00e9"}]}',
    "1" * 5000, "[" * 50 + "]" * 50, '{"a": 1} x', "[1]]", '  {"a" : [ 1 , 2 ] }  ',
    '{"\\ud83d\\ude00": "\\u2603"}', "\"\\/\\b\\f\\n\\r\\t\"", "[1,\n2,\n,3]", "\t\r\n",
]
_ALPHABET = '{}[]":,\\ u0aex1-.+\n\x01'


def _mutations(count: int, seed: int = 12) -> list[str]:
    rng = random.Random(seed)
    valid = [json.dumps(v) for v in ({"a": [1, 2.5, None, True], "b": {"c": "d\\e"}},
                                     [{"cniVersion": "1.0.0", "ipam": {"routes": []}}],
                                     "\u00e9\ud83d\ude00", -12.5e-3)]
    mutated = []
    for _ in range(count):
        text = list(rng.choice(valid))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            action = rng.random()
            if action < 0.4 and text:
                del text[min(at, len(text) - 1)]
            elif action < 0.8:
                text.insert(at, rng.choice(_ALPHABET))
            elif text:
                text[min(at, len(text) - 1)] = rng.choice(_ALPHABET)
        mutated.append("".join(text))
    return mutated


def _outcome(loads: Any, text: str | bytes) -> tuple[str, str]:
    try:
        return "value", repr(loads(text))
    except (ValueError, RecursionError) as exc:
        return type(exc).__mro__[1].__name__ if type(exc).__name__ == "JSONDecodeError" \
            else type(exc).__name__, str(exc)


def test_decoding_matches_json_in_this_process() -> None:
    for text in CASES + _mutations(1500):
        assert _outcome(cjson.loads, text) == _outcome(json.loads, text), repr(text)


def test_decoding_matches_json_without_json_loaded() -> None:
    cases = CASES + _mutations(1500, seed=34)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cjson\n"
        "def outcome(text):\n"
        "    try:\n"
        "        return 'value', repr(cjson.loads(text))\n"
        "    except (ValueError, RecursionError) as exc:\n"
        "        kind = 'ValueError' if type(exc).__name__ == 'JSONDecodeError' \\\n"
        "            else type(exc).__name__\n"
        "        return kind, str(exc)\n"
        "cases = eval(sys.stdin.read())\n"
        "print(repr([outcome(text) for text in cases]))\n"
        "print(repr(sorted(m for m in ('json', 're', 'json.decoder') if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(CLIENT)],
                          input=repr(cases), capture_output=True, text=True, timeout=60,
                          check=True)
    outcomes, imported = done.stdout.splitlines()
    assert ast.literal_eval(imported) == []
    for text, got in zip(cases, ast.literal_eval(outcomes), strict=True):
        assert tuple(got) == _outcome(json.loads, text), repr(text)


def test_bytes_are_decoded_as_json_decodes_them() -> None:
    document = '{"name": "n\u00e9t", "x": [1]}'
    for encoded in (document.encode(), b"\xef\xbb\xbf" + document.encode(),
                    document.encode("utf-16"), document.encode("utf-16-le"),
                    document.encode("utf-16-be"), document.encode("utf-32"),
                    document.encode("utf-32-le"), document.encode("utf-32-be"),
                    b"1", b"12", b"\xff", b"\x00", b"", b'"\xed\xa0\x80"', bytearray(b"[1]")):
        assert _outcome(cjson.loads, encoded) == _outcome(json.loads, encoded), encoded


@settings(max_examples=300, deadline=None)
@given(value=_values)
def test_encoding_matches_json(value: Any) -> None:
    for ensure_ascii in (True, False):
        for separators in (None, (",", ":")):
            assert cjson.dumps(value, ensure_ascii=ensure_ascii, separators=separators) == \
                json.dumps(value, ensure_ascii=ensure_ascii, separators=separators)
    # repr: NaN is not equal to itself.
    assert repr(cjson.loads(cjson.dumps(value))) == repr(json.loads(json.dumps(value)))


def test_encoding_errors_match_json() -> None:
    circular: list[Any] = []
    circular.append(circular)
    for value in (circular, {1j: 1}, {"a": object()}, b"bytes", {(1, 2): 3}):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            expected: tuple[type[BaseException], str] = (type(exc), str(exc))
        try:
            cjson.dumps(value)
        except (TypeError, ValueError) as exc:
            assert (type(exc), str(exc)) == expected
        else:
            raise AssertionError(f"cjson encoded {value!r}")
