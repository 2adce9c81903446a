"""Bad IPPool input for priorities and topology ranges, by every way in.

``topoipamctl apply -f`` (topoipam/v1 and Calico manifests) and ``create
ippool`` flags: each bad value is one line naming the field and its bound, no
traceback, and nothing is written.
"""

from __future__ import annotations

import json

import pytest

from tests.daemons import ctl as ctl_input
from tests.integration.test_engine import ctl

# ---------------------------------------------------------------------- bad input
BAD_SPECS = [
    ("priority: high", "priority must be an integer from -1000 to 1000, not the text 'high'"),
    ("priority: 1.5", "priority 1.5 must be an integer from -1000 to 1000"),
    ("priority: true", "priority True must be an integer from -1000 to 1000"),
    ("priority: -1001", "priority -1001 must be an integer from -1000 to 1000"),
    ("priority: [1]", "priority [1] must be an integer from -1000 to 1000"),
    ("topologyKey: 'bad key!'", "topologyKey: invalid label key 'bad key!'"),
    ("topologyKey: a/b/c", "topologyKey: invalid label key 'a/b/c'"),
    ("topologyKey: 5", "topologyKey must be a node label key, not 5"),
    ("topologyKey: rack, topologyBlockSize: 23",
     "topologyBlockSize 23 must be a prefix length from 24 (the pool's) to 28 (its blockSize)"),
    ("topologyKey: rack, topologyBlockSize: 29",
     "topologyBlockSize 29 must be a prefix length from 24 (the pool's) to 28 (its blockSize)"),
    ("topologyKey: rack, topologyBlockSize: 26.0", "topologyBlockSize 26.0 must be a prefix"),
    ("topologyKey: rack, topologyBlockSize: '26'",
     "topologyBlockSize must be a prefix length (a number), not the text '26'"),
    ("topologyBlockSize: 26", "topologyBlockSize needs a topologyKey"),
]


def pools_listed(env: dict[str, str]) -> list[object]:
    done = ctl(env, "get", "ippool", "-o", "json")
    assert done.returncode == 0, done.stderr
    items: list[object] = json.loads(done.stdout)["items"]
    return items


CALICO = "projectcalico.org/v3"  # Calico manifests carry the same fields, checked alike


@pytest.mark.parametrize("api, spec, message", [
    *(("topoipam/v1", spec, message) for spec, message in BAD_SPECS),
    *((CALICO, spec, message) for spec, message in BAD_SPECS[::4]),
], ids=[*(s for s, _ in BAD_SPECS), *(f"calico-{s}" for s, _ in BAD_SPECS[::4])])
def test_a_bad_field_is_one_line_naming_it_and_its_bound_and_nothing_is_written(
        ctl_env: dict[str, str], api: str, spec: str, message: str) -> None:
    manifest = (f"apiVersion: {api}\nkind: IPPool\nmetadata: {{name: p}}\n"
                f"spec: {{cidr: 10.92.0.0/24, blockSize: 28, {spec}}}\n")
    done = ctl_input(ctl_env, "apply", "-f", "-", input=manifest)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert pools_listed(ctl_env) == []


@pytest.mark.parametrize("flags, message", [
    (["--priority", "x"], "argument --priority: must be an integer from -1000 to 1000, not 'x'"),
    (["--priority", "1.5"], "argument --priority: must be an integer from -1000 to 1000"),
    (["--priority", "2000"], "argument --priority: must be an integer from -1000 to 1000"),
    (["--topology-key", "bad key!"], "topologyKey: invalid label key 'bad key!'"),
    (["--topology-key", "rack", "--topology-block-size", "29"],
     "topologyBlockSize 29 must be a prefix length from 24 (the pool's) to 28 (its blockSize)"),
    (["--topology-key", "rack", "--topology-block-size", "x"],
     "argument --topology-block-size: must be a prefix length"),
    (["--topology-block-size", "26"], "topologyBlockSize needs a topologyKey"),
])
def test_create_ippool_flags_are_checked_like_the_manifest_fields(
        ctl_env: dict[str, str], flags: list[str], message: str) -> None:
    done = ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.92.0.0/24", "--block-size", "28",
               *flags)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr.strip().splitlines()[-1], done.stderr
    assert pools_listed(ctl_env) == []


def test_create_ippool_with_topology_flags_and_a_null_priority(ctl_env: dict[str, str]) -> None:
    done = ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.92.0.0/24", "--block-size", "28",
               "--topology-key", "rack", "--topology-block-size", "26", "--priority", "-5")
    assert done.returncode == 0, done.stderr
    [pool] = pools_listed(ctl_env)
    assert pool["spec"]["topologyKey"] == "rack"  # type: ignore[index]
    assert pool["spec"]["topologyBlockSize"] == 26  # type: ignore[index]
    assert pool["spec"]["priority"] == -5  # type: ignore[index]
    manifest = ("apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: q}\n"
                "spec: {cidr: 10.93.0.0/24, priority: null}\n")
    done = ctl_input(ctl_env, "apply", "-f", "-", input=manifest)
    assert done.returncode == 0, done.stderr  # null: the default, as for the other fields


def test_a_pool_of_one_range_is_created_with_a_warning(ctl_env: dict[str, str]) -> None:
    done = ctl(ctl_env, "create", "ippool", "p", "--cidr", "10.96.0.0/24", "--block-size", "28",
               "--topology-key", "rack")  # ranges of /24 by default: the whole pool
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == (
        "warning: ippool p: topologyKey rack with ranges of /24 leaves the pool one range: "
        "only one value of rack can claim blocks in it (set a longer topologyBlockSize, up "
        "to 28)"), done.stderr
