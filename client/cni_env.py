"""The CNI plugin's environment: CNI_CONTAINERID, CNI_IFNAME, CNI_ARGS and the
network name, checked as the CNI spec and Linux allow (see the rules in
:mod:`topoipam.client.cni`). Part of the plugin (inlined into its file).
"""

from __future__ import annotations

# posix, not os: os imports _collections_abc, ~1 ms; the plugin needs only the
# environment, which posix holds as the bytes the runtime passed.
import posix
import sys

from topoipam.client import cni_errors
from topoipam.proto import cniwire as wire

# typing costs ~2 ms to import and is only needed by the type checker (which
# treats any TYPE_CHECKING as true); annotations are strings at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    Json = dict[str, Any]


# Linux IFNAMSIZ (16) less the terminating NUL.
_IFNAME_BYTES = 15


_ID_LENGTH = 255


K8S_ATTRIBUTES = {
    "K8S_POD_NAMESPACE": "namespace",
    "K8S_POD_NAME": "pod",
    "K8S_POD_INFRA_CONTAINER_ID": "pod_infra_container_id",
    "K8S_POD_UID": "pod_uid",
}


_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


_ID_CHARS = _ALNUM | frozenset("_.-")


def network_name(config: Json) -> str:
    name = config.get("name")
    if isinstance(name, str):
        problem = id_problem(name)
        if not problem:
            return name
    else:
        problem = "it is not a string"
    raise cni_errors.config_error(
        f"invalid network name {cni_errors.shown_value(name)}: {problem}",
        "name must start with a letter or digit, then letters, digits, _ . -")


def attachment_of(environ: Mapping[str, str], config: Json, releasing: bool = False) -> Json:
    """The attachment of CNI_CONTAINERID / CNI_IFNAME on the config's network.

    ``releasing`` (DEL) lets through an ifname of up to 15 characters but more
    than 15 bytes: earlier versions of this plugin counted characters, and with
    ptp (which allocates before the kernel sees the name) may have allocated for one.
    """
    container_id = env_var(environ, "CNI_CONTAINERID")
    if not container_id:
        raise cni_errors.CniError(wire.CNI_INVALID_ENV, "CNI_CONTAINERID is not set")
    problem = id_problem(container_id)
    if problem:
        raise cni_errors.CniError(
            wire.CNI_INVALID_ENV,
            f"invalid CNI_CONTAINERID {cni_errors.shown_value(container_id)}: {problem}",
            f"1-{_ID_LENGTH} characters: a letter or digit, then letters, digits, _ . -")
    ifname = env_var(environ, "CNI_IFNAME")
    if not ifname:
        raise cni_errors.CniError(wire.CNI_INVALID_ENV, "CNI_IFNAME is not set")
    problem = ifname_problem(ifname, releasing)
    if problem:
        raise cni_errors.CniError(
            wire.CNI_INVALID_ENV,
            f"invalid CNI_IFNAME {cni_errors.shown_value(ifname)}: {problem}",
            f"1-{_IFNAME_BYTES} bytes, not . or .., without / : or whitespace")
    return {"network": network_name(config), "container_id": container_id, "ifname": ifname}


def process_environ() -> dict[str, str]:
    """``os.environ`` as a dict: decoded as os decodes it (surrogateescape)."""
    encoding, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    return {key.decode(encoding, errors): value.decode(encoding, errors)
            for key, value in posix.environ.items()}


def _fsencode(text: str) -> bytes:
    """``os.fsencode``: the bytes the environment held."""
    return text.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def env_var(environ: Mapping[str, str], name: str) -> str:
    """A CNI_* variable ('' if unset); CNI error 4 if its bytes are not UTF-8.

    Python decodes the environment with surrogateescape, so bytes that are not
    UTF-8 arrive as lone surrogates; _fsencode gives the original bytes back.
    """
    value = environ.get(name, "")
    try:
        _fsencode(value).decode("utf-8")
        return value
    except UnicodeError:
        pass
    try:
        shown = str(_fsencode(value))[2:-1]  # the runtime's bytes: eth\xff
    except UnicodeError:  # not from a real environment: other surrogates
        shown = value.encode("utf-8", "backslashreplace").decode()
    raise cni_errors.CniError(wire.CNI_INVALID_ENV, f"{name} is not valid UTF-8",
                              f"{name}={shown[:100]}")


def id_problem(text: str) -> str:
    """Why ``text`` is no valid container ID or network name; '' if it is one."""
    if not text:
        return "it is empty"
    if len(text) > _ID_LENGTH:
        return f"it is {len(text)} characters long, more than the {_ID_LENGTH} allowed"
    if text[0] not in _ALNUM:
        return f"it starts with {text[0]!r}, not a letter or digit"
    bad = next((c for c in text if c not in _ID_CHARS), "")
    return f"{bad!r} is not allowed, only letters, digits, _ . -" if bad else ""


def ifname_problem(text: str, releasing: bool = False) -> str:
    """Why ``text`` is no valid Linux interface name; '' if it is one."""
    if not text:
        return "it is empty"
    if not is_utf8(text):
        return "it is not valid UTF-8"
    # The kernel counts bytes (IFNAMSIZ), not characters.
    size = len(text.encode())
    if size > _IFNAME_BYTES and not (releasing and len(text) <= _IFNAME_BYTES):
        return f"it is {size} bytes long, more than the {_IFNAME_BYTES} bytes Linux allows"
    if text in (".", ".."):
        return f"{text!r} is not allowed"
    bad = next((c for c in text if c in "/:" or c.isspace()), "")
    return f"{bad!r} is not allowed in an interface name" if bad else ""


def valid_container_id(text: str) -> bool:
    return not id_problem(text)


def valid_ifname(text: str) -> bool:
    return not ifname_problem(text)


def is_utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeError:  # a lone surrogate, e.g. "\udcff" escaped in JSON
        return False


def parse_cni_args(environ: Mapping[str, str]) -> dict[str, str]:
    """CNI_ARGS ``K=V;K2=V2`` as a dict."""
    parsed = {}
    for pair in env_var(environ, "CNI_ARGS").split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise cni_errors.CniError(wire.CNI_INVALID_ENV, f"invalid CNI_ARGS pair {pair!r}",
                                      "expected K=V;K2=V2")
        parsed[key] = value
    return parsed
