"""The daemon's fast CNI socket: the Ipam API as framed JSON on a unix socket.

The CNI plugin is exec'd once per pod and cannot afford grpc's import time, so
the daemon also serves its API on ``<grpc socket>.cni`` with the framing of
:mod:`topoipam.client.wire`. This module only moves frames: it parses each
request, awaits ``dispatch(method, request)`` and writes back whatever payload
dispatch built. Dispatch owns the API semantics and the error table (domain
error -> gRPC status name + CNI code), exactly as the gRPC servicer does.

Concurrency: each connection is served by its own task, one request at a time
and in order; at most ``max_concurrent_requests`` dispatches run at once
across all connections (the rest wait their turn), and connections beyond
``max_connections`` are answered UNAVAILABLE (CNI 11, the runtime retries) and
closed.

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

from topoipam.client import wire

_log = logging.getLogger(__name__)

Dispatch = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class _Connection:
    """Whether an accepted connection is in the middle of a request."""

    busy = False


class CniSocketServer:
    """Serves framed-JSON Ipam requests on a unix socket; see the module docstring."""

    def __init__(
        self,
        path: str,
        dispatch: Dispatch,
        mode: int = 0o660,
        *,
        max_concurrent_requests: int = 64,
        max_connections: int = 1024,
        drain_timeout: float = 5.0,
        idle_timeout: float = 30.0,
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
        self._requests = asyncio.Semaphore(max_concurrent_requests)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
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
            self._server = await asyncio.start_unix_server(
                self._serve_connection, sock=sock, backlog=self._max_connections)
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
        for task, connection in self._connections.items():
            if not connection.busy:
                task.cancel()

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
        tasks = set(self._connections)
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

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = _Connection()
        try:
            await self._serve(reader, writer, self._connections[task])
        except asyncio.CancelledError:
            # close() cancels idle connections. asyncio 3.11 reports a
            # client_connected_cb task that ends cancelled as an "Unhandled
            # exception", so this one ends normally instead.
            pass
        except Exception:
            _log.exception("CNI connection failed")

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        try:
            if self._closing:
                return
            if len(self._connections) > self._max_connections:
                await _send(writer, wire.encode_frame(wire.error_response(
                    "UNAVAILABLE", "topoipam daemon has too many CNI connections; retry",
                    wire.CNI_TRY_AGAIN,
                )))
                return
            while not self._closing:
                keep_open = await self._serve_one(reader, writer, connection)
                if not keep_open:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            # The peer went away or stalled; there is nobody left to answer.
            pass
        finally:
            task = asyncio.current_task()
            assert task is not None
            del self._connections[task]
            writer.close()  # no wait_closed(): the peer has its answer, nothing is left to flush

    async def _serve_one(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
    ) -> bool:
        """Read one frame and answer it; False when the connection should end."""
        # One timer per request, not per read: a plugin sends its whole frame at once.
        async with asyncio.timeout(self._idle_timeout):
            header = await _read_header(reader)
            if header is None:
                return False  # clean EOF between requests
            try:
                length = wire.frame_length(header)
            except wire.FrameError as exc:
                # The length cannot be trusted, so neither can anything after it.
                await _send(writer, _invalid_frame(str(exc)))
                return False
            payload = await reader.readexactly(length)
        connection.busy = True
        try:
            await _send(writer, await self._answer(payload))
            return True
        finally:
            connection.busy = False

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


async def _read_header(reader: asyncio.StreamReader) -> bytes | None:
    """The next 4-byte header, or None on EOF before its first byte."""
    try:
        return await reader.readexactly(wire.HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise


async def _send(writer: asyncio.StreamWriter, frame: bytes) -> None:
    writer.write(frame)
    await writer.drain()


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
