"""The data model: pool gateways and attachment identity (tables and properties)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from topoipam.daemon.core import allocator
from topoipam.daemon.core.allocator import AssignContext
from topoipam.daemon.core.errors import AddressUnavailable, InvalidInput, PoolOverlap
from topoipam.daemon.core.holdings import (
    Attachment,
    Block,
    Handle,
    HandleAddress,
)
from topoipam.daemon.core.model import (
    IPAMConfig,
    IPPool,
    check_pool_overlaps,
)


def pool(cidr: str, gateway: object = None, block: int | None = None) -> IPPool:
    data: dict[str, object] = {"cidr": cidr}
    if gateway is not None:
        data["gateway"] = gateway
    if block is not None:
        data["blockSize"] = block
    return IPPool.from_dict("p", data)


@pytest.mark.parametrize(
    ("cidr", "gateway", "expected", "capacity"),
    [
        ("192.168.0.0/24", None, "192.168.0.1", 253),
        ("192.168.0.0/24", "192.168.0.254", "192.168.0.254", 253),
        ("192.168.0.0/24", "169.254.1.1", "169.254.1.1", 254),  # outside: nothing to keep
        ("192.168.0.0/24", "none", None, 254),
        ("192.168.0.0/24", "None", None, 254),
        ("fd00::/120", None, "fd00::1", 254),
        ("fd00::/120", "fe80::1", "fe80::1", 255),
        ("10.0.0.0/31", None, None, 2),  # a point-to-point pool is all hosts
        ("10.0.0.1/32", None, None, 1),
    ],
)
def test_every_pool_has_a_gateway_unless_it_opts_out(
        cidr: str, gateway: str | None, expected: str | None, capacity: int) -> None:
    p = pool(cidr, gateway, block=int(cidr.split("/")[1]) if cidr.endswith(("/31", "/32"))
             else None)
    assert (str(p.gateway) if p.gateway else None) == expected
    assert p.capacity == capacity
    if p.gateway is not None and p.gateway in p.cidr:
        assert not p.usable(p.gateway)
    round_trip = IPPool.from_dict("p", p.to_dict())
    assert round_trip.gateway == p.gateway


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ("192.168.0.0", "network or broadcast"),
        ("192.168.0.255", "network or broadcast"),
        ("fd00::1", "not an IPv4 address"),
        ("192.168.0.300", "not a valid IP address"),
        ("", "gateway must be"),
        (5, "gateway must be"),
    ],
)
def test_bad_gateways_are_refused_by_name(gateway: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        pool("192.168.0.0/24", gateway)


def test_the_gateway_is_never_assigned_next_specific_or_borrowed() -> None:
    p = pool("10.0.0.0/24")
    ctx = AssignContext(p)
    block = Block.empty(ipaddress.ip_network("10.0.0.0/26"), "n1")
    given_out = set()
    while (assigned := allocator.assign_next(block, "h", ctx)) is not None:
        block, address = assigned
        given_out.add(str(address))
    assert "10.0.0.1" not in given_out and len(given_out) == 62
    with pytest.raises(AddressUnavailable, match="gateway of pool p"):
        allocator.assign_address(Block.empty(block.cidr, "n2"), p.gateway,  # type: ignore[arg-type]
                                 "h", ctx)
    # A gateway the request's network config names is kept out the same way.
    excluded = AssignContext(pool("10.0.0.0/24", "none"), excluded=frozenset(
        {int(ipaddress.ip_address("10.0.0.1"))}))
    assert allocator.first_available(Block.empty(block.cidr, None), excluded) == 2
    with pytest.raises(AddressUnavailable, match="gateway of the network"):
        allocator.assign_address(Block.empty(block.cidr, None),
                                 ipaddress.ip_address("10.0.0.1"), "h", excluded)


# CNI spec: network names and container IDs start with an alphanumeric, then
# alphanumerics, '_', '.', '-'; interface names are up to 15 bytes, not '.'/'..',
# without '/', ':' or white space.
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
names = st.builds(lambda first, rest: first + rest, st.sampled_from(_ALNUM),
                  st.text(_ALNUM + "_.-", max_size=20))
ifnames = st.text(_ALNUM + "_.-@", min_size=1, max_size=15).filter(
    lambda s: s not in (".", ".."))


@given(st.tuples(names, names, ifnames), st.tuples(names, names, ifnames))
@example(("a", "b.c", "eth0"), ("a.b", "c", "eth0"))  # the pair found by hand in 0.1
@example(("a", "b", "c.eth0"), ("a", "b.c", "eth0"))
def test_distinct_attachments_never_share_a_handle(
        a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
    first, second = Attachment(*a), Attachment(*b)
    if a != b:
        assert first.handle_id != second.handle_id
    else:
        assert first.handle_id == second.handle_id


def test_the_dotted_ids_of_0_1_were_ambiguous_and_attributes_tell_them_apart() -> None:
    one, other = Attachment("a", "b.c", "eth0"), Attachment("a.b", "c", "eth0")
    assert one.legacy_handle_id == other.legacy_handle_id
    assert one.handle_id != other.handle_id
    legacy = Handle(one.legacy_handle_id, "n", (), {"network": "a", "container_id": "b.c",
                                                    "ifname": "eth0"})
    assert legacy.belongs_to(one) and not legacy.belongs_to(other)


def test_interface_names_dot_and_dotdot_are_refused() -> None:
    Attachment("n", "c", "e" * 15)
    # (the 15-byte limit is the plugin's, on ADD: a DEL of a longer name 0.1 took still works)
    for bad in (".", ".."):
        with pytest.raises(InvalidInput):
            Attachment("n", "c", bad)


def test_handle_addresses_record_what_add_reported() -> None:
    address = HandleAddress(ipaddress.ip_address("10.0.0.5"), ipaddress.ip_network("10.0.0.0/26"),
                            "rack-0", ipaddress.ip_network("10.0.0.0/24"),
                            ipaddress.ip_address("10.0.0.1"))
    handle = Handle("n/c/eth0", "node", (address,), {})
    assert Handle.from_dict(handle.id, handle.to_dict()) == handle
    old = Handle.from_dict("n.c.eth0", {"node": "node", "addresses": [
        {"ip": "10.0.0.5", "block": "10.0.0.0/26"}]})
    assert old.addresses[0].subnet is None and old.addresses[0].gateway is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"cidr": "192.168.0.1/24"}, "host bits set"),
        ({"cidr": "not-a-cidr"}, "not a CIDR"),
        ({"cidr": "192.168.0.0/24", "blockSize": 19}, "out of range"),
        ({"cidr": "192.168.0.0/24", "blockSize": 33}, "out of range"),
        ({"cidr": "fd00::/64", "blockSize": 26}, "out of range"),
        ({"cidr": "192.168.0.0/28", "blockSize": 26}, "smaller than one /26 block"),
        ({"cidr": "192.168.0.0/24", "nodeSelector": "rack =="}, "column"),
        ({"cidr": "192.168.0.0/24", "assignmentMode": "Sometimes"}, "Automatic or Manual"),
        ({"cidr": "192.168.0.0/24", "colour": "blue"}, "unknown field"),
    ],
)
def test_pool_validation(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        IPPool.from_dict("p", kwargs)


def test_pool_defaults_and_overlap() -> None:
    p4 = IPPool.from_dict("a", {"cidr": "10.0.0.0/16"})
    p6 = IPPool.from_dict("b", {"cidr": "fd00::/64"})
    assert (p4.block_size, p6.block_size, p4.node_selector) == (26, 122, "all()")
    with pytest.raises(PoolOverlap, match="overlaps pool a"):
        check_pool_overlaps(IPPool.from_dict("c", {"cidr": "10.0.1.0/24"}), [p4, p6])
    check_pool_overlaps(IPPool.from_dict("a", {"cidr": "10.0.0.0/8"}), [p4])  # same name: update


def test_config_validation() -> None:
    assert IPAMConfig.from_dict({"strictAffinity": True}).strict_affinity
    with pytest.raises(InvalidInput, match="maxBlocksPerHost"):
        IPAMConfig.from_dict({"maxBlocksPerHost": -1})
    assert IPAMConfig().sticky_takeover_seconds == 300
    assert IPAMConfig.from_dict({"stickyTakeoverSeconds": 0}).sticky_takeover_seconds == 0
    for bad in (-1, 1.5, "5", True):
        with pytest.raises(InvalidInput, match="stickyTakeoverSeconds"):
            IPAMConfig.from_dict({"stickyTakeoverSeconds": bad})
    with pytest.raises(InvalidInput, match="unknown field"):
        IPAMConfig.from_dict({"strict": True})


def test_block_round_trip_and_corruption() -> None:
    block = Block.empty(ipaddress.ip_network("fd00::40/122"), "n")
    block = allocator.assign_address(block, ipaddress.ip_address("fd00::41"), "h",
                                     AssignContext(IPPool.from_dict("v6", {"cidr": "fd00::/120"})))
    assert Block.from_dict(block.to_dict()) == block
    broken = block.to_dict()
    broken["unallocated"] = broken["unallocated"][1:]
    with pytest.raises(InvalidInput, match="disagree"):
        Block.from_dict(broken)


@pytest.mark.parametrize("bad", ["abc\n", "abc/def", "", "a b"])
def test_attachment_parts_are_refused_whole(bad: str) -> None:
    from topoipam.daemon.core.holdings import Attachment
    from topoipam.daemon.core.model import Node

    with pytest.raises(InvalidInput):
        Attachment("net", bad, "eth0")
    with pytest.raises(InvalidInput):
        Node(bad)


def test_sticky_identity_round_trips_and_knows_its_hold() -> None:
    from topoipam.daemon.core.holdings import (
        HandleAddress,
        Identity,
        parked_holder,
        parked_identity,
    )

    address = HandleAddress(ipaddress.ip_address("10.0.0.5"), ipaddress.ip_network("10.0.0.0/26"))
    parked = Identity("net/ns/web-0/eth0", (address,), "parked", "net/c1/eth0", "n0", 100.0)
    assert Identity.from_dict(parked.id, parked.to_dict()) == parked
    assert parked.expired(100.0) and not parked.expired(99.9)
    live = Identity("net/ns/web-0/eth0", (address,), "live", "net/c1/eth0", "n0")
    assert not live.expired(1e12)
    assert parked_identity(parked_holder(live.id)) == live.id
    assert parked_identity("net/c1/eth0") is None
    with pytest.raises(InvalidInput, match="corrupt"):
        Identity.from_dict("x", {"state": "gone"})
    assert IPAMConfig.from_dict({"stickyHoldSeconds": 5}).sticky_hold_seconds == 5
    assert IPAMConfig().sticky_hold_seconds == 600
