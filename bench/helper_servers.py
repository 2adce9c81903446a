"""The two helper servers the benchmarks measure floors with, each its own process.

``echo-server SOCKET``: an empty grpc.aio unary call (the floor of any gRPC
round trip). ``minimal-server SOCKET ETCD``: a grpc.aio ``Ipam`` whose
Allocate does nothing but one raw etcd CAS transaction (what any Python
daemon on this stack pays before its own logic). Started by
:meth:`common.Workspace.echo_server` and ``minimal_server``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from common import EtcdTxnFloor, block_value


async def _echo_server(socket_path: str) -> None:
    import grpc
    import grpc.aio

    async def empty(request: bytes, context: Any) -> bytes:
        return b""

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Empty": grpc.unary_unary_rpc_method_handler(empty)}),))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    await _serve_until_signal(server)


async def _minimal_server(socket_path: str, endpoint: str) -> None:
    import grpc.aio

    from topoipam.proto import ipam_pb2, ipam_pb2_grpc

    floor = EtcdTxnFloor(endpoint, b"/topoipam-bench/minimal-server/block",
                         block_value("10.254.0.0/26"))
    await floor.setup()

    class Minimal(ipam_pb2_grpc.IpamServicer):
        async def Allocate(self, request: Any, context: Any) -> Any:  # noqa: N802
            await floor.once()
            response = ipam_pb2.AllocateResponse(handle=request.attachment.container_id)
            response.addresses.add(ip="10.254.0.1", pool="minimal", pool_cidr="10.254.0.0/16",
                                   block="10.254.0.0/26", family=4)
            return response

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ipam_pb2_grpc.add_IpamServicer_to_server(Minimal(), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    await _serve_until_signal(server)
    await floor.close()


async def _serve_until_signal(server: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(0.5)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo-server":
        asyncio.run(_echo_server(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "minimal-server":
        asyncio.run(_minimal_server(sys.argv[2], sys.argv[3]))
    else:
        sys.exit("usage: python bench/helper_servers.py echo-server SOCKET | "
                 "minimal-server SOCKET ETCD_ENDPOINT")
