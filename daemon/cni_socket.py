"""The daemon's fast CNI socket: the Ipam API as framed JSON on a unix socket.

The CNI plugin is exec'd once per pod and cannot afford grpc's import time, so
the daemon also serves its API on ``<grpc socket>.cni`` with the framing of
:mod:`topoipam.proto.cniwire`. This module only moves frames: it parses each
request, awaits ``dispatch(method, request)`` and writes back whatever payload
dispatch built. Dispatch owns the API semantics and the error table (domain
error -> gRPC status name + CNI code), exactly as the gRPC servicer does.

Concurrency: each connection answers one request at a time and in order (a
task per request), on the raw non-blocking socket (see :class:`_Connection`);
at most ``max_concurrent_requests`` (256) dispatches run at once across all
connections (the rest wait their turn: 256 lets a storm of pod starts reach
the engine together, which commits them in two or three transactions rather
than one per 64), and connections beyond ``max_connections`` are answered
UNAVAILABLE (CNI 11, the runtime retries) and closed.

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
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from topoipam.proto import cniwire as wire

_log = logging.getLogger(__name__)

Dispatch = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

# One read: a pod's request is a few hundred bytes, a GC of 20,000 attachments ~1.5 MB.
_READ_SIZE = 64 * 1024
# What a connection buffers of the next request while it answers one; beyond
# it, reading pauses. (A plugin sends one request and waits, so it never hits this.)
_PIPELINED_BYTES = 64 * 1024
# Connections taken from the listen queue per wake-up, before other work gets a turn.
_ACCEPTS_PER_TURN = 64


class _Connection:
    """One plugin connection: frames in, one request at a time, answers out.

    On the raw non-blocking socket with the loop's reader and writer
    callbacks, not an asyncio transport: a pod start costs one short
    connection, and a transport's set-up, its callbacks and its teardown were
    a fifth of the daemon's work per pod. The request is read at once when it
    is already there (a plugin writes right after connecting), the answer is
    sent at once (it fits the socket's buffer), and what does not fit waits
    for the writer callback. While a request runs, what the peer sends
    beyond ``_PIPELINED_BYTES`` waits in the kernel (its writes block).
    """

    __slots__ = ("_server", "_loop", "sock", "_fd", "_buffer", "task", "idle_deadline",
                 "_pending", "_reading", "_paused", "_writing", "_close_when_sent", "closed")

    def __init__(self, server: CniSocketServer, loop: asyncio.AbstractEventLoop,
                 sock: socket.socket) -> None:
        self._server = server
        self._loop = loop
        self.sock = sock
        self._fd = sock.fileno()
        self._buffer = bytearray()
        #: The request being answered, if any (one at a time, in order).
        self.task: asyncio.Task[None] | None = None
        #: When the idle timeout closes this connection (monotonic), None while a request runs.
        self.idle_deadline: float | None = None
        self._pending = b""  # answer bytes the socket did not take yet
        self._reading = False
        self._paused = False  # reading stopped until the running request is answered
        self._writing = False
        self._close_when_sent = False
        self.closed = False

    def start(self) -> None:
        server = self._server
        server._connections.add(self)
        if server._closing:
            self.close()
        elif len(server._connections) > server._max_connections:
            self.send(wire.encode_frame(wire.error_response(
                "UNAVAILABLE", "topoipam daemon has too many CNI connections; retry",
                wire.CNI_TRY_AGAIN)), then_close=True)
        else:
            self._arm_timer()
            # Registered once for the connection's life: the request, and later
            # the peer's close, come through it. First a read of what is there.
            self._start_reading()
            self._readable()

    def close(self) -> None:
        """Drop the connection now. A request still being answered runs to its end;
        its answer goes nowhere."""
        if self.closed:
            return
        self.closed = True
        self._stop_reading()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        server = self._server
        server._connections.discard(self)
        server._buffered -= len(self._buffer)
        self._buffer.clear()
        self._pending = b""
        self._disarm_timer()
        self.sock.close()

    def _arm_timer(self) -> None:
        # A plugin sends its request right after connecting; a peer that stays
        # silent (or stalls mid-frame) only holds a connection slot, for a while.
        # The server's sweep closes it: no timer per connection on the pod's path.
        self.idle_deadline = time.monotonic() + self._server._idle_timeout

    def _disarm_timer(self) -> None:
        self.idle_deadline = None

    # ------------------------------------------------------------------ reading
    def _start_reading(self) -> None:
        if not self._reading and not self.closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            self._start_reading()
            return
        except OSError:
            self.close()
            return
        if not data:  # the peer is done (a plugin closes once it has its answer)
            self.close()
            return
        self.data_received(data)

    def data_received(self, data: bytes) -> None:
        server = self._server
        if server._buffered + len(data) > server._max_buffered:
            # Many connections holding partial frames: shed this one, bounded memory.
            self.send(wire.encode_frame(wire.error_response(
                "UNAVAILABLE", "topoipam daemon is buffering too much; retry",
                wire.CNI_TRY_AGAIN)), then_close=True)
            return
        server._buffered += len(data)
        self._buffer += data
        if self.task is None:
            self._next_request()
        elif len(self._buffer) > _PIPELINED_BYTES and not self._paused:
            # Nothing checks the next header while a request runs: stop reading
            # rather than buffer whatever the peer sends meanwhile.
            self._paused = True
            self._stop_reading()

    def _next_request(self) -> None:
        buffer = self._buffer
        if len(buffer) < wire.HEADER_SIZE or self.closed or self._close_when_sent:
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
            self.send(_invalid_frame(str(exc)), then_close=True)
            return
        end = wire.HEADER_SIZE + length
        if len(buffer) < end:
            return
        payload = bytes(buffer[wire.HEADER_SIZE:end])
        del buffer[:end]
        self._server._buffered -= end
        self._disarm_timer()
        self.task = self._loop.create_task(self._respond(payload))

    async def _respond(self, payload: bytes) -> None:
        try:
            frame = await self._server._answer(payload)
        except asyncio.CancelledError:  # the drain gave up on this request
            self.close()
            return
        finally:
            self.task = None
        if self.closed:
            return
        if self._server._closing:
            self.send(frame, then_close=True)
            return
        self.send(frame)
        if self.closed:
            return
        if self._paused:
            self._paused = False
            self._start_reading()
        self._arm_timer()
        self._next_request()

    # ------------------------------------------------------------------ writing
    def send(self, frame: bytes, then_close: bool = False) -> None:
        """Send ``frame`` after whatever is still pending; with ``then_close``, close once sent."""
        if self.closed:
            return
        if then_close:
            self._close_when_sent = True
            self._stop_reading()
        if self._pending:
            self._pending += frame
        else:
            self._pending = frame
            self._writable()

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the peer is gone: so is its answer
            self.close()
            return
        self._pending = self._pending[sent:]
        if self._pending:
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self._fd, self._writable)
            return
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._close_when_sent:
            self.close()


class CniSocketServer:
    """Serves framed-JSON Ipam requests on a unix socket; see the module docstring."""

    def __init__(
        self,
        path: str,
        dispatch: Dispatch,
        mode: int = 0o660,
        *,
        max_concurrent_requests: int = 256,
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
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._connections: set[_Connection] = set()
        self._closing = False
        self._close_requested = asyncio.Event()
        self._drained: asyncio.Future[None] | None = None
        # (st_dev, st_ino) of the socket file we bound, so close() never
        # unlinks a socket that another process has put there since.
        self._inode: tuple[int, int] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind the socket (replacing a stale one), chmod it and start accepting.

        Raises OSError if the path is held by something that is not a socket,
        or by a socket that a live process still serves.
        """
        if self._listener is not None or self._closing:
            raise RuntimeError("CniSocketServer.start() may be called only once")
        loop = asyncio.get_running_loop()
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
            sock.listen(self._max_connections)
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept)
        except BaseException:
            sock.close()
            self._unlink_own_socket()
            raise
        self._listener, self._loop = sock, loop
        self._sweeper = loop.create_task(self._sweep_idle())
        _log.info("serving CNI requests on %s", self.path)

    async def _sweep_idle(self) -> None:
        """Close connections whose idle timeout is over: a check every quarter of it (<= 1 s)."""
        interval = min(1.0, self._idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for connection in list(self._connections):
                deadline = connection.idle_deadline
                if deadline is not None and deadline <= now:
                    connection.close()

    def _accept(self) -> None:
        listener, loop = self._listener, self._loop
        assert listener is not None and loop is not None
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # Out of file descriptors or memory: stop taking connections for
                # a moment (they wait in the listen queue) rather than spin.
                _log.error("cannot accept a CNI connection: %s; pausing accepts for 1 s", exc)
                loop.remove_reader(listener.fileno())
                loop.call_later(1.0, self._resume_accepting)
                return
            sock.setblocking(False)
            _Connection(self, loop, sock).start()

    def _resume_accepting(self) -> None:
        if self._listener is not None and not self._closing and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and drop idle connections; in-flight requests go on."""
        if self._closing:
            return
        self._closing = True
        self._close_requested.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
        for connection in list(self._connections):
            if connection.task is None:
                connection.close()

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
            connection.close()
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
