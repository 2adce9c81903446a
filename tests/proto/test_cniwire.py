"""The CNI socket's contract: framing and the one CNI code table (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from topoipam.proto import cniwire


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=20) | st.integers(), max_size=5))
def test_frames_round_trip(message: dict[str, object]) -> None:
    frame = cniwire.encode_frame(message)
    length = cniwire.frame_length(frame[:cniwire.HEADER_SIZE])
    assert length == len(frame) - cniwire.HEADER_SIZE
    assert cniwire.decode_payload(frame[cniwire.HEADER_SIZE:]) == message


@pytest.mark.parametrize(
    ("header", "fragment"),
    [(b"\0\0\0\0", "empty frame"), (b"\xff\xff\xff\xff", "exceeds"), (b"\0\0", "4 bytes")],
)
def test_bad_headers_are_refused_before_any_payload(header: bytes, fragment: str) -> None:
    with pytest.raises(cniwire.FrameError, match=fragment):
        cniwire.frame_length(header)


@pytest.mark.parametrize("payload", [b"\xff", b"[1]", b"{", b"[" * 100000])
def test_payloads_that_are_no_json_object_are_frame_errors(payload: bytes) -> None:
    with pytest.raises(cniwire.FrameError):
        cniwire.decode_payload(payload)


def test_error_responses_are_one_line() -> None:
    assert cniwire.error_response("UNAVAILABLE", "etcd\n  down", cniwire.CNI_TRY_AGAIN) == {
        "code": "UNAVAILABLE", "message": "etcd down", "cni_code": 11}
    assert cniwire.ok_response({"x": 1}) == {"code": "OK", "response": {"x": 1}}


def test_the_code_table_has_the_spec_codes_and_ours() -> None:
    codes = {name: value for name, value in vars(cniwire).items() if name.startswith("CNI_")
             and isinstance(value, int)}
    assert len(set(codes.values())) == len(codes), "every code once"
    assert (cniwire.CNI_INVALID_CONFIG, cniwire.CNI_TRY_AGAIN, cniwire.CNI_NOT_AVAILABLE) == (
        7, 11, 50)
    assert all(value >= 100 for name, value in codes.items()
               if name in ("CNI_NO_POOL", "CNI_EXHAUSTED", "CNI_ADDRESS_UNAVAILABLE"))
