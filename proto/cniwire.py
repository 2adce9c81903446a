"""The CNI socket's contract, the one module both the plugin and the daemon import.

Framing, the method table and the one table of CNI error codes. Imports run
one way — client → daemon → proto — and this module sits at the bottom: the
plugin imports it on every pod start, so it stays standard-library only.

The CNI plugin is exec'd once per pod, so it cannot afford to import grpc or
protobuf (100+ ms). The daemon therefore serves the same ``topoipam.v1.Ipam``
API a second time, on ``<grpc socket>.cni``, as length-prefixed JSON:

* a frame is a 4-byte big-endian unsigned length followed by that many bytes of
  UTF-8 JSON holding one object; frames larger than :data:`MAX_FRAME` (16 MiB)
  are rejected, by the receiver as soon as it has read the 4-byte header;
* a request is ``{"method": "Allocate", "request": {...}}`` where ``request``
  is the proto3 JSON of the request message with the proto field names
  (``container_id``, ``assign_ipv4``, ...);
* a response is ``{"code": "OK", "response": {...}}`` or
  ``{"code": "<grpc status name>", "message": "one line", "cni_code": <int>}``.

A connection may carry several requests, answered in order.

This module is imported by the plugin on every pod start-up: it must stay pure
and import nothing but :mod:`topoipam.proto.cjson` (``json`` through its C
accelerator, without ``re``; not even :mod:`struct`: ``int.to_bytes`` does the
same work without another import).
"""

from __future__ import annotations

from topoipam.proto import cjson

# Only the type checker needs typing (see topoipam.client.cni).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Largest accepted payload (the JSON object, not counting the 4-byte header).
#: A GC request lists every valid attachment of the node: ~110 bytes each with
#: 64-character container IDs, so 1 MiB held only ~9,000; 16 MiB holds ~150,000
#: (~29,000 with 255-character IDs and network names). A receiver checks the
#: header before it buffers any payload, so a larger announced length costs it
#: nothing.
MAX_FRAME = 16 << 20
HEADER_SIZE = 4

#: The RPCs of ``topoipam.v1.Ipam``, which are all this socket carries.
METHODS = frozenset({"Allocate", "Release", "Get", "GarbageCollect", "Status"})

# The one table of CNI error codes. 1-99 are the spec's; 100 and up are ours.
CNI_INCOMPATIBLE_VERSION = 1  # unsupported cniVersion, or a verb the version lacks
CNI_UNSUPPORTED_FIELD = 2  # an unknown key in the network configuration
CNI_INVALID_ENV = 4  # CNI_COMMAND, CNI_CONTAINERID, CNI_IFNAME, CNI_ARGS
CNI_IO_ERROR = 5  # stdin could not be read
CNI_DECODE_ERROR = 6  # stdin (or a request) is not a JSON object
CNI_INVALID_CONFIG = 7  # a bad network or IPAM configuration, a bad request
CNI_TRY_AGAIN = 11  # daemon unreachable or timed out, etcd down, lost races
CNI_NOT_AVAILABLE = 50  # STATUS: no ADD can succeed now
CNI_FAILED = 100  # a topoipam error without a code of its own
CNI_NOT_FOUND = 102
CNI_ALREADY_EXISTS = 103
CNI_NO_POOL = 110  # no enabled pool selects the node
CNI_EXHAUSTED = 111  # the pools are full and nothing can be claimed or borrowed
CNI_ADDRESS_UNAVAILABLE = 112  # a requested address is held, reserved or outside the pools
CNI_CHECK_FAILED = 113  # CHECK: the attachment does not hold what prevResult says
CNI_INTERNAL_ERROR = 999  # anything unexpected (libcni's "internal error")


#: The daemon's gRPC socket unless configured otherwise (topoipamd --socket, the
#: plugin's ipam.socket); defined here, the one module both of them import.
DEFAULT_SOCKET = "/run/topoipam/topoipamd.sock"


class FrameError(ValueError):
    """A frame that cannot be encoded or decoded; the message is one line."""


def cni_socket_path(grpc_socket: str) -> str:
    """The fast CNI socket that sits next to the daemon's gRPC socket."""
    return grpc_socket + ".cni"


def encode_frame(message: dict[str, Any]) -> bytes:
    """Header + compact JSON of ``message``; FrameError if it is too large (or holds
    a lone surrogate, which no UTF-8 can carry)."""
    try:
        payload = cjson.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise FrameError(f"message is not encodable as UTF-8: {exc.reason} "
                         f"({exc.object[exc.start:exc.end]!a})") from None
    if len(payload) > MAX_FRAME:
        raise FrameError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte limit")
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def frame_length(header: bytes) -> int:
    """The payload length announced by a 4-byte header.

    Zero is rejected too: an empty payload can never hold a JSON object, and a
    peer that sends one has lost track of the framing.
    """
    if len(header) != HEADER_SIZE:
        raise FrameError(f"frame header must be {HEADER_SIZE} bytes, got {len(header)}")
    length = int.from_bytes(header, "big")
    if length == 0:
        raise FrameError("empty frame")
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return length


def decode_payload(payload: bytes) -> dict[str, Any]:
    """The JSON object of a frame's payload; FrameError if it is anything else."""
    try:
        message = cjson.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8 and bad JSON; RecursionError very deep nesting.
        raise FrameError(f"frame is not UTF-8 JSON: {_one_line(str(exc))}") from None
    if not isinstance(message, dict):
        raise FrameError(f"frame must hold a JSON object, not {type(message).__name__}")
    return message


def ok_response(response: dict[str, Any]) -> dict[str, Any]:
    """The success payload for a proto3-JSON response message."""
    return {"code": "OK", "response": response}


def error_response(code: str, message: str, cni_code: int) -> dict[str, Any]:
    """The failure payload: gRPC status name, one-line message, CNI error code."""
    return {"code": code, "message": _one_line(message), "cni_code": cni_code}


def _one_line(text: str) -> str:
    return " ".join(text.split())
