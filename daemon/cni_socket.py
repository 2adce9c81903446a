"""The daemon's fast CNI socket: the Ipam API as framed JSON on a unix socket.

The CNI plugin is exec'd once per pod and cannot afford grpc's import time, so
the daemon also serves its API on ``<grpc socket>.cni`` with the framing of
:mod:`topoipam.proto.cniwire`. This module only moves frames: it parses each
request, awaits ``dispatch(method, request)`` and writes back whatever payload
dispatch built. Dispatch owns the API semantics and the error table (domain
error -> gRPC status name + CNI code), exactly as the gRPC servicer does.

Concurrency: each connection is an asyncio protocol answering one request at a
time and in order (a task per request); at most ``max_concurrent_requests`` dispatches run at once
across all connections (the rest wait their turn), and connections beyond
``max_connections`` are answered UNAVAILABLE (CNI 11, the runtime retries) and
closed.

Memory: a frame's header is checked as soon as its 4 bytes are in, so a
connection buffers at most one request frame of ``max_request`` (default
``wire.MAX_FRAME``, which a GC of 20,000 attachments needs; a pod's request
is a few hundred bytes), and all connections together at most
``max_buffered`` (64 MiB): a connection whose
bytes would exceed that is answered UNAVAILABLE and closed. A connection
that sends no complete request within ``idle_timeout`` (10 s, whether it
is silent or trickles a byte a second) is closed;
while its request is being answered, it buffers at most
``_PIPELINED_BYTES`` of what the peer sends next and then stops reading until
the answer is out (the rest waits in the kernel, the peer's writes block).

Shutdown: :meth:`CniSocketServer.close` stops accepting and drops idle
connections; :meth:`CniSocketServer.wait_closed` lets requests already being
dispatched finish for up to ``drain_timeout`` seconds, then cancels them,
closes every connection and removes the socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from topoipam.proto import cniwire as wire

_log = logging.getLogger(__name__)

Dispatch = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

# What a connection buffers of the next request while it answers one; beyond
# it, reading pauses. (A plugin sends one request and waits, so it never hits this.)
_PIPELINED_BYTES = 64 * 1024


class _FrameProtocol(asyncio.Protocol):
    """One plugin connection: frames in, one request at a time, answers out.

    A protocol rather than streams: a pod start costs one short connection,
    and streams add a task, two buffers and timers per request on that path.
    """

    def __init__(self, server: CniSocketServer) -> None:
        self._server = server
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        #: The request being answered, if any (one at a time, in order).
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self._server
        server._connections.add(self)
        if server._closing:
            transport.close()
        elif len(server._connections) > server._max_connections:
            transport.write(wire.encode_frame(wire.error_response(
                "UNAVAILABLE", "topoipam daemon has too many CNI connections; retry",
                wire.CNI_TRY_AGAIN)))
            transport.close()
        else:
            self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        # A request still being answered runs to its end; its answer goes nowhere.
        self._server._connections.discard(self)
        self._server._buffered -= len(self._buffer)
        self._buffer.clear()
        self._disarm_timer()

    def _arm_timer(self) -> None:
        # A plugin sends its request right after connecting; a peer that stays
        # silent (or stalls mid-frame) only holds a connection slot, for a while.
        self._disarm_timer()
        assert self.transport is not None
        self._timer = asyncio.get_running_loop().call_later(
            self._server._idle_timeout, self.transport.close)

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        server = self._server
        if server._buffered + len(data) > server._max_buffered and self.transport is not None:
            # Many connections holding partial frames: shed this one, bounded memory.
            self.transport.write(wire.encode_frame(wire.error_response(
                "UNAVAILABLE", "topoipam daemon is buffering too much; retry",
                wire.CNI_TRY_AGAIN)))
            self.transport.close()
            return
        server._buffered += len(data)
        self._buffer += data
        if self.task is None:
            self._next_request()
        elif len(self._buffer) > _PIPELINED_BYTES and not self._reading_paused and \
                self.transport is not None:
            # Nothing checks the next header while a request runs: stop reading
            # rather than buffer whatever the peer sends meanwhile.
            self._reading_paused = True
            self.transport.pause_reading()

    def _next_request(self) -> None:
        buffer = self._buffer
        if len(buffer) < wire.HEADER_SIZE or self.transport is None:
            return
        try:
            length = wire.frame_length(bytes(buffer[:wire.HEADER_SIZE]))
            if length > self._server._max_request:
                raise wire.FrameError(f"request frame of {length} bytes exceeds the "
                                      f"{self._server._max_request}-byte limit")
        except wire.FrameError as exc:
            # The length cannot be trusted, so neither can anything after it.
            self._server._buffered -= len(buffer)
            buffer.clear()
            self.transport.write(_invalid_frame(str(exc)))
            self.transport.close()
            return
        end = wire.HEADER_SIZE + length
        if len(buffer) < end:
            return
        payload = bytes(buffer[wire.HEADER_SIZE:end])
        del buffer[:end]
        self._server._buffered -= end
        self._disarm_timer()
        self.task = asyncio.get_running_loop().create_task(self._respond(payload))

    async def _respond(self, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        try:
            frame = await self._server._answer(payload)
        except asyncio.CancelledError:  # the drain gave up on this request
            transport.close()
            return
        finally:
            self.task = None
        if transport.is_closing():
            return
        transport.write(frame)
        if self._server._closing:
            transport.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._arm_timer()
        self._next_request()


class CniSocketServer:
    """Serves framed-JSON Ipam requests on a unix socket; see the module docstring."""

    def __init__(
        self,
        path: str,
        dispatch: Dispatch,
        mode: int = 0o660,
        *,
        max_concurrent_requests: int = 64,
        max_connections: int = 4096,
        drain_timeout: float = 5.0,
        idle_timeout: float = 10.0,
        max_request: int = wire.MAX_FRAME,
        max_buffered: int = 64 << 20,
    ) -> None:
        if max_concurrent_requests < 1 or max_connections < 1:
            raise ValueError("max_concurrent_requests and max_connections must be >= 1")
        self.path = path
        self._dispatch = dispatch
        self._mode = mode
        self._max_connections = max_connections
        self._drain_timeout = drain_timeout
        # A plugin sends its request right after connecting; a peer that stays
        # silent (or stalls mid-frame) only holds a connection slot.
        self._idle_timeout = idle_timeout
        self._max_request = max_request
        self._max_buffered = max_buffered
        self._buffered = 0  # bytes held in all connections' buffers
        self._requests = asyncio.Semaphore(max_concurrent_requests)
        self._server: asyncio.Server | None = None
        self._connections: set[_FrameProtocol] = set()
        self._closing = False
        self._close_requested = asyncio.Event()
        self._drained: asyncio.Future[None] | None = None
        # (st_dev, st_ino) of the socket file we bound, so close() never
        # unlinks a socket that another process has put there since.
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Bind the socket (replacing a stale one), chmod it and start accepting.

        Raises OSError if the path is held by something that is not a socket,
        or by a socket that a live process still serves.
        """
        if self._server is not None or self._closing:
            raise RuntimeError("CniSocketServer.start() may be called only once")
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # chmod before listen(): until then nobody can connect, so there is
            # no window in which the umask's permissions apply.
            os.chmod(self.path, self._mode)
            info = os.stat(self.path)
            self._inode = (info.st_dev, info.st_ino)
            # A storm of pod starts must queue in the kernel, not bounce with EAGAIN.
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _FrameProtocol(self), sock=sock, backlog=self._max_connections)
        except BaseException:
            sock.close()
            self._unlink_own_socket()
            raise
        _log.info("serving CNI requests on %s", self.path)

    def close(self) -> None:
        """Stop accepting and drop idle connections; in-flight requests go on."""
        if self._closing:
            return
        self._closing = True
        self._close_requested.set()
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            if connection.task is None and connection.transport is not None:
                connection.transport.close()

    async def wait_closed(self) -> None:
        """Once close() is called: wait (bounded) for in-flight requests, then close
        every connection and unlink the socket. Safe to await from several tasks;
        cancelling one waiter does not cut the drain short.
        """
        await self._close_requested.wait()
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drained)

    async def _drain(self) -> None:
        tasks = {c.task for c in self._connections if c.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._drain_timeout)
            if pending:
                _log.warning(
                    "%d CNI request(s) still running after %.1fs; cancelling them",
                    len(pending), self._drain_timeout,
                )
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
        self._unlink_own_socket()

    async def __aenter__(self) -> CniSocketServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def _unlink_own_socket(self) -> None:
        if self._inode is None:
            return
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._inode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _answer(self, payload: bytes) -> bytes:
        """The encoded answer frame to one request payload."""
        try:
            message = wire.decode_payload(payload)
        except wire.FrameError as exc:
            return _invalid_frame(str(exc))
        method = message.get("method")
        if not isinstance(method, str) or not method:
            return _invalid_frame('request has no "method"')
        if method not in wire.METHODS:
            known = ", ".join(sorted(wire.METHODS))
            return _invalid_frame(f"unknown method {method!r}; known: {known}")
        request = message.get("request", {})
        if not isinstance(request, dict):
            return _invalid_frame(f'"request" of {method} must be a JSON object')
        async with self._requests:
            try:
                response = await self._dispatch(method, request)
            except Exception as exc:
                _log.exception("CNI %s request failed", method)
                return _internal_frame(f"{method} failed: {type(exc).__name__}: {exc}")
        if not isinstance(response, dict) or not isinstance(response.get("code"), str):
            _log.error("CNI dispatch of %s returned %r, not a response payload", method, response)
            return _internal_frame(f"{method} failed: the daemon built no valid response")
        try:
            return wire.encode_frame(response)
        except (wire.FrameError, TypeError, ValueError) as exc:
            _log.error("CNI response to %s cannot be sent: %s", method, exc)
            return _internal_frame(f"{method} failed: response cannot be encoded: {exc}")


def _invalid_frame(message: str) -> bytes:
    return wire.encode_frame(
        wire.error_response("INVALID_ARGUMENT", message, wire.CNI_DECODE_ERROR)
    )


def _internal_frame(message: str) -> bytes:
    return wire.encode_frame(wire.error_response("INTERNAL", message, wire.CNI_INTERNAL_ERROR))


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by a daemon that is gone; refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens (or it vanished meanwhile): stale
    else:
        raise OSError(f"another process is already serving on {path}")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
