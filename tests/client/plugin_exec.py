"""The ``topoipam`` plugin exec'd the way runtimes exec it (:func:`run_plugin`), and the
fake daemon its tests talk to (:class:`FakeDaemon`): the real CniSocketServer with a
dispatch that records requests and answers canned responses (no etcd)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

from tests.installed_plugin import PLUGIN
from topoipam.daemon.cni_socket import CniSocketServer
from topoipam.proto import cniwire as wire

Json = dict[str, Any]

ATTACHMENT = {"network": "podnet", "container_id": "ctr1", "ifname": "eth0"}
V4 = {"ip": "192.168.0.5", "pool": "rack-0", "pool_cidr": "192.168.0.0/24",
      "block": "192.168.0.0/26", "family": 4}
V6 = {"ip": "fd00::5", "pool": "rack-0-v6", "pool_cidr": "fd00::/48",
      "block": "fd00::/122", "family": 6}


# --- running the plugin -----------------------------------------------------


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str

    @property
    def result(self) -> Json:
        parsed = json.loads(self.stdout)
        assert isinstance(parsed, dict)
        return parsed

    def error(self, code: int) -> Json:
        """The CNI error JSON, after checking it carries ``code`` and exit 1."""
        assert self.status == 1, self
        error = self.result
        assert error["code"] == code, error
        assert isinstance(error["msg"], str) and error["msg"]
        assert set(error) <= {"cniVersion", "code", "msg", "details"}
        return error


def run_plugin(
    command: str | None,
    stdin: Json | str | bytes,
    *,
    container_id: str | bytes | None = "ctr1",
    ifname: str | bytes | None = "eth0",
    cni_args: str | bytes | None = None,
    timeout: float = 20,
) -> Outcome:
    # Bytes, as the kernel hands them over: a runtime may pass any non-NUL bytes.
    env = {k: v for k, v in os.environb.items() if not k.startswith(b"CNI_")}
    for key, value in ((b"CNI_COMMAND", command), (b"CNI_CONTAINERID", container_id),
                       (b"CNI_IFNAME", ifname), (b"CNI_ARGS", cni_args)):
        if value is not None:
            env[key] = value if isinstance(value, bytes) else os.fsencode(value)
    env[b"CNI_NETNS"] = b"/var/run/netns/test"
    env[b"CNI_PATH"] = b"/opt/cni/bin"
    if isinstance(stdin, dict):
        stdin = json.dumps(stdin)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    done = subprocess.run([str(PLUGIN)], input=stdin, env=env, capture_output=True,
                          timeout=timeout, check=False)
    outcome = Outcome(done.returncode, done.stdout.decode(), done.stderr.decode())
    # Whatever happened: no traceback, and stdout is empty or one JSON object.
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome
    if outcome.stdout.strip():
        assert isinstance(json.loads(outcome.stdout), dict), outcome
    return outcome


def netconf(version: str = "1.1.0", socket_path: str = "/nonexistent/topoipamd.sock",
            **ipam: Any) -> Json:
    return {"cniVersion": version, "name": "podnet", "type": "bridge",
            "ipam": {"type": "topoipam", "socket": socket_path, **ipam}}


# --- the fake daemon --------------------------------------------------------


class FakeDaemon:
    """CniSocketServer on its own loop thread, answering canned payloads."""

    def __init__(self, grpc_socket: str) -> None:
        self.socket = grpc_socket
        self.requests: list[tuple[str, Json]] = []
        self.answers: dict[str, Json] = {
            "Allocate": wire.ok_response({"handle": "podnet/ctr1/eth0", "addresses": [V4]}),
            "Release": wire.ok_response({"released": ["192.168.0.5"]}),
            "Get": wire.ok_response({"handle": "podnet/ctr1/eth0", "addresses": [V4]}),
            "GarbageCollect": wire.ok_response({"released_handles": []}),
            "Status": wire.ok_response({"node": "node-0", "in_sync": True,
                                        "etcd_reachable": True, "ready": True}),
        }
        self.hang = threading.Event()
        self._loop = asyncio.new_event_loop()
        # asyncio only logs what reaches the loop's exception handler; collect it.
        self.loop_errors: list[dict[str, Any]] = []
        self._loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = CniSocketServer(wire.cni_socket_path(grpc_socket), self._dispatch,
                                       drain_timeout=0.5)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(10)

    def stop(self) -> None:
        self.hang.clear()
        self._loop.call_soon_threadsafe(self._server.close)
        asyncio.run_coroutine_threadsafe(self._server.wait_closed(), self._loop).result(10)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        assert self.loop_errors == []

    async def _dispatch(self, method: str, request: Json) -> Json:
        self.requests.append((method, request))
        while self.hang.is_set():
            await asyncio.sleep(0.02)
        return self.answers[method]

    def conf(self, version: str = "1.1.0", **ipam: Any) -> Json:
        return netconf(version, self.socket, **ipam)

    def only_request(self, method: str) -> Json:
        assert [m for m, _ in self.requests] == [method], self.requests
        return self.requests[0][1]
