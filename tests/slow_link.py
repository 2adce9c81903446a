"""A userspace stand-in for netem, for kernels built without ``sch_netem``.

A TCP proxy on loopback in front of etcd that holds every chunk it forwards
for ``delay`` seconds in each direction (order kept), and, with ``loss`` set,
holds a fraction of the chunks for an extra retransmission timeout (200 ms,
Linux's minimum RTO) — what a lost segment costs a TCP stream. It cannot drop
bytes (nothing above TCP sees losses), which is exactly what an application
on a lossy link sees.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

from topoipam.daemon.local_etcd import free_port

RTO = 0.2


class DelayProxy:
    def __init__(self, target_host: str, target_port: int, delay: float) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self.loss = 0.0
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self._ready.set()
        await self._stop.wait()
        server.close()
        # Close the sockets rather than cancel the tasks (the streams' callback
        # would report each cancellation): every pipe then reads EOF and ends.
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream_writer}
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer),
                                 self._pipe(upstream_reader, writer), return_exceptions=True)
        finally:
            upstream_writer.close()
            self._writers -= {writer, upstream_writer}

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    writer.write(chunk)
                    await writer.drain()
                except (ConnectionError, RuntimeError):
                    break
            writer.close()

        sender = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            while chunk := await _read(reader):
                due = time.monotonic() + self.delay
                if self.loss and random.random() < self.loss:
                    due += RTO
                last_due = max(last_due, due)  # a stream keeps its order
                queue.put_nowait((last_due, chunk))
        finally:
            queue.put_nowait((0.0, b""))
            await asyncio.gather(sender, return_exceptions=True)
            sender.cancel()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


async def _read(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(65536)
    except ConnectionError:
        return b""
