"""The etcd connection: endpoints, TLS, auth, and the one RPC error mapping.

:class:`EtcdTransport` owns the gRPC channel to etcd and :meth:`~EtcdTransport._call`,
through which every unary KV call goes: it maps gRPC failures to
:class:`DatastoreUnavailable` (retriable) or :class:`EtcdOutOfSpace`,
re-authenticates once when the auth token expired, and hands each answer's
revision and cluster ID to the write gate's history watch
(:mod:`topoipam.daemon.store.gate`). The raw (untyped) reads live here too;
typed reads, transactions, leases and watches build on it.

We speak to etcd with aetcd's generated v3 stubs on a channel we build
ourselves: aetcd's ``Client`` has no TLS and only one endpoint.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import grpc
import grpc.aio
from aetcd import rpc

from ..core.errors import AuthenticationFailed, DatastoreUnavailable, EtcdOutOfSpace, InvalidInput
from ..core.keys import DEFAULT_PREFIX, KeySchema, prefix_range_end
from ..etcd_access import DEFAULT_ETCD_ENDPOINT
from .gate import WriteGate

DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class EtcdOptions:
    endpoints: tuple[str, ...] = (DEFAULT_ETCD_ENDPOINT,)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise InvalidInput("at least one etcd endpoint is required")
        for endpoint in self.endpoints:
            _split_endpoint(endpoint)
        if bool(self.cert_file) != bool(self.key_file):
            raise InvalidInput("etcd client certificate and key must be given together")
        if (self.user is None) != (self.password is None):
            raise InvalidInput("etcd user and password must be given together")

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.cert_file) or any(
            e.startswith("https://") for e in self.endpoints
        )

    def __repr__(self) -> str:  # never print the password
        return (
            f"EtcdOptions(endpoints={self.endpoints!r}, tls={self.tls}, "
            f"user={self.user!r}, password={'***' if self.password else None})"
        )


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    text = endpoint.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(
            f"invalid etcd endpoint {endpoint!r} (expected e.g. http://127.0.0.1:2379)"
        )
    return host.strip("[]"), int(port)


def _grpc_target(endpoints: Sequence[str]) -> tuple[str, str]:
    """A gRPC target for all endpoints, and the authority (TLS name) to use.

    IP literals become one ``ipv4:``/``ipv6:`` target, so gRPC fails over
    between cluster members; a host name can only be a target on its own.
    """
    hosts = [_split_endpoint(e) for e in endpoints]
    authority = hosts[0][0]
    addresses = []
    for host, port in hosts:
        try:
            addresses.append(ipaddress.ip_address(host))
        except ValueError:
            return f"dns:{host}:{port}", host
    if all(a.version == 4 for a in addresses):
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts), authority
    return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts), authority


_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


class EtcdTransport:
    """The channel to etcd and the error-mapped unary call every other job uses.

    Coroutine-safe: several tasks may call one transport at once. ``gate`` is
    the daemon's write gate (fence, pause, history, commit hook; an open gate
    for the CLI), ``on_error`` is called on every failed etcd call (a metrics
    hook). Both are fixed at construction.
    """

    def __init__(self, options: EtcdOptions, prefix: str = DEFAULT_PREFIX, *,
                 gate: WriteGate | None = None,
                 on_error: Callable[[], None] | None = None) -> None:
        self.options = options
        self.keys = KeySchema(prefix)
        self.gate = gate if gate is not None else WriteGate()
        self.on_error: Callable[[], None] = on_error or (lambda: None)
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._watch: Any = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._connect_lock = asyncio.Lock()
        #: The datastore's identity, once read or written (``datastore_identity``).
        self.datastore_id: str | None = None

    # ------------------------------------------------------------------ connection
    async def connect(self) -> None:
        async with self._connect_lock:
            if self._channel is not None:
                return
            target, authority = _grpc_target(self.options.endpoints)
            channel_options: list[tuple[str, Any]] = [
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1_000),
            ]
            if self.options.tls:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(self.options.ca_file),
                    private_key=_read(self.options.key_file),
                    certificate_chain=_read(self.options.cert_file),
                )
                channel_options.append(("grpc.default_authority", authority))
                channel_options.append(("grpc.ssl_target_name_override", authority))
                channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
            else:
                channel = grpc.aio.insecure_channel(target, options=channel_options)
            self._channel = channel
            self._kv = rpc.KVStub(channel)
            self._watch = rpc.WatchStub(channel)
            if self.options.user is not None:
                try:
                    await self._authenticate()
                except BaseException:
                    await self._close_channel()
                    raise

    async def _authenticate(self) -> None:
        assert self._channel is not None
        try:
            response = await rpc.AuthStub(self._channel).Authenticate(
                rpc.AuthenticateRequest(name=self.options.user, password=self.options.password),
                timeout=self.options.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNAVAILABLE_CODES:
                raise DatastoreUnavailable(f"etcd unreachable: {exc.details()}") from exc
            raise AuthenticationFailed(
                f"etcd authentication failed for user {self.options.user}: {exc.details()}"
            ) from exc
        self._metadata = (("token", response.token),)

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._kv = self._watch = None
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        async with self._connect_lock:
            await self._close_channel()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, timeout: float | None = None,
                    observe: bool = True) -> Any:
        """One unary KV call with the error mapping and one re-auth on token expiry.

        The answer's revision and cluster ID go to the history watch, unless
        ``observe`` is False (the datastore identity read, which decides
        whether that history applies at all).
        """
        if self._channel is None:
            await self.connect()
        history = self.gate.history if observe else None
        for attempt in (1, 2):
            floor = history.revision if history is not None else 0
            try:
                response = await getattr(self._kv, method)(
                    request,
                    timeout=timeout or self.options.timeout,
                    metadata=self._metadata,
                )
                if history is not None:
                    history.observe(floor, response.header)
                return response
            except grpc.aio.AioRpcError as exc:
                self.on_error()
                details = exc.details() or ""
                if (
                    attempt == 1
                    and self.options.user is not None
                    and (exc.code() == grpc.StatusCode.UNAUTHENTICATED or "auth token" in details)
                ):
                    await self._authenticate()
                    continue
                if "space exceeded" in details or "NOSPACE" in details:
                    raise EtcdOutOfSpace(details) from exc
                if exc.code() in _UNAVAILABLE_CODES:
                    raise DatastoreUnavailable(f"etcd unreachable: {details}") from exc
                if "too many operations in txn" in details:
                    raise DatastoreUnavailable(f"etcd refused the transaction: {details}") from exc
                raise DatastoreUnavailable(f"etcd error: {exc.code().name}: {details}") from exc
        raise AssertionError("unreachable")

    async def alarms(self) -> list[str]:
        """The alarms etcd has raised ("NOSPACE on member 8e9e05c52164694d"); [] if none."""
        if self._channel is None:
            await self.connect()
        try:
            response = await rpc.MaintenanceStub(self._channel).Alarm(
                rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=self.options.timeout,
                metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self.on_error()
            raise DatastoreUnavailable(f"etcd unreachable: {exc.details()}") from exc
        names = {1: "NOSPACE", 2: "CORRUPT"}
        return [f"{names.get(int(a.alarm), str(a.alarm))} on member {int(a.memberID):x}"
                for a in response.alarms if int(a.alarm)]

    async def ping(self) -> int:
        """Current etcd revision; raises DatastoreUnavailable when etcd does not answer."""
        response = await self._call(
            "Range", rpc.RangeRequest(key=self.keys.config(), count_only=True)
        )
        return int(response.header.revision)
    # ------------------------------------------------------------------ raw reads
    async def get_raw(self, key: bytes, revision: int = 0) -> tuple[bytes, int] | None:
        response = await self._call("Range", rpc.RangeRequest(key=key, revision=revision))
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return kv.value, kv.mod_revision

    async def put_raw(self, key: bytes, value: bytes) -> None:
        """An unguarded put, for reports (a conflict record), never for IPAM state."""
        await self._call("Put", rpc.PutRequest(key=key, value=value))

    async def range_raw(
        self, start: bytes, end: bytes, *, keys_only: bool = False, revision: int = 0,
        limit: int = 0,
    ) -> tuple[list[Any], int]:
        """The key-values in [start, end) (the first ``limit``; 0: all) and the revision."""
        response = await self._call(
            "Range",
            rpc.RangeRequest(key=start, range_end=end, keys_only=keys_only, revision=revision,
                             limit=limit),
            timeout=self.options.timeout,
        )
        return list(response.kvs), int(response.header.revision)

    async def prefix_raw(
        self, prefix: bytes, *, keys_only: bool = False, revision: int = 0
    ) -> tuple[list[Any], int]:
        return await self.range_raw(
            prefix, prefix_range_end(prefix), keys_only=keys_only, revision=revision
        )

    async def compact(self, revision: int) -> None:
        await self._call("Compact", rpc.CompactionRequest(revision=revision, physical=True))

def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc
