"""The gRPC servicer: protobuf in, domain values to the engine, protobuf out.

Domain errors become status codes through one table (each TopoipamError
subclass names its code). The same methods serve the CNI plugin's framed-JSON
socket through :meth:`IpamService.dispatch`, so both transports carry the
same messages and the same errors.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import FieldDescriptor

from topoipam import package_version
from topoipam.proto import cniwire, ipam_pb2, ipam_pb2_grpc

from .core import allocator
from .core.calls import Allocation, AllocationRequest
from .core.errors import InvalidInput, NotFound, TopoipamError
from .core.holdings import Attachment
from .core.model import (
    IPAddress,
    IPNetwork,
    check_label,
)
from .core.view import ClusterState
from .engine import AllocationEngine
from .metrics import Metrics

log = logging.getLogger(__name__)

# Read once: the metadata lookup reads files, which a Status call should not.
VERSION = package_version()

# The one table from domain errors to gRPC status codes.
STATUS_OF = {name: getattr(grpc.StatusCode, name) for name in (
    "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL",
)}


def error_codes(exc: TopoipamError) -> tuple[str, int]:
    """(gRPC status name, CNI code) of a domain error: retriable ones are "try again"."""
    if exc.retriable:
        return "UNAVAILABLE", cniwire.CNI_TRY_AGAIN
    return exc.code, exc.cni_code


def _attachment(message: Any) -> Attachment:
    if not message.network and not message.container_id and not message.ifname:
        raise InvalidInput("attachment (network, container_id, ifname) is required")
    return Attachment(message.network, message.container_id, message.ifname)


def _address(text: str, what: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(text.split("/")[0])
    except ValueError:
        raise InvalidInput(f"{what} {text!r} is not an IP address") from None
    if getattr(address, "scope_id", None):
        raise InvalidInput(f"{what} {text!r} carries a zone; drop the %zone")
    return address


def _allocation_fields(allocation: Allocation) -> dict[str, Any]:
    """AllocateResponse / GetResponse as plain fields (protobuf or JSON is the transport's job)."""
    return {
        "handle": allocation.handle_id,
        "addresses": [
            {
                "ip": str(address.ip),
                "pool": address.pool,
                "pool_cidr": str(address.subnet or address.block),
                "block": str(address.block),
                "family": address.ip.version,
                "gateway": str(address.gateway) if address.gateway is not None else "",
            }
            for address in allocation.addresses
        ],
    }


_PYTHON_TYPE = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
}


_MAP, _LIST, _ONE = range(3)


def _fields_of(descriptor: Any) -> dict[str, tuple[int, Any, Any]]:
    """name -> (map / list / one, message descriptor or None, Python type or None)."""
    fields = _FIELDS.get(descriptor.full_name)
    if fields is None:
        fields = _FIELDS[descriptor.full_name] = {}
        for field in descriptor.fields:
            message = field.message_type
            if message is not None and message.GetOptions().map_entry:
                kind = _MAP
            else:
                kind = _LIST if field.is_repeated else _ONE
            fields[field.name] = (kind, message, _PYTHON_TYPE.get(field.type))
    return fields


# Read from the descriptors once: their accessors cost more than a request's whole check.
_FIELDS: dict[str, dict[str, tuple[int, Any, Any]]] = {}


class JsonRequest:
    """A request message read from proto3 JSON (proto field names), checked like ParseDict.

    Attribute access mirrors the generated message class, defaults included,
    so one set of handlers serves gRPC and the CNI socket; building it costs
    a fraction of ``json_format.ParseDict`` on the per-pod path.
    """

    __slots__ = ("_fields", "_values")

    def __init__(self, descriptor: Any, payload: object, where: str = "") -> None:
        if not isinstance(payload, dict):
            raise InvalidInput(f"{where or descriptor.name} must be a JSON object")
        self._fields = fields = _fields_of(descriptor)
        for name, value in payload.items():
            field = fields.get(name)
            if field is None:
                raise InvalidInput(f"{descriptor.name} has no field {name!r}")
            payload[name] = _checked(field, value, f"{where}{name}")
        self._values = payload

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            field = self._fields.get(name)
            if field is None:
                raise AttributeError(name) from None
            value = self._values[name] = _default(field)
            return value


def _checked(field: tuple[int, Any, Any], value: Any, where: str) -> Any:
    kind, message, expected = field
    if value is None:
        return _default(field)
    if kind == _MAP:
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise InvalidInput(f"{where} must be an object of strings")
        return value
    if kind == _LIST:
        if not isinstance(value, list):
            raise InvalidInput(f"{where} must be a list")
        return [_one(message, expected, item, f"{where}[]") for item in value]
    return _one(message, expected, value, where)


def _one(message: Any, expected: Any, value: Any, where: str) -> Any:
    if message is not None:
        return JsonRequest(message, value, f"{where}.")
    if type(value) is not expected:
        raise InvalidInput(f"{where} must be a {expected.__name__}")
    return value


def _default(field: tuple[int, Any, Any]) -> Any:
    kind, message, expected = field
    if kind == _MAP:
        return {}
    if kind == _LIST:
        return []
    if message is not None:
        return JsonRequest(message, {})
    return expected()


async def _serving() -> str:
    return ""


class StatusProvider:
    """What Status reports beyond the engine: cache sync, etcd reachability, block usage."""

    def __init__(
        self,
        in_sync: Callable[[], bool],
        etcd_check: Callable[[], Awaitable[str]],
        state: Callable[[], ClusterState | None],
        usage: Callable[[], list[tuple[str, int, int, int]]],
        owns_block: Callable[[IPNetwork], bool] = lambda _: True,
        not_serving: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.in_sync = in_sync
        #: Why the daemon does not serve although etcd answers ("" when it does): it
        #: does not hold its node's fence, it re-asserts after a restore, etcd's NOSPACE.
        self.not_serving = not_serving or _serving
        self.etcd_check = etcd_check
        self.state = state
        #: (pool, affine blocks, addresses in use, free addresses) per pool
        self.usage = usage
        #: whether a block is this node's (an address from any other one was borrowed)
        self.owns_block = owns_block


class IpamService(ipam_pb2_grpc.IpamServicer):
    """topoipam.v1.Ipam on top of one node's :class:`AllocationEngine`."""

    def __init__(self, ipam: AllocationEngine, status: StatusProvider, metrics: Metrics,
                 request_timeout: float = 20.0) -> None:
        self.ipam = ipam
        self.status = status
        self.metrics = metrics
        self.request_timeout = request_timeout
        # method -> (request class, response class, handler returning the response's fields)
        self._methods: dict[str, tuple[Any, Any, Callable[[Any], Awaitable[dict[str, Any]]]]] = {
            "Allocate": (ipam_pb2.AllocateRequest, ipam_pb2.AllocateResponse, self.allocate),
            "Release": (ipam_pb2.ReleaseRequest, ipam_pb2.ReleaseResponse, self.release),
            "Get": (ipam_pb2.GetRequest, ipam_pb2.GetResponse, self.get),
            "GarbageCollect": (ipam_pb2.GarbageCollectRequest,
                               ipam_pb2.GarbageCollectResponse, self.garbage_collect),
            "Status": (ipam_pb2.StatusRequest, ipam_pb2.StatusResponse, self.node_status),
        }
        assert set(self._methods) == cniwire.METHODS, "the CNI socket serves exactly the RPCs"

    # ------------------------------------------------------------------ domain calls
    async def allocate(self, request: Any) -> dict[str, Any]:
        attributes = dict(request.attributes)
        for key, value in attributes.items():
            check_label(key, value, "attributes")
        addresses = [_address(text, "requested address") for text in request.ips]
        domain = AllocationRequest(
            attachment=_attachment(request.attachment),
            ipv4=request.assign_ipv4,
            ipv6=request.assign_ipv6,
            ipv4_pools=tuple(request.ipv4_pools),
            ipv6_pools=tuple(request.ipv6_pools),
            addresses=tuple(addresses),
            attributes=attributes,
            gateways=tuple(_address(text, "gateway") for text in request.gateways),
            identity=request.identity,
        )
        allocation = await self.ipam.allocate(domain)
        for address in allocation.addresses:
            if not self.status.owns_block(address.block):
                self.metrics.borrowed.inc()
        for top, served in allocation.fallbacks:
            self.metrics.fallbacks.labels(top, served).inc()
        return _allocation_fields(allocation)

    async def release(self, request: Any) -> dict[str, Any]:
        released = await self.ipam.release_attachment(_attachment(request.attachment))
        return {"released": [str(a) for a in released]}

    async def get(self, request: Any) -> dict[str, Any]:
        attachment = _attachment(request.attachment)
        allocation = await self.ipam.get(attachment)
        if allocation is None:
            raise NotFound(f"{attachment.handle_id} holds no address")
        return _allocation_fields(allocation)

    async def garbage_collect(self, request: Any) -> dict[str, Any]:
        if not request.network:
            raise InvalidInput("network is required")
        keep = {_attachment(a).handle_id for a in request.valid_attachments}
        for attachment in request.valid_attachments:
            if attachment.network != request.network:
                raise InvalidInput(
                    f"valid attachment of network {attachment.network!r} in a GC of "
                    f"network {request.network!r}"
                )
        released = await self.ipam.garbage_collect(request.network, keep)
        return {"released_handles": released}

    async def node_status(self, request: Any) -> dict[str, Any]:
        etcd_error = await self.status.etcd_check()
        state = self.status.state()
        response: dict[str, Any] = {
            "node": self.ipam.node,
            "in_sync": self.status.in_sync(),
            "etcd_reachable": not etcd_error,
            "etcd_error": etcd_error,
            "version": VERSION,
        }
        if state is not None:
            response["labels"] = dict(state.labels)
            response["pools"] = [
                {"name": pool.name, "cidr": str(pool.cidr), "selected": selected,
                 "reason": reason}
                for pool in state.pools
                for selected, reason in [allocator.explain_pool(pool, state.labels)]
            ]
            rows = self.status.usage()
            response["affine_blocks"] = sum(row[1] for row in rows)
            response["free_addresses"] = sum(row[3] for row in rows)
        reason = ""
        if etcd_error:
            reason = f"etcd unreachable: {etcd_error}"
        elif not response["in_sync"] or state is None:
            reason = "the cache is not in sync with etcd"
        elif blocked := await self.status.not_serving():
            reason = blocked
        else:
            families = [f for f, wanted in ((4, request.assign_ipv4),
                                            (6, request.assign_ipv6)) if wanted]
            try:
                reason = await self.ipam.readiness(
                    families, {4: list(request.ipv4_pools), 6: list(request.ipv6_pools)})
            except TopoipamError as exc:
                reason = exc.message
        response["ready"] = not reason
        response["not_ready_reason"] = reason
        return response

    # ------------------------------------------------------------------ transports
    async def _call(self, method: str, request: Any, bounded: bool = True) -> dict[str, Any]:
        """Run a handler, with metrics; ``bounded`` adds the request timeout."""
        handler = self._methods[method][2]
        started = time.perf_counter()
        outcome = "ok"
        try:
            if not bounded:
                return await handler(request)
            async with asyncio.timeout(self.request_timeout):
                return await handler(request)
        except TopoipamError as exc:
            outcome = type(exc).__name__
            raise
        except TimeoutError:
            outcome = "timeout"
            raise
        finally:
            self.metrics.observe_call(method, outcome, time.perf_counter() - started)

    async def _grpc(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self._methods[method][1](**await self._call(method, request))
        except TopoipamError as exc:
            await context.abort(STATUS_OF.get(error_codes(exc)[0], grpc.StatusCode.UNKNOWN),
                                exc.message)
        except TimeoutError:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{method} did not finish within {self.request_timeout:g}s; "
                                "etcd may be unreachable")

    async def Allocate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._grpc("Allocate", request, context)

    async def Release(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._grpc("Release", request, context)

    async def Get(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._grpc("Get", request, context)

    async def GarbageCollect(  # noqa: N802
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        return await self._grpc("GarbageCollect", request, context)

    async def Status(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self._grpc("Status", request, context)

    async def dispatch(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The CNI socket's entry: proto3 JSON (proto field names) in and out."""
        entry = self._methods.get(method)
        if entry is None:
            return cniwire.error_response("UNIMPLEMENTED", f"unknown method {method!r}",
                                          cniwire.CNI_INVALID_ENV)
        try:
            # No timer of our own on this, the per-pod path: the plugin's deadline
            # governs, and every etcd call a handler makes is bounded already.
            response = await self._call(method, JsonRequest(entry[0].DESCRIPTOR, payload),
                                        bounded=False)
        except TopoipamError as exc:
            code, cni_code = error_codes(exc)
            return cniwire.error_response(code, exc.message, cni_code)
        except TimeoutError:
            return cniwire.error_response(
                "UNAVAILABLE", f"{method} did not finish within {self.request_timeout:g}s; "
                "etcd may be unreachable", cniwire.CNI_TRY_AGAIN)
        return cniwire.ok_response(response)
