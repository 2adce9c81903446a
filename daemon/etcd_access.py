"""How a process reaches etcd unless told otherwise, and its password file.

Shared by ``topoipamd`` (:mod:`topoipam.daemon.config`) and ``topoipamctl``,
so both default to the same endpoint and read a password file the same way.
"""

from __future__ import annotations

from .core.errors import InvalidInput

DEFAULT_ETCD_ENDPOINT = "http://127.0.0.1:2379"


def read_password_file(path: str, flag: str = "etcd-password-file") -> str:
    """The password in ``path``: its UTF-8 text without the trailing line end(s).

    Only trailing line ends go (``echo`` and editors add one; text mode reads a
    Windows "\\r\\n" as "\\n"); other whitespace may be part of the password.
    Undecodable bytes are a one-line error, as a missing file is.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except OSError as exc:
        raise InvalidInput(f"cannot read {flag} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"cannot read {flag} {path}: it is not UTF-8 text") from exc
