"""topoipamctl in-process (``ctl.run``) against a test's etcd prefix, for the tests of its
verbs (``test_ctl_*.py``): what a call returns, and the etcd state those tests set up and
compare. A refused command must leave the prefix exactly as it was
(:func:`refused_without_writes`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from topoipam.daemon.core.holdings import Attachment
from topoipam.daemon.core.writes import DeleteHandle
from topoipam.daemon.engine import AllocationEngine, AllocationRequest
from topoipam.daemon.store import EtcdStore


@dataclass
class Result:
    code: int
    out: str
    err: str


#: The ``run_ctl`` fixture: ``await run_ctl("get", "ippool", stdin=None)``.
Ctl = Callable[..., Awaitable[Result]]

RACK_POOLS = """\
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: rack-0}
spec: {cidr: 192.168.0.0/24, nodeSelector: rack == "0"}
---
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: rack-1}
spec: {cidr: 192.168.1.0/24, nodeSelector: rack == "1"}
"""


async def dump(store: EtcdStore, prefix: str) -> dict[bytes, tuple[bytes, int]]:
    kvs, _ = await store.prefix_raw(prefix.encode())
    return {kv.key: (kv.value, kv.mod_revision) for kv in kvs}


async def refused_without_writes(run_ctl: Ctl, store: EtcdStore, prefix: str, *argv: str
                                 ) -> Result:
    """Run a command that must be refused: one error line, nothing written."""
    before = await dump(store, prefix)
    result = await run_ctl(*argv)
    assert result.code == 1, result
    assert result.err.count("\n") == 1 and result.err.startswith("error: "), result.err
    assert await dump(store, prefix) == before
    return result


async def allocate(store: EtcdStore, node: str, container: str, pod: str) -> str:
    allocation = await AllocationEngine(store, node).allocate(AllocationRequest(
        Attachment("k8s-pod-network", container, "eth0"),
        attributes={"namespace": "default", "pod": pod},
    ))
    return str(allocation.addresses[0].ip)


async def delete_handle(store: EtcdStore, handle_id: str) -> None:
    """Corrupt the state the way a buggy writer would: the handle goes, the block keeps it."""
    handle = await store.get_handle(handle_id)
    assert handle is not None
    assert (await store.commit([DeleteHandle(handle_id, handle.mod_revision)])).succeeded
