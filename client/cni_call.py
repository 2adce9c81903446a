"""The CNI plugin's one call to the daemon: a framed-JSON request on the fast
socket ``<socket>.cni`` (:mod:`topoipam.proto.cniwire`), through ``_socket``.
Part of the plugin (inlined into its file).
"""

from __future__ import annotations

# _socket, not socket: socket.py pulls in selectors and builds IntEnums at
# import, ~4 ms of a plugin whose whole start-up budget is a few tens of ms.
import _socket
import time

from topoipam.client import cni_addresses, cni_errors
from topoipam.proto import cjson
from topoipam.proto import cniwire as wire

# typing costs ~2 ms to import and is only needed by the type checker (which
# treats any TYPE_CHECKING as true); annotations are strings at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    Json = dict[str, Any]


def _connect(sock: _socket.socket, path: str, deadline: float) -> None:
    """Connect, waiting while the daemon's listen queue is full (EAGAIN on unix sockets)."""
    pause = 0.001
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def call(socket_path: str, timeout: float, method: str, request: Json) -> Json:
    """One request on ``<socket_path>.cni``; the response message or a CniError.

    Unreachable, timed out or cut off mid-answer are all CNI 11: every verb is
    safe to retry (ADD is idempotent per attachment, DEL of a released one is
    success).
    """
    path = wire.cni_socket_path(socket_path)
    try:
        frame = wire.encode_frame({"method": method, "request": request})
    except wire.FrameError as exc:
        raise cni_errors.config_error(f"cannot send the {method} request", str(exc)) from None
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(timeout)
            _connect(sock, path, deadline)
        except OSError as exc:
            raise cni_errors.CniError(
                wire.CNI_TRY_AGAIN, f"topoipam daemon unreachable at {path}",
                f"{exc.strerror or exc}; is topoipamd running?",
            ) from None
        try:
            sock.sendall(frame)
            header = _receive(sock, wire.HEADER_SIZE, deadline)
            answer = wire.decode_payload(_receive(sock, wire.frame_length(header), deadline))
        except TimeoutError:
            raise cni_errors.CniError(
                wire.CNI_TRY_AGAIN,
                f"topoipam daemon at {path} did not answer {method} within {timeout:g}s",
            ) from None
        except OSError as exc:
            raise cni_errors.CniError(
                wire.CNI_TRY_AGAIN, f"topoipam daemon at {path} dropped the {method} call",
                str(exc.strerror or exc),
            ) from None
        except wire.FrameError as exc:
            raise cni_errors.CniError(wire.CNI_INTERNAL_ERROR,
                                      f"malformed answer from topoipam daemon at {path}",
                                      str(exc)) from None
    finally:
        sock.close()
    status = answer.get("code")
    if status == "OK":
        response = answer.get("response", {})
        if not isinstance(response, dict):
            raise cni_errors.CniError(wire.CNI_INTERNAL_ERROR,
                                      f"malformed {method} answer from topoipam daemon",
                                      cjson.dumps(answer))
        return response
    cni_code = answer.get("cni_code")
    if not isinstance(cni_code, int) or isinstance(cni_code, bool):
        cni_code = (wire.CNI_TRY_AGAIN if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
                    else wire.CNI_INTERNAL_ERROR)
    message = answer.get("message") or f"{method} failed"
    raise cni_errors.DaemonError(str(status), cni_code, str(message), f"{method}: {status}")


def _receive(sock: _socket.socket, size: int, deadline: float) -> bytes:
    chunks = []
    while size > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(min(size, 65536))
        if not chunk:
            raise ConnectionResetError(0, "connection closed before the answer was complete")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def canonical_addresses(response: Json) -> list[Json]:
    """The response's addresses, each with its ``ip`` made canonical."""
    addresses = response.get("addresses", [])
    try:
        if not isinstance(addresses, list) or not all(isinstance(a, dict) for a in addresses):
            raise TypeError
        return [{**a, "ip": cni_addresses.canonical_ip(a.get("ip"))[1]} for a in addresses]
    except (TypeError, cni_errors.CniError):
        raise cni_errors.CniError(wire.CNI_INTERNAL_ERROR,
                                  "malformed address list from topoipam daemon",
                                  cjson.dumps(response)) from None
