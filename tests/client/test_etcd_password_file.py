"""The etcd password file reads the same for topoipamd and topoipamctl (pure, no etcd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from topoipam.client import ctl
from topoipam.daemon.config import DaemonConfig
from topoipam.daemon.core.errors import InvalidInput


def daemon_password(path: Path) -> str | None:
    return DaemonConfig(node="n", etcd_user="u", etcd_password_file=str(path)).etcd_password()


def ctl_password(path: Path) -> str | None:
    args = ctl.build_parser().parse_args(
        ["--etcd-user", "u", "--etcd-password-file", str(path), "get", "ippool"])
    return ctl.etcd_options(args).password


@pytest.mark.parametrize("read", [daemon_password, ctl_password])
@pytest.mark.parametrize(("content", "password"), [
    (b"s3cret\n", "s3cret"),
    (b"s3cret\r\n", "s3cret"),  # written by a Windows editor
    (b"s3cret", "s3cret"),
    (b" s3 cret \n", " s3 cret "),  # other whitespace may be part of the password
    ("pässwörd\n".encode(), "pässwörd"),
])
def test_both_strip_only_the_trailing_line_end(
        tmp_path: Path, read: object, content: bytes, password: str) -> None:
    path = tmp_path / "password"
    path.write_bytes(content)
    assert callable(read) and read(path) == password


@pytest.mark.parametrize("read", [daemon_password, ctl_password])
def test_an_unreadable_or_undecodable_file_is_one_line_error(
        tmp_path: Path, read: object) -> None:
    assert callable(read)
    with pytest.raises(InvalidInput, match="cannot read etcd.password.file .*missing"):
        read(tmp_path / "missing")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\n")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        read(binary)
