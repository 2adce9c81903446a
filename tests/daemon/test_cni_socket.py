"""The daemon's fast CNI socket, on a real unix socket with a dispatch written here."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from topoipam.daemon.cni_socket import CniSocketServer
from topoipam.proto import cniwire as wire

Json = dict[str, Any]


class Client:
    """A raw framed-JSON client, so tests can also send broken frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> Json:
        header = await asyncio.wait_for(self.reader.readexactly(4), 5)
        payload = await asyncio.wait_for(self.reader.readexactly(wire.frame_length(header)), 5)
        return wire.decode_payload(payload)

    async def call(self, method: str, request: Json | None = None) -> Json:
        await self.send_raw(wire.encode_frame({"method": method, "request": request or {}}))
        return await self.receive()

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


class Recorder:
    """A dispatch that records its calls and answers OK with the request echoed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Json]] = []

    async def __call__(self, method: str, request: Json) -> Json:
        self.calls.append((method, request))
        return wire.ok_response({"method": method, "echo": request})


class HeldBack:
    """A dispatch that answers OK once :attr:`release` is set, not before."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, method: str, request: Json) -> Json:
        await self.release.wait()
        return wire.ok_response({})


@pytest_asyncio.fixture(autouse=True)
async def no_loop_errors() -> AsyncIterator[None]:
    """Fail on anything asyncio reports through the loop's exception handler
    (e.g. "Unhandled exception in client_connected_cb"): it only logs them."""
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    yield
    await asyncio.sleep(0.01)  # let done-callbacks of finished tasks run
    loop.set_exception_handler(None)
    assert reported == []


def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "d.sock.cni")


@pytest_asyncio.fixture
async def recorder_server(tmp_path: Path) -> AsyncIterator[tuple[CniSocketServer, Recorder]]:
    recorder = Recorder()
    async with CniSocketServer(sock_path(tmp_path), recorder) as server:
        yield server, recorder


@pytest_asyncio.fixture
async def client(
    recorder_server: tuple[CniSocketServer, Recorder],
) -> AsyncIterator[Client]:
    opened = await Client.connect(recorder_server[0].path)
    yield opened
    await opened.close()


# --- requests and answers ---------------------------------------------------


@pytest.mark.asyncio
async def test_request_reaches_dispatch_and_answer_comes_back(
    recorder_server: tuple[CniSocketServer, Recorder], client: Client
) -> None:
    request = {"attachment": {"network": "n", "container_id": "c", "ifname": "eth0"},
               "assign_ipv4": True}
    answer = await client.call("Allocate", request)
    assert answer == {"code": "OK", "response": {"method": "Allocate", "echo": request}}
    assert recorder_server[1].calls == [("Allocate", request)]


@pytest.mark.asyncio
async def test_several_sequential_requests_on_one_connection(
    recorder_server: tuple[CniSocketServer, Recorder], client: Client
) -> None:
    for method in sorted(wire.METHODS):
        assert (await client.call(method))["response"]["method"] == method
    assert [m for m, _ in recorder_server[1].calls] == sorted(wire.METHODS)


@pytest.mark.asyncio
async def test_missing_request_is_an_empty_message(
    recorder_server: tuple[CniSocketServer, Recorder], client: Client
) -> None:
    await client.send_raw(wire.encode_frame({"method": "Status"}))
    assert (await client.receive())["code"] == "OK"
    assert recorder_server[1].calls == [("Status", {})]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"\xff\xfe{}", "not UTF-8 JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"request": {}}', '"method"'),
        (b'{"method": 5}', '"method"'),
        (b'{"method": "Explode"}', "unknown method"),
        (b'{"method": "Get", "request": [1]}', "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),
    ],
    ids=["not-json", "not-utf8", "not-object", "no-method", "method-not-string",
         "unknown-method", "request-not-object", "too-deep"],
)
async def test_malformed_frame_is_invalid_argument_and_connection_survives(
    recorder_server: tuple[CniSocketServer, Recorder], client: Client,
    payload: bytes, fragment: str,
) -> None:
    await client.send_raw(len(payload).to_bytes(4, "big") + payload)
    answer = await client.receive()
    assert answer["code"] == "INVALID_ARGUMENT"
    assert answer["cni_code"] == 6
    assert fragment in answer["message"]
    assert "\n" not in answer["message"]
    # The framing is intact, so the same connection keeps working.
    assert (await client.call("Status"))["code"] == "OK"
    assert recorder_server[1].calls == [("Status", {})]


@pytest.mark.asyncio
@pytest.mark.parametrize("length", [0, wire.MAX_FRAME + 1, 2**32 - 1])
async def test_bad_length_is_invalid_argument_and_closes(
    recorder_server: tuple[CniSocketServer, Recorder], client: Client, length: int
) -> None:
    await client.send_raw(length.to_bytes(4, "big"))
    answer = await client.receive()
    assert (answer["code"], answer["cni_code"]) == ("INVALID_ARGUMENT", 6)
    assert await client.at_eof()
    assert recorder_server[1].calls == []


@pytest.mark.asyncio
async def test_frame_of_exactly_max_size_is_accepted(
    recorder_server: tuple[CniSocketServer, Recorder], client: Client
) -> None:
    head = b'{"method": "Get", "request": {}, "pad": "'
    payload = head + b"x" * (wire.MAX_FRAME - len(head) - 2) + b'"}'
    assert len(payload) == wire.MAX_FRAME
    await client.send_raw(len(payload).to_bytes(4, "big") + payload)
    assert (await client.receive())["code"] == "OK"


@pytest.mark.asyncio
async def test_frame_limit_fits_a_gc_of_twenty_thousand_attachments(
    recorder_server: tuple[CniSocketServer, Recorder], client: Client
) -> None:
    keep = [{"network": "k8s-pod-network", "container_id": f"{n:064x}", "ifname": "eth0"}
            for n in range(20_000)]
    request = {"network": "k8s-pod-network", "valid_attachments": keep}
    answer = await client.call("GarbageCollect", request)
    assert answer["code"] == "OK"
    assert recorder_server[1].calls == [("GarbageCollect", request)]


@pytest.mark.asyncio
async def test_a_peer_sending_while_its_request_runs_is_held_back(tmp_path: Path) -> None:
    # With frames of up to MAX_FRAME, a peer that keeps writing while its
    # request is answered must not make the daemon buffer without bound: the
    # server stops reading (the peer's writes block) until it has answered.
    slow = HeldBack()
    async with CniSocketServer(sock_path(tmp_path), slow) as server:
        client = await Client.connect(server.path)
        try:
            await client.send_raw(wire.encode_frame({"method": "Status"}))
            await asyncio.sleep(0.05)  # the request is being answered
            pad = b'{"method": "Status", "pad": "' + b"x" * (8 << 20) + b'"}'
            flood = len(pad).to_bytes(4, "big") + pad
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.send_raw(flood), 1.0)
            protocol = next(iter(server._connections))
            assert len(protocol._buffer) <= 1 << 20, len(protocol._buffer)
            slow.release.set()
            assert (await client.receive())["code"] == "OK"
            # Reading resumes after the answer: the pipelined frame is served too.
            await asyncio.wait_for(client.writer.drain(), 10)
            assert (await client.receive())["code"] == "OK"
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_peer_vanishing_mid_frame_does_not_hurt_the_server(
    recorder_server: tuple[CniSocketServer, Recorder],
) -> None:
    broken = await Client.connect(recorder_server[0].path)
    await broken.send_raw((100).to_bytes(4, "big") + b'{"meth')
    await broken.close()
    fine = await Client.connect(recorder_server[0].path)
    assert (await fine.call("Status"))["code"] == "OK"
    await fine.close()


# --- dispatch failures ------------------------------------------------------


async def _serve_with(
    tmp_path: Path, dispatch: Callable[[str, Json], Awaitable[Json]], method: str = "Get"
) -> Json:
    async with CniSocketServer(sock_path(tmp_path), dispatch) as server:
        client = await Client.connect(server.path)
        try:
            return await client.call(method)
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_dispatch_exception_is_internal_999_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode(method: str, request: Json) -> Json:
        raise RuntimeError("boom\nsecond line")

    with caplog.at_level(logging.ERROR, logger="topoipam.daemon.cni_socket"):
        answer = await _serve_with(tmp_path, explode)
    assert answer == {"code": "INTERNAL", "cni_code": 999,
                      "message": "Get failed: RuntimeError: boom second line"}
    assert any(r.exc_info and "Get" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad", [None, [], {"response": {}}, {"code": "OK", "response": {"x": object()}}],
    ids=["none", "list", "no-code", "not-serialisable"],
)
async def test_dispatch_returning_garbage_is_internal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: object
) -> None:
    async def garbage(method: str, request: Json) -> Json:
        return bad  # type: ignore[return-value]  # the point of the test

    with caplog.at_level(logging.ERROR, logger="topoipam.daemon.cni_socket"):
        answer = await _serve_with(tmp_path, garbage)
    assert (answer["code"], answer["cni_code"]) == ("INTERNAL", 999)


@pytest.mark.asyncio
async def test_error_payload_from_dispatch_is_passed_through(tmp_path: Path) -> None:
    async def exhausted(method: str, request: Json) -> Json:
        return wire.error_response("RESOURCE_EXHAUSTED", "no free IPv4 address for node n1", 111)

    answer = await _serve_with(tmp_path, exhausted, "Allocate")
    assert answer == {"code": "RESOURCE_EXHAUSTED", "cni_code": 111,
                      "message": "no free IPv4 address for node n1"}


@pytest.mark.asyncio
async def test_concurrent_dispatches_are_bounded(tmp_path: Path) -> None:
    running = 0
    most = 0

    async def slow(method: str, request: Json) -> Json:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        return wire.ok_response({})

    async with CniSocketServer(sock_path(tmp_path), slow, max_concurrent_requests=2) as server:
        clients = [await Client.connect(server.path) for _ in range(6)]
        answers = await asyncio.gather(*(c.call("Get") for c in clients))
        for c in clients:
            await c.close()
    assert all(a["code"] == "OK" for a in answers)
    assert most == 2


@pytest.mark.asyncio
async def test_connections_beyond_the_limit_get_unavailable(tmp_path: Path) -> None:
    async with CniSocketServer(sock_path(tmp_path), Recorder(), max_connections=1) as server:
        first = await Client.connect(server.path)
        assert (await first.call("Status"))["code"] == "OK"  # holds the only slot
        second = await Client.connect(server.path)
        answer = await second.receive()
        assert (answer["code"], answer["cni_code"]) == ("UNAVAILABLE", 11)
        assert await second.at_eof()
        await second.close()
        assert (await first.call("Status"))["code"] == "OK"
        await first.close()


# --- the socket file --------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [0o660, 0o600])
async def test_socket_gets_the_mode(tmp_path: Path, mode: int) -> None:
    async with CniSocketServer(sock_path(tmp_path), Recorder(), mode=mode) as server:
        info = os.stat(server.path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == mode


@pytest.mark.asyncio
async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: what a crashed daemon leaves
    stale.close()
    async with CniSocketServer(path, Recorder()) as server:
        client = await Client.connect(server.path)
        assert (await client.call("Status"))["code"] == "OK"
        await client.close()


@pytest.mark.asyncio
async def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    Path(path).write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        await CniSocketServer(path, Recorder()).start()
    assert Path(path).read_text() == "not a socket"


@pytest.mark.asyncio
async def test_refuses_to_steal_a_live_socket(
    recorder_server: tuple[CniSocketServer, Recorder],
) -> None:
    with pytest.raises(OSError, match="already serving"):
        await CniSocketServer(recorder_server[0].path, Recorder()).start()
    client = await Client.connect(recorder_server[0].path)
    assert (await client.call("Status"))["code"] == "OK"
    await client.close()


# --- shutdown ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_close_lets_in_flight_request_finish_then_unlinks(tmp_path: Path) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(method: str, request: Json) -> Json:
        started.set()
        await release.wait()
        return wire.ok_response({"done": True})

    server = CniSocketServer(sock_path(tmp_path), slow)
    await server.start()
    busy = await Client.connect(server.path)
    idle = await Client.connect(server.path)
    await busy.send_raw(wire.encode_frame({"method": "Get"}))
    await started.wait()

    server.close()
    # No new connections once closed; the idle one is dropped at once.
    with pytest.raises(OSError):
        await Client.connect(server.path)
    assert await idle.at_eof()

    waiting = asyncio.create_task(server.wait_closed())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # still draining the in-flight request
    release.set()
    assert await busy.receive() == {"code": "OK", "response": {"done": True}}
    await asyncio.wait_for(waiting, 5)
    assert await busy.at_eof()
    assert not os.path.exists(server.path)
    await busy.close()
    await idle.close()


@pytest.mark.asyncio
async def test_drain_is_bounded(tmp_path: Path) -> None:
    cancelled = asyncio.Event()

    async def hang(method: str, request: Json) -> Json:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    server = CniSocketServer(sock_path(tmp_path), hang, drain_timeout=0.2)
    await server.start()
    client = await Client.connect(server.path)
    await client.send_raw(wire.encode_frame({"method": "Allocate"}))
    await asyncio.sleep(0.05)
    server.close()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(server.wait_closed(), 5)
    assert loop.time() - began < 2
    assert cancelled.is_set()
    assert await client.at_eof()
    assert not os.path.exists(server.path)
    await client.close()


@pytest.mark.asyncio
async def test_close_does_not_unlink_a_socket_that_replaced_ours(tmp_path: Path) -> None:
    path = sock_path(tmp_path)
    server = CniSocketServer(path, Recorder())
    await server.start()
    os.unlink(path)
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    successor.bind(path)
    try:
        server.close()
        await server.wait_closed()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        successor.close()


@pytest.mark.asyncio
async def test_lifecycle(tmp_path: Path) -> None:
    server = CniSocketServer(sock_path(tmp_path), Recorder())
    await server.start()
    with pytest.raises(RuntimeError):
        await server.start()
    waiters = [asyncio.create_task(server.wait_closed()) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)  # wait_closed waits for close()
    server.close()
    server.close()  # idempotent
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    await server.wait_closed()
    assert not os.path.exists(server.path)


@pytest.mark.asyncio
async def test_silent_and_stalled_connections_are_closed_by_the_idle_timeout(
        tmp_path: Path) -> None:
    recorder = Recorder()
    async with CniSocketServer(sock_path(tmp_path), recorder, idle_timeout=0.3) as server:
        silent = await Client.connect(server.path)
        stalled = await Client.connect(server.path)
        await stalled.send_raw(wire.encode_frame({"method": "Status"})[:6])  # half a frame
        answered = await Client.connect(server.path)
        assert (await answered.call("Status"))["code"] == "OK"
        started = asyncio.get_running_loop().time()
        for connection in (silent, stalled, answered):
            assert await connection.at_eof()  # at_eof waits up to 5 s
        # The sweep runs every quarter of the timeout: closed soon after it.
        assert asyncio.get_running_loop().time() - started < 1.5
        assert server._connections == set()
        assert recorder.calls == [("Status", {})]
        # A connection that keeps sending requests is not idle.
        busy = await Client.connect(server.path)
        for _ in range(6):
            await asyncio.sleep(0.1)
            assert (await busy.call("Status"))["code"] == "OK"
        await busy.close()
        for connection in (silent, stalled, answered):
            await connection.close()


@pytest.mark.asyncio
async def test_an_answer_bigger_than_the_socket_buffer_arrives_whole(tmp_path: Path) -> None:
    # Sent as far as the kernel takes it, the rest when the socket is writable
    # again, in order before the next answer.
    big = "x" * (6 << 20)

    async def dispatch(method: str, request: Json) -> Json:
        return wire.ok_response({"pad": big if request.get("big") else ""})

    async with CniSocketServer(sock_path(tmp_path), dispatch) as server:
        client = await Client.connect(server.path)
        try:
            await client.send_raw(wire.encode_frame({"method": "Status", "request": {"big": 1}})
                                  + wire.encode_frame({"method": "Status"}))
            await asyncio.sleep(0.2)  # the server is blocked on a full socket meanwhile
            header = await asyncio.wait_for(client.reader.readexactly(4), 5)
            payload = await asyncio.wait_for(
                client.reader.readexactly(wire.frame_length(header)), 10)
            assert wire.decode_payload(payload)["response"]["pad"] == big
            assert (await client.receive())["response"]["pad"] == ""
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_a_peer_closing_before_its_answer_costs_nothing(tmp_path: Path) -> None:
    slow = HeldBack()
    async with CniSocketServer(sock_path(tmp_path), slow) as server:
        for _ in range(20):
            gone = await Client.connect(server.path)
            await gone.send_raw(wire.encode_frame({"method": "Status"}))
            await gone.close()
        await asyncio.sleep(0.1)
        slow.release.set()
        await asyncio.sleep(0.1)
        assert server._connections == set()
        assert server._buffered == 0
        client = await Client.connect(server.path)
        assert (await client.call("Status"))["code"] == "OK"
        await client.close()
