"""The etcd client: connection (endpoints, TLS, auth), typed reads, commits, watches.

The one module that talks to etcd. It spells keys through
:class:`topoipam.daemon.keys.KeySchema` (the key schema lives there, both
directions) and commits the plain transaction values of
:mod:`topoipam.daemon.writes`: the allocator decides what must change
together, the store turns it into one etcd transaction whose compares guard
every value that was read. When a compare fails, the same round trip returns
the current values of the guarded keys, so the caller re-plans without
another read. :meth:`EtcdStore.commit_with_retry` is the one retry policy of
every other compare-and-swap site; :func:`decode_each` the one way a corrupt
value is skipped.

Keys (prefix default ``/topoipam/v1``)::

    config
    pools/<name>
    nodes/<name>
    blocks/<v4|v6>/<fixed-width hex network>-<prefixlen>
    affinities/<node>/<v4|v6>/<hex network>-<prefixlen>
    handles/<network>/<containerID>/<ifname>
    reservations/<name>
    daemons/<node>          (the node's fence, on the serving daemon's etcd lease)
    free/<v4|v6>/<hex network>-<prefixlen>   (free-block index: blocks with room)
    room/<v4|v6>/<hex network>-<prefixlen>   (room index: claim windows with room)
    identities/<id>         (sticky identities, live or parked)
    conflicts/<node>/<ip>   (an address a node's record holds that etcd gave another)
    absent/<node>           (the node was found without a live daemon; on a lease of its own)
    datastore               (the datastore's identity, written once)

A daemon's store is *fenced* (:class:`CommitFence`): every transaction it
commits also compares that ``daemons/<node>`` is still on the daemon's own
lease, so a daemon that lost its node identity (another took over, its lease
lapsed while it was frozen or cut off) cannot write for the node, whatever
it believes. It also watches etcd's history (:class:`EtcdHistory`): a
revision below one already seen, or another cluster ID, means etcd went
back (restored from a snapshot), and the daemon stops writing until it has
re-asserted what it handed out.

We speak to etcd with aetcd's generated v3 stubs on a channel we build
ourselves: aetcd's ``Client`` has no TLS and only one endpoint.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from aetcd import rpc

from . import writes as ops
from .errors import (
    AuthenticationFailed,
    Conflict,
    DatastoreUnavailable,
    EtcdOutOfSpace,
    EtcdWentBack,
    InvalidInput,
    NodeFenced,
    NotReady,
    TopoipamError,
)
from .keys import DEFAULT_PREFIX, KeySchema, prefix_range_end
from .model import (
    BLOCK_SIZE_RANGE,
    Block,
    Handle,
    Identity,
    IPAddress,
    IPAMConfig,
    IPNetwork,
    IPPool,
    IPReservation,
    Node,
    encode,
)
from .writes import CommitResult, Versioned, Write

log = logging.getLogger(__name__)

R = TypeVar("R")
# Rounds of re-read and re-validate when an operator's guarded write loses a race.
WRITE_ATTEMPTS = 5


async def backoff(attempt: int) -> None:
    """A short random pause before retry ``attempt`` (none before the first retry)."""
    if attempt >= 1:
        await asyncio.sleep(random.uniform(0, min(0.002 * attempt, 0.05)))

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
# The lease of a node's absence record: its age is the lease's (see daemon_absence).
# A month: a node gone longer is noted afresh (a later takeover, never an earlier one).
ABSENCE_LEASE_SECONDS = 30 * 24 * 3600


@dataclass(frozen=True)
class DaemonAbsence:
    """A node without a live daemon: for how long that has been known (``seconds``,
    None if nobody noted it yet) and the revision of its record (0: none)."""

    node: str
    seconds: float | None
    noted_revision: int


def decode_each(kvs: Iterable[Any], decoder: Callable[[bytes, bytes], T],
                on_corrupt: Callable[[str], None] | None = None) -> list[Versioned[T]]:
    """The values of ``kvs`` that decode, with their mod_revision: the one skip-corrupt loop.

    A corrupt value is never fatal: it is logged (or handed to ``on_corrupt``,
    which ``ipam check`` reports) and skipped, so one bad key cannot stop a
    daemon or a report.
    """
    decoded = []
    for kv in kvs:
        try:
            decoded.append(Versioned(decoder(kv.key, kv.value), kv.mod_revision))
        except (InvalidInput, ValueError) as exc:
            line = f"corrupt value at {kv.key.decode(errors='replace')}: {exc}"
            if on_corrupt is None:
                log.warning("skipping %s", line)
            else:
                on_corrupt(line)
    return decoded


def decode(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what}: value is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise InvalidInput(f"{what}: value is not a JSON object")
    return value


@dataclass(frozen=True)
class EtcdOptions:
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
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


@dataclass
class CommitFence:
    """The node identity a daemon's commits are fenced with (see the module docstring).

    ``lease`` is the etcd lease ``daemons/<node>`` must be on for a commit to
    apply; 0 while the daemon holds no fence. ``valid_until`` (monotonic
    clock) is when the lease may have expired by our own reckoning, counted
    from when the last successful keep-alive was *sent*: past it the daemon
    refuses locally too, before etcd could let another daemon take over.
    ``paused`` is set while writes wait for a re-assertion after etcd went
    back; only the re-assertion's own commits pass then.
    """

    node: str
    key: bytes
    lease: int = 0
    valid_until: float = 0.0
    #: Why we do not hold the fence, for errors and Status ("" while held).
    reason: str = "it has not acquired its node identity yet"
    paused: str = ""
    #: Called when a commit found the fence gone (the keeper re-acquires).
    on_lost: Callable[[], None] = lambda: None

    def held(self) -> bool:
        return bool(self.lease) and time.monotonic() < self.valid_until

    def check(self, reassert: bool = False) -> None:
        if not self.held():
            raise NodeFenced(self.node, self.reason or "its etcd lease lapsed")
        if self.paused and not reassert:
            raise NotReady(self.paused)

    def lost(self, reason: str) -> None:
        self.lease = 0
        self.reason = reason
        self.on_lost()


@dataclass
class EtcdHistory:
    """The newest etcd revision and the cluster ID this daemon has seen.

    etcd revisions only grow in one cluster, and a linearizable read or a
    transaction sent after we saw revision R answers with a revision >= R.
    Anything else means etcd lost history (restored from a snapshot) or is
    another cluster; ``on_went_back`` is told why, once per occurrence.
    """

    revision: int = 0
    cluster_id: int = 0
    on_went_back: Callable[[str], None] = lambda reason: None

    def observe(self, floor: int, header: Any) -> None:
        revision, cluster = int(header.revision), int(header.cluster_id)
        reason = ""
        if self.cluster_id and cluster and cluster != self.cluster_id:
            reason = (f"etcd cluster ID changed from {self.cluster_id:x} to {cluster:x} "
                      "(restored from a snapshot, or another cluster)")
        elif revision and revision < floor:
            reason = (f"etcd revision went back to {revision} from {floor} "
                      "(restored from a snapshot?)")
        if cluster:
            self.cluster_id = cluster
        if reason:
            self.revision = revision
            self.on_went_back(reason)
            raise EtcdWentBack(reason)
        if revision > self.revision:
            self.revision = revision


@dataclass(frozen=True)
class DatastoreIdentity:
    """The datastore identity as read: ``id`` ("" when there is none, or it is unreadable:
    ``problem`` says why), whether the prefix holds no object at all, etcd's cluster ID,
    and the key's mod_revision (0: absent), which guards replacing it."""

    id: str
    empty: bool
    cluster_id: int
    revision: int
    problem: str = ""


_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


class EtcdStore:
    """Connection to etcd plus typed reads and CAS writes of topoipam objects.

    All methods are coroutine-safe: several tasks may call them at once on one
    store. A failed RPC raises :class:`DatastoreUnavailable` (retriable);
    nothing is half-written because every write is a single transaction.
    """

    def __init__(self, options: EtcdOptions, prefix: str = DEFAULT_PREFIX) -> None:
        self.options = options
        self.keys = KeySchema(prefix)
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._watch: Any = None
        self._metadata: tuple[tuple[str, str], ...] | None = None
        self._connect_lock = asyncio.Lock()
        #: Called on every failed etcd call (a metrics hook).
        self.on_error: Callable[[], None] = lambda: None
        #: The daemon's node fence, compared by every commit (None: not fenced, the CLI).
        self.fence: CommitFence | None = None
        #: The daemon's watch on etcd's history (None: not watched).
        self.history: EtcdHistory | None = None
        #: Called with the writes and revision of every successful commit (the local record).
        self.on_committed: Callable[[Sequence[Write], int], None] | None = None
        #: The datastore's identity, once read or written (:meth:`datastore_identity`).
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

    async def __aenter__(self) -> EtcdStore:
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
        history = self.history if observe else None
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

    # ------------------------------------------------------------------ datastore identity
    async def read_datastore_identity(self) -> DatastoreIdentity:
        """This datastore's identity as stored (an etcd cluster and a prefix), no write.

        Read without the history watch: it is what tells a restore of this
        datastore (same identity) from another datastore.
        """
        key = self.keys.datastore()
        found = await self._call("Range", rpc.RangeRequest(key=key), observe=False)
        cluster = int(found.header.cluster_id)
        if found.kvs:
            kv = found.kvs[0]
            try:
                identity = decode(kv.value, "datastore identity").get("id")
                if isinstance(identity, str) and identity:
                    return DatastoreIdentity(identity, False, cluster, kv.mod_revision)
                problem = "no id"
            except InvalidInput as exc:
                problem = str(exc)
            return DatastoreIdentity("", False, cluster, kv.mod_revision,
                                     f"unreadable datastore identity at {key.decode()}: "
                                     f"{problem}")
        prefix = self.keys.prefix.encode() + b"/"
        objects = await self._call("Range", rpc.RangeRequest(
            key=prefix, range_end=prefix_range_end(prefix), keys_only=True, limit=1),
            observe=False)
        return DatastoreIdentity("", not objects.kvs, cluster, 0)

    async def write_datastore_identity(self, candidate: str, expect_revision: int) -> str:
        """Write ``candidate`` where the identity key is still at ``expect_revision`` (0:
        absent); the identity stored afterwards (another writer's, if it won the race)."""
        key = self.keys.datastore()
        target = (rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                              create_revision=0) if not expect_revision else
                  rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                              mod_revision=expect_revision))
        response = await self._call("Txn", rpc.TxnRequest(
            compare=[target],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=key, value=encode({"id": candidate, "created": time.time()})))]),
            observe=False)
        if response.succeeded:
            self.datastore_id = candidate
            return candidate
        stored = await self.read_datastore_identity()
        if not stored.id:
            raise DatastoreUnavailable(f"the datastore identity at {key.decode()} changed "
                                       "concurrently; will retry")
        self.datastore_id = stored.id
        return stored.id

    async def ensure_datastore_identity(self) -> None:
        """A client's first write: an empty prefix gets an identity first. A prefix with
        objects but no readable identity (written before identities, or hand-edited) is left
        for a daemon, which can tell its own datastore by its node's record."""
        found = await self.read_datastore_identity()
        if found.id:
            self.datastore_id = found.id
        elif found.empty:
            await self.write_datastore_identity(uuid.uuid4().hex, 0)
        else:
            self.datastore_id = ""

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

    # ------------------------------------------------------------------ typed reads
    def decode_pool(self, key: bytes, raw: bytes) -> IPPool:
        name = self.keys.name_of(key)
        return IPPool.from_dict(name, decode(raw, f"pool {name}"))

    def decode_node(self, key: bytes, raw: bytes) -> Node:
        name = self.keys.name_of(key)
        return Node.from_dict(name, decode(raw, f"node {name}"))

    def decode_block(self, key: bytes, raw: bytes) -> Block:
        block = Block.from_dict(decode(raw, f"block {key.decode(errors='replace')}"))
        if self.keys.block(block.cidr) != key:
            raise InvalidInput(f"block {block.cidr} stored under the wrong key {key!r}")
        return block

    def decode_handle(self, key: bytes, raw: bytes) -> Handle:
        handle_id = self.keys.name_of(key)
        return Handle.from_dict(handle_id, decode(raw, f"handle {handle_id}"))

    def decode_identity(self, key: bytes, raw: bytes) -> Identity:
        identity_id = self.keys.name_of(key)
        return Identity.from_dict(identity_id, decode(raw, f"identity {identity_id}"))

    def decode_reservation(self, key: bytes, raw: bytes) -> IPReservation:
        name = self.keys.name_of(key)
        return IPReservation.from_dict(name, decode(raw, f"ipreservation {name}"))

    def decode_config(self, raw: bytes) -> IPAMConfig:
        return IPAMConfig.from_dict(decode(raw, "ipamconfig"))

    async def _typed_prefix(self, prefix: bytes, decoder: Any) -> list[Versioned[Any]]:
        kvs, _ = await self.prefix_raw(prefix)
        return decode_each(kvs, decoder)

    def _typed_value(self, key: bytes, raw: tuple[bytes, int] | None,
                     decoder: Callable[[bytes, bytes], T]) -> Versioned[T] | None:
        return None if raw is None else Versioned(decoder(key, raw[0]), raw[1])

    async def get_config(self) -> Versioned[IPAMConfig]:
        raw = await self.get_raw(self.keys.config())
        if raw is None:
            return Versioned(IPAMConfig(), 0)
        try:
            return Versioned(self.decode_config(raw[0]), raw[1])
        except InvalidInput as exc:
            log.warning("ignoring corrupt ipamconfig, using defaults: %s", exc)
            return Versioned(IPAMConfig(), raw[1])

    async def list_pools(self) -> list[Versioned[IPPool]]:
        return (await self.pools_at_revision())[0]

    async def pools_at_revision(self) -> tuple[list[Versioned[IPPool]], int]:
        """Every pool, and the revision the read was made at (for PoolsUnchangedSince)."""
        kvs, revision = await self.prefix_raw(self.keys.pools())
        return decode_each(kvs, self.decode_pool), revision

    async def get_pool(self, name: str) -> Versioned[IPPool] | None:
        key = self.keys.pool(name)
        return self._typed_value(key, await self.get_raw(key), self.decode_pool)

    async def list_nodes(self) -> list[Versioned[Node]]:
        return await self._typed_prefix(self.keys.nodes(), self.decode_node)

    async def get_node(self, name: str) -> Versioned[Node] | None:
        key = self.keys.node(name)
        return self._typed_value(key, await self.get_raw(key), self.decode_node)

    async def list_reservations(self) -> list[Versioned[IPReservation]]:
        return await self._typed_prefix(self.keys.reservations(), self.decode_reservation)

    async def get_block(self, cidr: IPNetwork) -> Versioned[Block] | None:
        key = self.keys.block(cidr)
        return self._typed_value(key, await self.get_raw(key), self.decode_block)

    async def block_containing(self, address: IPAddress) -> Versioned[Block] | None:
        """The block that holds ``address``, whatever its size, in one round trip."""
        low, high = BLOCK_SIZE_RANGE[address.version]
        cidrs = [ipaddress.ip_network(f"{address}/{length}", strict=False)
                 for length in range(low, high + 1)]
        response = await self._call("Txn", rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=self.keys.block(c))) for c in cidrs
        ]))
        for cidr, op in zip(cidrs, response.responses, strict=True):
            kvs = op.response_range.kvs
            if kvs:
                return Versioned(self.decode_block(self.keys.block(cidr), kvs[0].value),
                                 kvs[0].mod_revision)
        return None

    async def list_blocks(self, within: IPNetwork | None = None) -> list[Versioned[Block]]:
        if within is None:
            return await self._typed_prefix(self.keys.blocks(), self.decode_block)
        start, end = self.keys.blocks_in(within)
        kvs, _ = await self.range_raw(start, end)
        return decode_each(kvs, self.decode_block)

    async def block_cidrs(self, within: IPNetwork | int) -> set[IPNetwork]:
        """CIDRs of the blocks that exist inside ``within``, or of a whole IP family
        (keys only: cheap). Malformed keys are logged and skipped."""
        if isinstance(within, int):
            kvs, _ = await self.prefix_raw(self.keys.blocks(within), keys_only=True)
        else:
            kvs, _ = await self.range_raw(*self.keys.blocks_in(within), keys_only=True)
        return {v.value for v in decode_each(kvs, lambda key, _: self.keys.block_cidr(key))}

    async def survey_blocks(self, window: IPNetwork, groups: Sequence[IPNetwork]
                            ) -> tuple[set[IPNetwork], list[int]]:
        """In one round trip: the block CIDRs inside ``window`` (keys only) and the number
        of block keys inside each of ``groups`` (counts only): what a claim needs to
        find room without reading the pool."""
        ranges = [rpc.RequestOp(request_range=rpc.RangeRequest(
            key=start, range_end=end, keys_only=True))
            for start, end in [self.keys.blocks_in(window)]]
        ranges += [rpc.RequestOp(request_range=rpc.RangeRequest(
            key=start, range_end=end, count_only=True))
            for start, end in (self.keys.blocks_in(group) for group in groups)]
        response = await self._call("Txn", rpc.TxnRequest(success=ranges))
        first, *counts = response.responses
        existing = {v.value for v in decode_each(
            first.response_range.kvs, lambda key, _: self.keys.block_cidr(key))}
        return existing, [int(c.response_range.count) for c in counts]

    async def room_windows(self, within: IPNetwork, start: IPNetwork | None = None,
                           limit: int = 0) -> list[IPNetwork]:
        """Claim windows inside ``within`` whose room index entry says they may have an
        unclaimed block: from ``start`` on, at most ``limit`` (0: all)."""
        low, end = self.keys.room_in(within)
        if start is not None:
            low = max(low, self.keys.room(start))
        kvs, _ = await self.range_raw(low, end, keys_only=True, limit=limit)
        return [v.value for v in decode_each(kvs, lambda key, _: self.keys.block_cidr(
            key, "room"))]

    async def free_marked(self, cidrs: Sequence[IPNetwork]) -> set[IPNetwork]:
        """Which of ``cidrs`` have a free-block index entry, in one round trip per 120."""
        marked: set[IPNetwork] = set()
        for start in range(0, len(cidrs), 120):
            chunk = cidrs[start:start + 120]
            response = await self._call("Txn", rpc.TxnRequest(success=[
                rpc.RequestOp(request_range=rpc.RangeRequest(
                    key=self.keys.free_block(cidr), count_only=True)) for cidr in chunk]))
            marked.update(cidr for cidr, op in zip(chunk, response.responses, strict=True)
                          if op.response_range.count)
        return marked

    async def claim_reads(self, pool_cidr: IPNetwork, own: IPNetwork, limit: int
                          ) -> tuple[list[IPNetwork], set[IPNetwork] | None]:
        """In one round trip: up to ``limit`` room index entries of the pool from window
        ``own`` on, and the block CIDRs inside ``own`` (keys only) if the index lists
        ``own`` (None if not: a full window's 16 keys would be read for nothing)."""
        low, end = self.keys.room_in(pool_cidr)
        window_low, window_end = self.keys.blocks_in(own)
        rooms_read = rpc.RequestOp(request_range=rpc.RangeRequest(
            key=max(low, self.keys.room(own)), range_end=end, keys_only=True, limit=limit))
        response = await self._call("Txn", rpc.TxnRequest(
            compare=[rpc.Compare(key=self.keys.room(own), result=rpc.Compare.GREATER,
                                 target=rpc.Compare.CREATE, create_revision=0)],
            success=[rooms_read, rpc.RequestOp(request_range=rpc.RangeRequest(
                key=window_low, range_end=window_end, keys_only=True))],
            failure=[rooms_read]))
        rooms_op = response.responses[0]
        rooms = [v.value for v in decode_each(rooms_op.response_range.kvs, lambda key, _: (
            self.keys.block_cidr(key, "room")))]
        if not response.succeeded:
            return rooms, None
        blocks = {v.value for v in decode_each(
            response.responses[1].response_range.kvs, lambda key, _: self.keys.block_cidr(key))}
        return rooms, blocks

    async def room_windows_all(self) -> set[IPNetwork]:
        """Every claim window the room index lists (for audits and repairs)."""
        kvs, _ = await self.prefix_raw(self.keys.rooms(), keys_only=True)
        return {v.value for v in decode_each(kvs, lambda key, _: self.keys.block_cidr(
            key, "room"))}

    async def free_blocks(self, within: IPNetwork, start: IPNetwork | None = None,
                          limit: int = 0) -> list[tuple[IPNetwork, str | None]]:
        """Entries of the free-block index inside ``within``: (block, its affinity).

        From ``start`` on (default: the beginning), at most ``limit`` of them
        (0: all): a borrower reads a small window, not the whole pool.
        """
        low, end = self.keys.free_blocks_in(within)
        if start is not None:
            low = max(low, self.keys.free_block(start))
        kvs, _ = await self.range_raw(low, end, limit=limit)
        return [v.value for v in decode_each(kvs, lambda key, raw: (
            self.keys.block_cidr(key, "free"), decode(raw, "free-block entry").get("node")))]

    async def list_affinities(self, node: str | None = None) -> list[tuple[str, IPNetwork]]:
        kvs, _ = await self.prefix_raw(self.keys.affinities(node), keys_only=True)
        return [v.value for v in decode_each(kvs, lambda key, _: self.keys.affinity_of(key))]

    async def get_handle(self, handle_id: str) -> Versioned[Handle] | None:
        key = self.keys.handle(handle_id)
        raw = await self.get_raw(key)
        return None if raw is None else Versioned(self.decode_handle(key, raw[0]), raw[1])

    async def list_handles(self, id_prefix: str = "") -> list[Versioned[Handle]]:
        return await self._typed_prefix(self.keys.handles() + id_prefix.encode(),
                                        self.decode_handle)

    async def get_identity(self, identity_id: str) -> Versioned[Identity] | None:
        key = self.keys.identity(identity_id)
        return self._typed_value(key, await self.get_raw(key), self.decode_identity)

    async def list_identities(self) -> list[Versioned[Identity]]:
        return await self._typed_prefix(self.keys.identities(), self.decode_identity)

    # ------------------------------------------------------------------ daemon liveness
    async def grant_lease(self, ttl: int) -> int:
        """A fresh etcd lease of ``ttl`` seconds; returns its id."""
        if self._channel is None:
            await self.connect()
        try:
            grant = await rpc.LeaseStub(self._channel).LeaseGrant(
                rpc.LeaseGrantRequest(TTL=ttl), timeout=self.options.timeout,
                metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self.on_error()
            details = exc.details() or ""
            if "space exceeded" in details:
                raise EtcdOutOfSpace(details) from exc
            raise DatastoreUnavailable(f"etcd lease grant failed: {details}") from exc
        return int(grant.ID)

    async def claim_node(self, node: str, info: dict[str, Any], lease: int
                         ) -> tuple[bool, dict[str, Any], int]:
        """Put ``daemons/<node>`` (the node's fence) on ``lease``, if nobody else holds it.

        It is ours to take when it is absent (created with create_revision 0),
        already on ``lease``, or names our own ``instance`` on our own host
        (a previous incarnation of this daemon, killed before its lease
        expired: taking it over is what lets a restart serve at once). Each
        case is one guarded transaction, so two daemons racing for a free
        node cannot both win. Returns (claimed, the holder's record, the
        lease the key was on before; 0 if it was absent).
        """
        key = self.keys.daemon(node)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=encode(info), lease=lease))
        # The node is alive again: its absence record goes with the same transaction.
        forget = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=self.keys.daemon_absence(node), prev_kv=True))
        for _ in range(WRITE_ATTEMPTS):
            response = await self._call("Txn", rpc.TxnRequest(
                compare=[rpc.Compare(key=key, result=rpc.Compare.EQUAL,
                                     target=rpc.Compare.CREATE, create_revision=0)],
                success=[put, forget],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))]))
            if response.succeeded:
                await self._revoke_absence_lease(response)
                return True, info, 0
            kvs = response.responses[0].response_range.kvs
            if not kvs:
                continue  # it expired meanwhile: try the create again
            kv = kvs[0]
            try:
                holder = decode(kv.value, f"daemon record of {node}")
            except InvalidInput:
                holder = {}
            ours = int(kv.lease) == lease or (
                holder.get("instance") == info.get("instance")
                and holder.get("host") == info.get("host"))
            if not ours:
                return False, holder, int(kv.lease)
            response = await self._call("Txn", rpc.TxnRequest(
                compare=[rpc.Compare(key=key, result=rpc.Compare.EQUAL,
                                     target=rpc.Compare.MOD, mod_revision=kv.mod_revision)],
                success=[put, forget]))
            if response.succeeded:
                await self._revoke_absence_lease(response)
                return True, holder, int(kv.lease)
        raise Conflict(f"the fence of node {node} changed concurrently; try again")

    async def keep_lease_alive(self, lease: int) -> bool:
        """Refresh ``lease`` once; False if etcd no longer knows it (expired)."""
        if self._channel is None:
            await self.connect()
        try:
            call = rpc.LeaseStub(self._channel).LeaseKeepAlive(
                timeout=self.options.timeout, metadata=self._metadata)
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
            response = await call.read()
            await call.done_writing()
            call.cancel()
        except grpc.aio.AioRpcError as exc:
            self.on_error()
            raise DatastoreUnavailable(f"etcd lease keep-alive failed: {exc.details()}") from exc
        return response is not grpc.aio.EOF and int(response.TTL) > 0

    async def revoke_lease(self, lease: int) -> None:
        if self._channel is None:
            return
        try:
            await rpc.LeaseStub(self._channel).LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease), timeout=self.options.timeout,
                metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self.on_error()
            raise DatastoreUnavailable(f"etcd lease revoke failed: {exc.details()}") from exc

    async def _revoke_absence_lease(self, response: Any) -> None:
        """Revoke the lease of the absence record a fence claim deleted (else it would
        linger, empty, for ABSENCE_LEASE_SECONDS)."""
        for kv in response.responses[1].response_delete_range.prev_kvs:
            if kv.lease:
                try:
                    await self.revoke_lease(int(kv.lease))
                except DatastoreUnavailable:
                    pass  # it expires by itself

    async def daemon_absence(self, node: str, note: bool = True) -> DaemonAbsence | None:
        """None while ``node`` has a live daemon (``daemons/<node>`` exists); else for
        how long its absence has been known.

        etcd does not keep the time the fence key vanished (its lease expired), so
        the first reader that finds it absent notes it (``note``): ``absent/<node>``
        on an etcd lease of its own, created only while the fence key is still
        absent, and deleted by :meth:`claim_node` in the transaction that brings a
        daemon back. Its age is the lease's granted TTL less what remains of it, as
        etcd counts it: no host's clock is read, so clock skew between hosts does
        not matter, and the record survives any daemon's restart. An etcd leader
        change renews leases, which only makes the record younger (a takeover
        later, never earlier). Age is in whole seconds, rounded down.
        """
        fence, record = self.keys.daemon(node), self.keys.daemon_absence(node)
        absent = rpc.Compare(key=fence, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                             create_revision=0)
        for _ in range(WRITE_ATTEMPTS):
            response = await self._call("Txn", rpc.TxnRequest(
                compare=[absent], success=[rpc.RequestOp(request_range=rpc.RangeRequest(
                    key=record))]))
            if not response.succeeded:
                return None
            kvs = response.responses[0].response_range.kvs
            if kvs:
                age = await self._lease_age(int(kvs[0].lease))
                if age is not None:
                    return DaemonAbsence(node, age, int(kvs[0].mod_revision))
                continue  # its lease ran out just now: the key goes too
            if not note:
                return DaemonAbsence(node, None, 0)
            lease = await self.grant_lease(ABSENCE_LEASE_SECONDS)
            response = await self._call("Txn", rpc.TxnRequest(
                compare=[absent, rpc.Compare(key=record, result=rpc.Compare.EQUAL,
                                             target=rpc.Compare.CREATE, create_revision=0)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(
                    key=record, value=encode({"noted": time.time()}), lease=lease))]))
            if not response.succeeded:  # noted by another meanwhile, or the daemon is back
                await self.revoke_lease(lease)
        raise Conflict(f"the absence record of node {node} kept changing; try again")

    async def _lease_age(self, lease: int) -> float | None:
        """Seconds since ``lease`` was granted (or last renewed), or None once it expired."""
        if self._channel is None:
            await self.connect()
        try:
            alive = await rpc.LeaseStub(self._channel).LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease), timeout=self.options.timeout,
                metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self.on_error()
            raise DatastoreUnavailable(f"etcd lease lookup failed: {exc.details()}") from exc
        if int(alive.TTL) < 0:
            return None
        # etcd reports the remaining TTL rounded down to a whole second: take one more
        # off, so the age is never more than it really is.
        return float(max(0, int(alive.grantedTTL) - int(alive.TTL) - 1))

    async def get_daemon(self, node: str) -> dict[str, Any] | None:
        """What the running daemon of ``node`` announced, or None if none is alive."""
        raw = await self.get_raw(self.keys.daemon(node))
        if raw is None:
            return None
        try:
            return decode(raw[0], f"daemon record of {node}")
        except InvalidInput:
            return {}

    # ------------------------------------------------------------------ writes
    def _guarded_key(self, write: Write) -> tuple[bytes, int | None] | None:
        match write:
            case ops.PutBlock(block=block, expect_revision=rev):
                return self.keys.block(block.cidr), rev
            case ops.DeleteBlock(cidr=cidr, expect_revision=rev):
                return self.keys.block(cidr), rev
            case ops.PutHandle(handle=handle, expect_revision=rev):
                return self.keys.handle(handle.id), rev
            case ops.DeleteHandle(handle_id=handle_id, expect_revision=rev):
                return self.keys.handle(handle_id), rev
            case ops.PutIdentity(identity=identity, expect_revision=rev):
                return self.keys.identity(identity.id), rev
            case ops.DeleteIdentity(identity_id=identity_id, expect_revision=rev):
                return self.keys.identity(identity_id), rev
            case ops.PutObject(obj=obj, expect_revision=rev):
                return self._object_key(obj), rev
            case ops.DeleteObject(kind=kind, name=name, expect_revision=rev):
                return self._named_key(kind, name), rev
        return None

    def _object_key(self, obj: IPPool | Node | IPAMConfig | IPReservation) -> bytes:
        if isinstance(obj, IPPool):
            return self.keys.pool(obj.name)
        if isinstance(obj, Node):
            return self.keys.node(obj.name)
        if isinstance(obj, IPReservation):
            return self.keys.reservation(obj.name)
        return self.keys.config()

    def _named_key(self, kind: str, name: str) -> bytes:
        return {"pool": self.keys.pool, "node": self.keys.node,
                "reservation": self.keys.reservation}[kind](name)

    def _request_op(self, write: Write) -> Any:
        match write:
            case ops.PutBlock(block=block):
                return rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self.keys.block(block.cidr), value=encode(block.to_dict())))
            case ops.DeleteBlock(cidr=cidr):
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self.keys.block(cidr)))
            case ops.PutAffinity(node=node, cidr=cidr):
                return rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self.keys.affinity(node, cidr), value=b"{}"))
            case ops.DeleteAffinity(node=node, cidr=cidr):
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self.keys.affinity(node, cidr)))
            case ops.PutFreeMark(cidr=cidr, node=node):
                return rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self.keys.free_block(cidr), value=encode({"node": node})))
            case ops.DeleteFreeMark(cidr=cidr):
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self.keys.free_block(cidr)))
            case ops.PutRoomMark(window=window):
                return rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self.keys.room(window), value=b"{}"))
            case ops.DeleteRoomMark(window=window):
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self.keys.room(window)))
            case ops.DeleteRoomMarksIn(cidr=cidr):
                start, end = self.keys.room_in(cidr)
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=start, range_end=end))
            case ops.PutHandle(handle=handle):
                return rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self.keys.handle(handle.id), value=handle.value))
            case ops.DeleteHandle(handle_id=handle_id):
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self.keys.handle(handle_id)))
            case ops.PutIdentity(identity=identity):
                return rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self.keys.identity(identity.id), value=encode(identity.to_dict())))
            case ops.DeleteIdentity(identity_id=identity_id):
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self.keys.identity(identity_id)))
            case ops.PutConflict(node=node, address=address, value=value):
                return rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self.keys.conflict(node, address), value=value))
            case ops.DeleteConflict(node=node, address=address):
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self.keys.conflict(node, address)))
            case ops.PutObject(obj=obj):
                return rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self._object_key(obj), value=encode(obj.to_dict())))
            case ops.DeleteObject(kind=kind, name=name):
                return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=self._named_key(kind, name)))
        raise TypeError(f"unknown write {write!r}")

    async def commit_with_retry(
        self, attempt: Callable[[], Awaitable[tuple[Sequence[Write], R]]], what: str,
        attempts: int = WRITE_ATTEMPTS,
    ) -> R:
        """Read, decide and commit until the commit's guards hold: the one retry policy.

        ``attempt`` reads what it needs, validates, and returns the guarded
        writes with the value to return once they are committed (no writes:
        nothing to do, return at once). A lost race runs it again from fresh
        reads, after a short random pause, at most ``attempts`` times; then
        :class:`Conflict` (retriable) names ``what``. Every CAS site but the
        engine's batch loop (which re-plans from the failed transaction's
        values instead of re-reading) goes through here.
        """
        for round_ in range(attempts):
            writes, value = await attempt()
            if not writes or (await self.commit(writes)).succeeded:
                return value
            await backoff(round_)
        raise Conflict(f"{what} changed concurrently {attempts} times; try again")

    async def commit(self, writes: Iterable[Write], *, reassert: bool = False,
                     fenced: bool = True) -> CommitResult:
        """Apply ``writes`` atomically if every guarded key is still at its expected revision.

        Each guarded key is compared on ``mod_revision`` (0 means "must not
        exist"). On a failed compare nothing is written and the result
        carries the current values of the guarded blocks and handles.
        Raises DatastoreUnavailable if etcd cannot be reached; in that case
        the transaction may or may not have been applied, which callers
        resolve by re-reading (an allocation is acknowledged only on success).

        A fenced store (the daemon's) refuses with :class:`NodeFenced` before
        sending when it does not hold its fence, and compares the fence key's
        lease in the same transaction: if the fence is gone, nothing is
        written and NodeFenced is raised. While writes are paused for a
        re-assertion, only commits with ``reassert`` pass. ``fenced=False``
        is for the node's registration, which any daemon may do (create-only).
        """
        writes = list(writes)
        if self.datastore_id is None:  # the first write of this client: identity first
            await self.ensure_datastore_identity()
        compares = []
        guarded: list[bytes] = []
        fence = self.fence if fenced else None
        if fence is not None:
            fence.check(reassert)
            compares.append(rpc.Compare(key=fence.key, result=rpc.Compare.EQUAL,
                                        target=rpc.Compare.LEASE, lease=fence.lease))
        for write in writes:
            if isinstance(write, ops.PoolsUnchangedSince):
                prefix = self.keys.pools()
                compares.append(rpc.Compare(
                    key=prefix, range_end=prefix_range_end(prefix), result=rpc.Compare.LESS,
                    target=rpc.Compare.MOD, mod_revision=write.revision + 1))
                continue
            if isinstance(write, ops.DaemonAbsent):
                compares.append(rpc.Compare(
                    key=self.keys.daemon(write.node), result=rpc.Compare.EQUAL,
                    target=rpc.Compare.CREATE, create_revision=0))
                if write.noted_revision:
                    compares.append(rpc.Compare(
                        key=self.keys.daemon_absence(write.node), result=rpc.Compare.EQUAL,
                        target=rpc.Compare.MOD, mod_revision=write.noted_revision))
                continue
            guard = self._guarded_key(write)
            if guard is None or guard[1] is None:
                continue
            key, revision = guard
            if key in guarded:
                continue
            guarded.append(key)
            compares.append(rpc.Compare(
                key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=revision))
        request = rpc.TxnRequest(
            compare=compares,
            success=[self._request_op(w) for w in writes
                     if not isinstance(w, ops.PoolsUnchangedSince | ops.DaemonAbsent)],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))
                     for k in (*guarded, *([fence.key] if fence is not None else []))],
        )
        response = await self._call("Txn", request)
        revision = int(response.header.revision)
        if response.succeeded:
            if self.on_committed is not None:
                self.on_committed(writes, revision)
            return CommitResult(True, revision)
        responses = list(response.responses)
        if fence is not None:
            held = responses.pop().response_range.kvs
            if not held or int(held[0].lease) != fence.lease:
                fence.lost(_holder_of(held[0].value) if held else "its node fence vanished "
                           "from etcd (lease expired or deleted)")
                raise NodeFenced(fence.node, fence.reason)
        result = CommitResult(False, revision)
        for key, op in zip(guarded, responses, strict=True):
            kvs = op.response_range.kvs
            kind, _ = self.keys.kind_of(key)
            try:
                if kind == "blocks":
                    cidr = self.keys.block_cidr(key)
                    result.blocks[cidr] = (
                        Versioned(self.decode_block(key, kvs[0].value), kvs[0].mod_revision)
                        if kvs else None
                    )
                elif kind == "handles":
                    handle_id = self.keys.name_of(key)
                    result.handles[handle_id] = (
                        Versioned(self.decode_handle(key, kvs[0].value), kvs[0].mod_revision)
                        if kvs else None
                    )
            except InvalidInput as exc:
                log.warning("corrupt value at %s: %s", key.decode(errors="replace"), exc)
        return result

    async def compact(self, revision: int) -> None:
        await self._call("Compact", rpc.CompactionRequest(revision=revision, physical=True))

    # ------------------------------------------------------------------ watches
    def open_watch(self) -> WatchStream:
        """A watch stream on which watchers can be added and cancelled while it runs."""
        return WatchStream(self)


class WatchStream:
    """One etcd watch stream carrying watchers that come and go.

    Each watcher has its own id (chosen by us) and start revision, and gets
    the events of its key range in revision order. Adding or cancelling one
    never restarts the others, so no event of a running watcher is lost or
    replayed. Iterating yields ``(watch_id, events)``; ``events`` is empty
    for the "created" confirmation. Raises :class:`WatchCompacted` when a
    start revision was compacted and DatastoreUnavailable when the stream
    breaks: the caller then relists.
    """

    def __init__(self, store: EtcdStore) -> None:
        self._store = store
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled: set[int] = set()
        self._closed = False

    def add(self, watch_id: int, start: bytes, end: bytes, start_revision: int) -> None:
        self._requests.put_nowait(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=start, range_end=end, start_revision=start_revision, watch_id=watch_id,
            progress_notify=True)))

    def cancel(self, watch_id: int) -> None:
        self._cancelled.add(watch_id)
        self._requests.put_nowait(rpc.WatchRequest(
            cancel_request=rpc.WatchCancelRequest(watch_id=watch_id)))

    async def _request_stream(self) -> AsyncIterator[Any]:
        while True:
            item = await self._requests.get()
            if item is None:
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[tuple[int, list[Any]]]:
        store = self._store
        if store._channel is None:
            await store.connect()
        call = store._watch.Watch(self._request_stream(), metadata=store._metadata)
        try:
            async for response in call:
                watch_id = int(response.watch_id)
                if response.compact_revision:
                    raise WatchCompacted(int(response.compact_revision))
                if response.canceled:
                    if watch_id in self._cancelled:
                        self._cancelled.discard(watch_id)
                        continue
                    reason = response.cancel_reason or "no reason"
                    if "permission denied" in reason or "auth" in reason:
                        # The stream carries the token it was opened with; etcd refuses
                        # new watchers once that token expired.
                        raise WatchTokenExpired(f"etcd refused a watch: {reason}")
                    raise DatastoreUnavailable(f"etcd cancelled a watch: {reason}")
                if response.created:
                    yield watch_id, []
                elif response.events:
                    yield watch_id, list(response.events)
        except grpc.aio.AioRpcError as exc:
            raise DatastoreUnavailable(f"etcd watch broke: {exc.details()}") from exc
        finally:
            self._requests.put_nowait(None)
            call.cancel()
        raise DatastoreUnavailable("etcd closed the watch stream")


class WatchTokenExpired(DatastoreUnavailable):
    """A watch stream's auth token expired: reopen it with the current token."""


class WatchCompacted(TopoipamError):
    """A watch's start revision was compacted away: the cache must relist."""

    retriable = True

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch start revision was compacted (now at {compact_revision})")
        self.compact_revision = compact_revision


def _holder_of(raw: bytes) -> str:
    """Who a fence key's value names, for the one line an operator reads."""
    try:
        info = json.loads(raw)
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    return (f"it is held by topoipamd pid {info.get('pid', '?')} on host "
            f"{info.get('host', '?')} (instance {info.get('instance', '?')})")


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc
