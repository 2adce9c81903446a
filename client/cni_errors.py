"""The CNI plugin's failures: :class:`CniError` (code, message, details), and the
error JSON the runtime reads on stdout.

Part of the plugin (inlined into its file, see :mod:`topoipam.client.cni_bundle`):
standard library C modules and the inlined modules before it only.
"""

from __future__ import annotations

from topoipam.proto import cjson
from topoipam.proto import cniwire as wire

# typing costs ~2 ms to import and is only needed by the type checker (which
# treats any TYPE_CHECKING as true); annotations are strings at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    Json = dict[str, Any]


class CniError(Exception):
    """A failure reported to the runtime as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class DaemonError(CniError):
    """The daemon answered with an error; ``status`` is its gRPC status name."""

    def __init__(self, status: str, code: int, msg: str, details: str) -> None:
        super().__init__(code, msg, details)
        self.status = status


def config_error(msg: str, details: str = "") -> CniError:
    return CniError(wire.CNI_INVALID_CONFIG, msg, details)


def shown_value(value: object, limit: int = 80) -> str:
    """A config value for an error message: as JSON, cut short if long."""
    text = cjson.dumps(value, ensure_ascii=False)  # the error JSON escapes what it must
    return text if len(text) <= limit else text[:limit - 3] + "..."


def unexpected_error(version: str, exc: BaseException) -> str:
    return error_json(version, wire.CNI_INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


def error_json(version: str, code: int, msg: str, details: str = "") -> str:
    error: Json = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        error["details"] = details
    return cjson.dumps(error)
