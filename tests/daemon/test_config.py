"""Daemon configuration: file < environment < flags, unknown keys refused (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from topoipam.daemon.config import load_config
from topoipam.daemon.core.errors import InvalidInput


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "topoipamd.toml"
    config_file.write_text('node = "from-file"\nprefix = "/from-file/v1"\n'
                           'etcd-endpoints = "http://127.0.0.1:1"\n')
    config = load_config({}, str(config_file), environ={})
    assert (config.node, config.prefix) == ("from-file", "/from-file/v1")
    config = load_config({}, str(config_file), environ={"TOPOIPAM_NODE": "from-env"})
    assert (config.node, config.prefix) == ("from-env", "/from-file/v1")
    config = load_config({"node": "from-flag", "prefix": None}, str(config_file),
                         environ={"TOPOIPAM_NODE": "from-env"})
    assert (config.node, config.prefix) == ("from-flag", "/from-file/v1")


@pytest.mark.parametrize(
    ("content", "environ", "fragment"),
    [
        ('nodee = "x"\n', {}, "unknown key 'nodee'"),
        ("node = [\n", {}, "config file"),
        ("", {"TOPOIPAM_NODEE": "x"}, "unknown environment variable TOPOIPAM_NODEE"),
    ],
)
def test_unknown_keys_and_bad_files_are_one_line_errors(
        tmp_path: Path, content: str, environ: dict[str, str], fragment: str) -> None:
    config_file = tmp_path / "topoipamd.toml"
    config_file.write_text(content)
    with pytest.raises(InvalidInput, match=fragment) as info:
        load_config({}, str(config_file), environ=environ)
    assert "\n" not in str(info.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read config file"):
        load_config({}, str(tmp_path / "absent.toml"), environ={})


def test_dev_serves_node_0_unless_a_node_is_named(tmp_path: Path) -> None:
    """README's walkthrough labels node-0, the node `topoipamd --dev` serves."""
    assert load_config({"dev": True, "state_dir": str(tmp_path)}, environ={}).node == "node-0"
    assert load_config({"dev": True, "node": "n7"}, environ={}).node == "n7"
    assert load_config({"dev": True}, environ={"TOPOIPAM_NODE": "n8"}).node == "n8"
