"""Capacity per domain over in-memory snapshots, no etcd."""

from __future__ import annotations

import ipaddress

from topoipam.daemon.audit import Snapshot
from topoipam.daemon.capacity import capacity_report
from topoipam.daemon.core.holdings import Block
from topoipam.daemon.core.model import IPPool, IPReservation, Node


def test_addresses_reserved_after_they_were_allocated_are_not_counted_twice() -> None:
    """192.168.0.0/24 (253 usable: no network, broadcast or gateway), 10 addresses in use
    (.2 to .11), then .0/28 reserved: 14 usable addresses reserved, the 10 in use among
    them. Capacity 239, in use 10 (as `ipam show` counts), and 239 still free: the 10
    come back reserved, never to the free ones."""
    pool = IPPool("rack-0", ipaddress.ip_network("192.168.0.0/24"), 26)
    block = Block.empty(ipaddress.ip_network("192.168.0.0/26"), "node-0")
    for ordinal in range(2, 12):
        block.unallocated.remove(ordinal)
        block.allocations[ordinal] = f"net/c{ordinal}/eth0"
    reservation = IPReservation("early", (ipaddress.ip_network("192.168.0.0/28"),))
    snap = Snapshot(1, [pool], {"node-0": Node("node-0", {"rack": "0"})}, [reservation],
                    {block.cidr: block}, [("node-0", block.cidr)], {})
    [domain] = capacity_report(snap, "rack")
    counts = domain.families[4]
    assert (counts.capacity, counts.in_use, counts.free) == (239, 10, 239)
    assert domain.pods == 239
