"""Probes of a running daemon for operators' scripts and the tests: health and metrics.

:func:`health_check` asks the daemon's gRPC socket the grpc.health.v1 status;
:func:`scrape` reads a daemon's (or etcd's) Prometheus text metrics. The
benchmarks' load clients live in ``bench/clients.py``. The plugin does not use
this module: it must not import grpc or asyncio.
"""

from __future__ import annotations

import urllib.request


def scrape(url: str) -> dict[str, float]:
    """A daemon's (or etcd's) Prometheus text metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def health_check(socket_path: str, timeout: float = 2.0) -> str:
    """The daemon's grpc.health.v1 status name (SERVING, NOT_SERVING), or why there is none."""
    import os

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not os.path.exists(socket_path):
        return "NO_SOCKET"
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError as exc:
        return str(exc.code().name)
