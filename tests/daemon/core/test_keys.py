"""The etcd key schema, both directions (pure: no etcd)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from topoipam.daemon.core.errors import InvalidInput
from topoipam.daemon.core.keys import KeySchema, prefix_range_end

KEYS = KeySchema("/topoipam/v1")


def test_object_keys_carry_the_prefix_and_kind() -> None:
    assert KEYS.pool("rack-0") == b"/topoipam/v1/pools/rack-0"
    assert KEYS.node("node-0") == b"/topoipam/v1/nodes/node-0"
    assert KEYS.config() == b"/topoipam/v1/config"
    assert KEYS.handle("net/c/eth0") == b"/topoipam/v1/handles/net/c/eth0"
    assert KEYS.block(ipaddress.ip_network("192.168.0.64/26")) == (
        b"/topoipam/v1/blocks/v4/c0a80040-26")
    assert KEYS.block(ipaddress.ip_network("fd00::40/122")) == (
        b"/topoipam/v1/blocks/v6/fd000000000000000000000000000040-122")


def test_keys_back_to_objects() -> None:
    cidr = ipaddress.ip_network("10.0.1.0/26")
    assert KEYS.block_cidr(KEYS.block(cidr)) == cidr
    assert KEYS.affinity_of(KEYS.affinity("node-0", cidr)) == ("node-0", cidr)
    # Handle ids hold '/': the name is everything after the kind.
    assert KEYS.name_of(KEYS.handle("net/c/eth0")) == "net/c/eth0"
    with pytest.raises(InvalidInput):
        KEYS.block_cidr(KEYS.pool("p"))


@given(st.integers(0, 2**32 - 1), st.integers(20, 32))
def test_the_blocks_of_a_cidr_are_one_key_range(start: int, prefixlen: int) -> None:
    cidr = ipaddress.ip_network(f"{ipaddress.IPv4Address(start)}/{prefixlen}", strict=False)
    low, high = KEYS.blocks_in(cidr)
    inside = KEYS.block(cidr)
    assert low <= inside < high
    after = int(cidr.broadcast_address) + 1
    if after < 2**32:
        outside = KEYS.block(ipaddress.ip_network(f"{ipaddress.IPv4Address(after)}/32"))
        assert not low <= outside < high


def test_prefix_range_end_and_bad_prefixes() -> None:
    assert prefix_range_end(b"/a/") == b"/a0"
    assert prefix_range_end(b"\xff") == b"\0"
    with pytest.raises(InvalidInput, match="must start with '/'"):
        KeySchema("topoipam")
