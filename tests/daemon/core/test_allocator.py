"""The pure allocator and model: tables and properties, no I/O."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topoipam.daemon.core import allocator
from topoipam.daemon.core.allocator import AssignContext, Reservations
from topoipam.daemon.core.errors import (
    AddressUnavailable,
    NoPoolForNode,
    UnknownPool,
)
from topoipam.daemon.core.holdings import Block
from topoipam.daemon.core.model import (
    IPPool,
    IPReservation,
)


def pool(name: str, cidr: str, selector: str = "all()", block: int | None = None,
         **kw: object) -> IPPool:
    network = ipaddress.ip_network(cidr)
    return IPPool(name, network, block or (26 if network.version == 4 else 122), selector,
                  **kw)  # type: ignore[arg-type]


RACK0 = pool("rack-0", "192.168.0.0/24", 'rack == "0"')
RACK1 = pool("rack-1", "192.168.1.0/24", 'rack == "1"')
MANUAL = pool("manual", "10.9.0.0/24", assignment_mode="Manual")
OFF = pool("off", "10.8.0.0/24", disabled=True)
V6 = pool("v6", "fd00::/120")


@pytest.mark.parametrize(
    ("labels", "family", "requested", "expected"),
    [
        ({"rack": "0"}, 4, (), ["rack-0"]),
        ({"rack": "1"}, 4, (), ["rack-1"]),
        ({"rack": "1"}, 6, (), ["v6"]),
        ({"rack": "0"}, 4, ("manual",), ["manual"]),
        ({"rack": "0"}, 4, ("192.168.1.0/24",), ["rack-1"]),
        ({"rack": "0"}, 4, ("rack-1", "rack-0"), ["rack-1", "rack-0"]),
    ],
)
def test_pool_choice(labels: dict[str, str], family: int, requested: tuple[str, ...],
                     expected: list[str]) -> None:
    chosen = allocator.pools_for_node([RACK1, MANUAL, OFF, V6, RACK0], "n", labels, family,
                                      requested)
    assert [p.name for p in chosen] == expected


def test_no_pool_for_node_names_node_labels_and_pools() -> None:
    with pytest.raises(NoPoolForNode) as info:
        allocator.pools_for_node([RACK0, RACK1], "node-9", {"rack": "7"}, 4)
    message = str(info.value)
    assert "node-9" in message and "rack=7" in message
    assert "rack-0" in message and "rack-1" in message


@pytest.mark.parametrize(
    ("requested", "fragment"),
    [(("nope",), "nope does not exist"), (("off",), "off is disabled"),
     (("v6",), "is an IPv6 pool"), (("10.0.0.0/8",), "10.0.0.0/8 does not exist")],
)
def test_unknown_requested_pool(requested: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(UnknownPool, match=fragment):
        allocator.pools_for_node([RACK0, OFF, V6], "n", {}, 4, requested)








def ctx(p: IPPool = RACK0, reservations: Reservations = allocator.NO_RESERVATIONS,
        now: float = 0.0, cooldown: float = 0.0) -> AssignContext:
    return AssignContext(p, reservations, now, cooldown)


def test_assign_skips_network_address_and_reservations() -> None:
    block = Block.empty(ipaddress.ip_network("192.168.0.0/26"), "n")
    reserved = Reservations([IPReservation("gw", (ipaddress.ip_network("192.168.0.1/32"),))])
    new, address = allocator.assign_next(block, "h", ctx(reservations=reserved)) or (None, None)
    assert str(address) == "192.168.0.2"
    assert block.in_use == 0 and new is not None and new.in_use == 1  # the input is untouched


def test_released_addresses_go_to_the_back_and_cool_down() -> None:
    block = Block.empty(ipaddress.ip_network("192.168.0.64/26"), "n")
    first = allocator.assign_next(block, "a", ctx())
    assert first is not None
    block, address = first
    block, freed = allocator.release_addresses(block, [address], "a", now=100.0)
    assert freed == [address] and block.unallocated[-1] == 0
    again = allocator.assign_next(block, "b", ctx())
    assert again is not None and again[1] != address
    with pytest.raises(AddressUnavailable, match="cooling down"):
        allocator.assign_address(block, address, "c", ctx(now=105.0, cooldown=10.0))
    allocator.assign_address(block, address, "c", ctx(now=111.0, cooldown=10.0))


def test_release_only_frees_the_holders_addresses() -> None:
    block = Block.empty(ipaddress.ip_network("192.168.0.0/26"), "n")
    block = allocator.assign_address(block, ipaddress.ip_address("192.168.0.5"), "a", ctx())
    after, freed = allocator.release_addresses(block, [ipaddress.ip_address("192.168.0.5")],
                                               "someone-else", now=0)
    assert freed == [] and after.in_use == 1


def test_specific_address_errors() -> None:
    block = Block.empty(ipaddress.ip_network("192.168.0.0/26"), "n")
    block = allocator.assign_address(block, ipaddress.ip_address("192.168.0.5"), "a", ctx())
    with pytest.raises(AddressUnavailable, match="already allocated"):
        allocator.assign_address(block, ipaddress.ip_address("192.168.0.5"), "b", ctx())
    with pytest.raises(AddressUnavailable, match="network or broadcast"):
        allocator.assign_address(block, ipaddress.ip_address("192.168.0.0"), "b", ctx())


def test_first_unclaimed_block() -> None:
    p = pool("p", "10.0.0.0/24")
    existing = {ipaddress.ip_network("10.0.0.0/26"), ipaddress.ip_network("10.0.0.128/26")}
    assert str(allocator.first_unclaimed_block(p, existing)) == "10.0.0.64/26"
    everything = set(p.block_cidrs())
    assert allocator.first_unclaimed_block(p, everything) is None




@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=120))
def test_assign_release_never_double_allocates(ops: list[tuple[bool, int]]) -> None:
    """Any sequence of assigns and releases keeps the block a partition of its ordinals."""
    block = Block.empty(ipaddress.ip_network("192.168.0.0/27"), "n")
    held: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
    for is_assign, n in ops:
        handle = f"h{n}"
        if is_assign and handle not in held:
            result = allocator.assign_next(block, handle, ctx())
            if result is None:
                assert allocator.free_count(block, ctx()) == 0
                continue
            block, address = result
            assert address not in held.values()
            held[handle] = address
        elif not is_assign and handle in held:
            block, freed = allocator.release_addresses(block, [held.pop(handle)], handle, now=1)
            assert len(freed) == 1
        assert sorted(block.allocations) + sorted(block.unallocated) != []
        assert set(block.allocations).isdisjoint(block.unallocated)
        assert len(block.allocations) + len(block.unallocated) == block.size
        assert {block.address(o) for o in block.allocations} == set(held.values())


def test_claim_skips_candidates_overlapping_leftover_blocks_of_another_size() -> None:
    p = pool("p", "10.0.0.0/24")  # /26 blocks
    leftovers = {ipaddress.ip_network("10.0.0.8/29"), ipaddress.ip_network("10.0.0.128/25")}
    assert str(allocator.first_unclaimed_block(p, leftovers)) == "10.0.0.64/26"




def test_a_full_pool_of_many_blocks_is_searched_in_one_pass() -> None:
    """16,384 claimed /26 blocks: the search sorts them once (it removed them from an
    address set one by one, quadratic: seconds for a /14 pool, minutes for a /12)."""
    p = pool("big", "10.0.0.0/12")
    blocks = list(p.block_cidrs())
    missing = blocks[12345]
    started = time.monotonic()
    assert allocator.first_unclaimed_block(p, set(blocks)) is None
    assert allocator.first_unclaimed_block(p, set(blocks) - {missing}) == missing
    reserved = Reservations([IPReservation("r", (missing,))])
    assert allocator.first_unclaimed_block(p, set(blocks) - {missing}, reserved) is None
    assert time.monotonic() - started < 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(26, 32)), max_size=40),
       st.sampled_from([None, "10.0.0.64/26", "10.0.0.128/25"]), st.booleans())
def test_first_unclaimed_block_is_the_first_free_slot_with_a_usable_address(
        claimed: list[tuple[int, int]], within: str | None, reserve: bool) -> None:
    p = pool("p", "10.0.0.0/24", block=30)
    existing = {ipaddress.ip_network(f"10.0.0.{n}/{length}", strict=False)
                for n, length in claimed}
    area = ipaddress.ip_network(within) if within else None
    reserved = Reservations([IPReservation("r", (ipaddress.ip_network("10.0.0.64/28"),))]
                            if reserve else [])
    expected = next((cidr for cidr in (area or p.cidr).subnets(new_prefix=30)
                     if not any(cidr.overlaps(e) for e in existing)
                     and any(p.usable(a) and a not in reserved for a in cidr)), None)
    assert allocator.first_unclaimed_block(p, existing, reserved, area) == expected


def test_claim_never_picks_a_block_of_only_unusable_addresses() -> None:
    # .0 and .3 are never handed out, nor .1, the pool's gateway
    assert str(allocator.first_unclaimed_block(pool("tiny", "10.0.0.0/30", block=32), set())
               ) == "10.0.0.2/32"
    p = pool("tiny", "10.0.0.0/30", block=32, gateway_spec="none")  # a routed pool
    assert str(allocator.first_unclaimed_block(p, set())) == "10.0.0.1/32"
    reserved = Reservations([IPReservation("r", (ipaddress.ip_network("10.0.0.1/32"),))])
    assert str(allocator.first_unclaimed_block(p, set(), reserved)) == "10.0.0.2/32"
    taken = {ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("10.0.0.2/32")}
    assert allocator.first_unclaimed_block(p, taken) is None


def test_hand_over_moves_an_address_only_from_its_holder() -> None:
    block = Block.empty(ipaddress.ip_network("10.0.0.0/30"), "n0")
    block.unallocated.remove(1)
    block.allocations[1] = "identity:a"
    address = ipaddress.ip_address("10.0.0.1")
    moved = allocator.hand_over(block, address, "identity:a", "net/c/eth0")
    assert moved is not None and moved.allocations[1] == "net/c/eth0"
    assert block.allocations[1] == "identity:a"  # a copy: the original is untouched
    assert allocator.hand_over(block, address, "net/other/eth0", "x") is None
    assert allocator.hand_over(block, ipaddress.ip_address("10.0.0.2"), "identity:a", "x") is None
