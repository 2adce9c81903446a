"""The benchmarks' load clients of the daemon's two sockets: gRPC and the plugin's CNI socket.

An async gRPC client through the generated stub, and an async client of the
framed-JSON CNI socket (one connection per call, exactly as the ``topoipam``
plugin makes them), each with timed calls; and :func:`metric`, one series of
a scrape (:func:`topoipam.client.rpc.scrape`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import ns

from topoipam.proto import cniwire


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total = 0.0
    for series, value in values.items():
        base, _, rest = series.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


class IpamClient:
    """The daemon's gRPC API through the generated stub on one grpc.aio channel."""

    def __init__(self, socket_path: str, network: str = "rpc") -> None:
        import grpc.aio

        from topoipam.proto import ipam_pb2, ipam_pb2_grpc

        self.pb = ipam_pb2
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
        self.stub = ipam_pb2_grpc.IpamStub(self.channel)  # type: ignore[no-untyped-call]
        self.network = network

    def attachment(self, container: str) -> Any:
        return self.pb.Attachment(network=self.network, container_id=container, ifname="eth0")

    async def allocate(self, container: str, **fields: Any) -> Any:
        return await self.stub.Allocate(self.pb.AllocateRequest(
            attachment=self.attachment(container), assign_ipv4=True, **fields), timeout=30)

    async def release(self, container: str) -> Any:
        return await self.stub.Release(
            self.pb.ReleaseRequest(attachment=self.attachment(container)), timeout=30)

    async def timed_allocate(self, container: str) -> tuple[int, Any]:
        started = ns()
        reply = await self.allocate(container)
        return ns() - started, reply

    async def timed_release(self, container: str) -> int:
        started = ns()
        await self.release(container)
        return ns() - started

    async def close(self) -> None:
        await self.channel.close()


class CniSocketClient:
    """The daemon's framed-JSON CNI socket, one connection per call (as the plugin does).

    A connection the daemon did not take (its listen backlog was full) is retried
    after 1 ms, as a runtime retries a CNI error 11; ``retries`` counts them. Every
    call is idempotent per attachment, so a retry is safe.
    """

    def __init__(self, grpc_socket: str, network: str = "rpc-cni") -> None:
        self.path = cniwire.cni_socket_path(grpc_socket)
        self.network = network
        self.retries = 0

    async def call(self, method: str, request: dict[str, Any], timeout: float = 30.0
                   ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = await self._once(method, request)
                break
            except (OSError, asyncio.IncompleteReadError):
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(0.001)
        if answer.get("code") != "OK":
            raise RuntimeError(f"{method}: {answer.get('code')}: {answer.get('message')}")
        response: dict[str, Any] = answer.get("response", {})
        return response

    async def _once(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        wire = cniwire
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(wire.encode_frame({"method": method, "request": request}))
            header = await reader.readexactly(wire.HEADER_SIZE)
            payload = await reader.readexactly(wire.frame_length(header))
            message: dict[str, Any] = wire.decode_payload(payload)
            return message
        finally:
            writer.close()

    def attachment(self, container: str) -> dict[str, str]:
        return {"network": self.network, "container_id": container, "ifname": "eth0"}

    async def allocate(self, container: str) -> dict[str, Any]:
        return await self.call("Allocate", {"attachment": self.attachment(container),
                                            "assign_ipv4": True})

    async def release(self, container: str) -> dict[str, Any]:
        return await self.call("Release", {"attachment": self.attachment(container)})

    async def timed_allocate(self, container: str) -> int:
        started = ns()
        await self.allocate(container)
        return ns() - started

    async def timed_release(self, container: str) -> int:
        started = ns()
        await self.release(container)
        return ns() - started
