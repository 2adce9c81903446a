"""The CNI plugin's address parsing: canonical IP addresses and CIDRs, through
the C ``_socket`` module (no ``ipaddress``, which costs the plugin milliseconds).

An IPv4-mapped IPv6 address is the IPv4 one, as Go's ``net.ParseIP(...).To4()``
reads it. Part of the plugin (inlined into its file).
"""

from __future__ import annotations

# _socket, not socket: socket.py pulls in selectors and builds IntEnums at
# import, ~4 ms of a plugin whose whole start-up budget is a few tens of ms.
import _socket

from topoipam.client import cni_errors

# typing costs ~2 ms to import and is only needed by the type checker (which
# treats any TYPE_CHECKING as true); annotations are strings at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    Json = dict[str, Any]


# The first 12 bytes of an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
_V4_MAPPED = bytes(10) + b"\xff\xff"


def canonical_ip(text: object, what: str = "address") -> tuple[int, str]:
    """(4 or 6, canonical text) of an IP address; config error if it is none.

    An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is that IPv4 address, as
    for Go's ``net.ParseIP(...).To4()`` and so for host-local and the plugins
    that read our result.
    """
    if isinstance(text, str):
        try:
            return 4, _socket.inet_ntop(_socket.AF_INET, _socket.inet_pton(_socket.AF_INET, text))
        except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the text
            pass
        try:
            packed = _socket.inet_pton(_socket.AF_INET6, text)
        except (OSError, ValueError):
            pass
        else:
            if packed[:12] == _V4_MAPPED:
                return 4, _socket.inet_ntop(_socket.AF_INET, packed[12:])
            return 6, _socket.inet_ntop(_socket.AF_INET6, packed)
    raise cni_errors.config_error(f"invalid IP address in {what}: {cni_errors.shown_value(text)}")


def canonical_cidr(text: str, what: str) -> tuple[int, str, int]:
    """(family, canonical address, prefix length) of ``ip/prefix``; config error if invalid.

    An IPv4-mapped CIDR is the IPv4 one: ``::ffff:10.0.0.0/104`` is ``10.0.0.0/8``.
    """
    address, sep, length = text.partition("/")
    family, ip = canonical_ip(address, what)
    written = 6 if ":" in address else 4
    # ASCII digits only, at most 3: int() would take "²" or a 5,000-digit string badly.
    bits = int(length) if 0 < len(length) <= 3 and all(c in "0123456789" for c in length) else -1
    if family != written:  # IPv4-mapped
        bits = bits - 96 if bits >= 96 else -1
    if not sep or not 0 <= bits <= (32 if family == 4 else 128):
        raise cni_errors.config_error(
            f"invalid CIDR in {what}: {cni_errors.shown_value(text)}",
            "the prefix length must be 0-32 for IPv4, 0-128 for IPv6, 96-128 for IPv4-mapped IPv6",
        )
    return family, ip, bits
