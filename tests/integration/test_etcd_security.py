"""topoipamd and topoipamctl against a secured etcd, and the daemon's own listeners.

* etcd with mutual TLS (a CA, a server certificate for 127.0.0.1/localhost and a
  client certificate generated here): the daemon and the CLI work with the
  certificates; without the client certificate, or trusting another CA, they
  fail with one clear line.
* etcd with authentication (root + a ``topoipam`` user whose role may read and
  write only the test's prefix): the daemon works with ``--etcd-user`` and
  ``--etcd-password-file``, also after its auth token expired; a wrong password
  is a clear error; the password is never logged nor returned by Status.
* The gRPC API listens on TCP only when asked, on loopback unless
  ``--allow-remote-tcp``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import EtcdServer, start_etcd
from tests.daemons import TOPOIPAMD, DaemonProcess, cni, ctl
from tests.etcd_cluster import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    Pki,
    etcdctl,
    process_tcp_sockets,
    write_pki,
)
from topoipam.daemon.local_etcd import free_port
from topoipam.proto import ipam_pb2, ipam_pb2_grpc

pytestmark = pytest.mark.timeout(180)

POOL = "10.60.0.0/24"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.stop()


def new_daemon(started: list[DaemonProcess], tmp_path: Path, node: str, endpoint: str,
               prefix: str, extra: list[str]) -> DaemonProcess:
    run_dir = tmp_path / f"run-{node}"
    run_dir.mkdir(mode=0o750)
    daemon = DaemonProcess(node, str(run_dir / "topoipamd.sock"), endpoint, prefix,
                           str(tmp_path / f"{node}.log"), extra)
    started.append(daemon)
    return daemon


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOPOIPAM_")}


def net_config(daemon: DaemonProcess) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "sec-net",
            "ipam": {"type": "topoipam", "socket": daemon.socket, "timeout": 10}}


def allocate(daemon: DaemonProcess, container: str) -> str:
    code, result, err = cni("ADD", net_config(daemon), container=container)
    assert code == 0 and result is not None, f"{result} {err}"
    address = str(result["ips"][0]["address"]).split("/")[0]
    assert address.startswith("10.60.0."), address
    return address


def status(daemon: DaemonProcess) -> Any:
    with daemon.stub() as stub:
        return stub.Status(ipam_pb2.StatusRequest(), timeout=10)


def one_error_line(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with exit 1 and exactly one `error: ...` line naming ``fragments``."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def stays_unready(daemon: DaemonProcess, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
        assert daemon.health() != "SERVING", daemon.log()
        time.sleep(0.2)


# ---------------------------------------------------------------------------- mutual TLS


@pytest.fixture
def tls_etcd(pki: Pki, tmp_path: Path) -> Iterator[EtcdServer]:
    data_dir = tmp_path / "etcd-tls"
    data_dir.mkdir()
    server = start_etcd(str(data_dir), scheme="https", extra=[
        "--cert-file", pki.server_cert, "--key-file", pki.server_key,
        "--trusted-ca-file", pki.ca, "--client-cert-auth"])
    yield server
    server.stop()


def tls_env(etcd: EtcdServer, prefix: str) -> dict[str, str]:
    return {**clean_env(), "TOPOIPAM_ETCD_ENDPOINTS": etcd.endpoint, "TOPOIPAM_PREFIX": prefix}


def tls_flags(pki: Pki) -> list[str]:
    return ["--etcd-ca", pki.ca, "--etcd-cert", pki.client_cert, "--etcd-key", pki.client_key]


def test_daemon_and_ctl_over_mutual_tls(tls_etcd: EtcdServer, pki: Pki, prefix: str,
                                        tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    assert tls_etcd.endpoint.startswith("https://127.0.0.1:")
    env = tls_env(tls_etcd, prefix)
    created = ctl(env, *tls_flags(pki), "create", "ippool", "sec", "--cidr", POOL)
    assert created.returncode == 0, created.stderr

    daemon = new_daemon(daemons, tmp_path, "tls-node", tls_etcd.endpoint, prefix,
                        tls_flags(pki))
    daemon.start(timeout=30)
    allocate(daemon, "tls-c1")
    reply = status(daemon)
    assert reply.in_sync and reply.etcd_reachable, reply

    listed = ctl(env, *tls_flags(pki), "get", "ippool", "-o", "wide")
    assert listed.returncode == 0, listed.stderr
    assert "sec" in listed.stdout and POOL in listed.stdout
    # The same flags after the verb, and as environment variables.
    assert ctl(env, "get", "ippool", *tls_flags(pki)).returncode == 0
    env_tls = {**env, "TOPOIPAM_ETCD_CA": pki.ca, "TOPOIPAM_ETCD_CERT": pki.client_cert,
               "TOPOIPAM_ETCD_KEY": pki.client_key}
    assert POOL in ctl(env_tls, "get", "ippool", "-o", "wide").stdout


def test_ctl_refused_by_tls_etcd_says_so_in_one_line(tls_etcd: EtcdServer, pki: Pki,
                                                     prefix: str) -> None:
    env = tls_env(tls_etcd, prefix)
    # Without the client certificate etcd refuses the handshake: one line, no traceback.
    one_error_line(ctl(env, "--etcd-ca", pki.ca, "get", "ippool"), "error:", "etcd",
                   tls_etcd.endpoint)
    # Trusting another CA, the CLI refuses etcd's certificate.
    one_error_line(ctl(env, "--etcd-ca", pki.other_ca, "--etcd-cert", pki.client_cert,
                       "--etcd-key", pki.client_key, "get", "ippool"), "error:", "etcd")
    # A certificate without its key is a usage error found before connecting.
    one_error_line(ctl(env, "--etcd-ca", pki.ca, "--etcd-cert", pki.client_cert,
                       "get", "ippool"), "certificate and key")


def test_daemon_without_client_certificate_is_never_ready(
    tls_etcd: EtcdServer, pki: Pki, prefix: str, tmp_path: Path, daemons: list[DaemonProcess],
) -> None:
    """It keeps trying, says why in Status and in its log, and its log stays JSON lines."""
    bare = new_daemon(daemons, tmp_path, "no-cert-node", tls_etcd.endpoint, prefix,
                      ["--etcd-ca", pki.ca, "--log-format", "json"])
    bare.start(wait=False)
    stays_unready(bare, 3)
    reply = status(bare)
    assert not reply.in_sync and not reply.etcd_reachable, reply
    assert "handshake" in reply.etcd_error.lower(), reply.etcd_error
    bare.stop()
    lines = Path(bare.log_path).read_text().splitlines()
    assert any("cannot register node no-cert-node" in line for line in lines), lines[:5]
    not_json = [line for line in lines if not is_json(line)]
    assert not not_json, f"--log-format json, but these log lines are not JSON: {not_json[:3]}"


def is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- auth


@pytest.fixture
def auth_etcd(prefix: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """etcd with auth on: root, and user ``topoipam`` with readwrite on ``<prefix>/``.

    Tokens live two seconds, so the daemon must re-authenticate after a pause.
    """
    data_dir = tmp_path / "etcd-auth"
    data_dir.mkdir()
    server = start_etcd(str(data_dir), extra=["--auth-token", "simple",
                                              "--auth-token-ttl", "2"])
    root_password = f"root-{uuid.uuid4().hex}"
    password = f"topoipam-secret-{uuid.uuid4().hex}"
    endpoint = server.endpoint
    etcdctl(endpoint, "user", "add", "root", f"--new-user-password={root_password}")
    etcdctl(endpoint, "role", "add", "root")
    etcdctl(endpoint, "user", "grant-role", "root", "root")
    etcdctl(endpoint, "role", "add", "topoipam")
    etcdctl(endpoint, "role", "grant-permission", "topoipam", "--prefix=true", "readwrite",
            f"{prefix}/")
    etcdctl(endpoint, "user", "add", "topoipam", f"--new-user-password={password}")
    etcdctl(endpoint, "user", "grant-role", "topoipam", "topoipam")
    etcdctl(endpoint, "auth", "enable")
    password_file = tmp_path / "etcd-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    wrong_file = tmp_path / "wrong-password"
    wrong_file.write_text("not-the-password\n")
    wrong_file.chmod(0o600)
    yield {"endpoint": endpoint, "password": password, "password_file": str(password_file),
           "wrong_file": str(wrong_file), "root_password": root_password}
    server.stop()


def test_daemon_and_ctl_with_etcd_auth(auth_etcd: dict[str, str], prefix: str, tmp_path: Path,
                                       daemons: list[DaemonProcess]) -> None:
    endpoint, password = auth_etcd["endpoint"], auth_etcd["password"]
    env = {**clean_env(), "TOPOIPAM_ETCD_ENDPOINTS": endpoint, "TOPOIPAM_PREFIX": prefix}
    auth_flags = ["--etcd-user", "topoipam", "--etcd-password-file", auth_etcd["password_file"]]

    # Auth really is on: anonymous access is refused.
    anonymous = ctl(env, "get", "ippool")
    one_error_line(anonymous, "error:")
    created = ctl(env, *auth_flags, "create", "ippool", "sec", "--cidr", POOL)
    assert created.returncode == 0, created.stderr

    daemon = new_daemon(daemons, tmp_path, "auth-node", endpoint, prefix,
                        [*auth_flags, "--log-level", "debug"])
    daemon.start(timeout=30)
    first = allocate(daemon, "auth-c1")
    # Let the auth token expire (TTL 2 s): the daemon must log in again by itself.
    time.sleep(3.5)
    second = allocate(daemon, "auth-c2")
    assert second != first
    # Claiming a new block changes what the cache watches: a new watch, with a fresh token.
    for i in range(3, 70):
        allocate(daemon, f"auth-c{i}")
    reply = status(daemon)
    assert reply.in_sync and reply.etcd_reachable, reply
    assert password not in str(reply)
    assert password.encode() not in reply.SerializeToString()

    # A wrong password: the CLI says so in one line ...
    wrong_flags = ["--etcd-user", "topoipam", "--etcd-password-file", auth_etcd["wrong_file"]]
    line = one_error_line(ctl(env, *wrong_flags, "get", "ippool"), "authentication failed")
    assert "not-the-password" not in line and password not in line
    # ... the daemon never claims to be ready, logs why and reports it in Status.
    bad = new_daemon(daemons, tmp_path, "bad-auth-node", endpoint, prefix,
                     [*wrong_flags, "--log-level", "debug"])
    bad.start(wait=False)
    stays_unready(bad, 3)
    reply = status(bad)
    assert not reply.etcd_reachable and "authentication failed" in reply.etcd_error, reply
    assert "not-the-password" not in str(reply) and password not in str(reply)
    bad_log = Path(bad.log_path).read_text()
    assert "authentication failed" in bad_log and "topoipam" in bad_log, bad_log[-2000:]
    assert "Traceback" not in bad_log
    assert "not-the-password" not in bad_log

    daemon.stop()
    bad.stop()
    for log_path in (daemon.log_path, bad.log_path):
        text = Path(log_path).read_text()
        assert password not in text and auth_etcd["root_password"] not in text
    assert "registered node auth-node" in Path(daemon.log_path).read_text()


# ---------------------------------------------------------------------------- TCP listener


def listening_ports(daemon: DaemonProcess) -> set[int]:
    assert daemon.process is not None
    return {s.local_port for s in process_tcp_sockets(daemon.process.pid)
            if s.state == TCP_LISTEN}


def test_tcp_listener_is_loopback_and_opt_in(etcd: EtcdServer, prefix: str, tmp_path: Path,
                                             daemons: list[DaemonProcess]) -> None:
    env = {**clean_env(), "TOPOIPAM_ETCD_ENDPOINTS": etcd.endpoint, "TOPOIPAM_PREFIX": prefix}
    assert ctl(env, "create", "ippool", "sec", "--cidr", POOL).returncode == 0
    port = free_port()

    # Beyond loopback only with --allow-remote-tcp: one line, exit 1, nothing served.
    run_dir = tmp_path / "run-refused"
    run_dir.mkdir(mode=0o750)
    refused = subprocess.run(
        [TOPOIPAMD, "--etcd-endpoints", etcd.endpoint, "--node", "refused", "--prefix", prefix,
         "--socket", str(run_dir / "s.sock"), "--metrics-address", "off",
         "--tcp-address", f"0.0.0.0:{port}"],
        capture_output=True, text=True, timeout=30, env=clean_env())
    line = one_error_line(refused, "0.0.0.0", "allow-remote-tcp")
    assert line.startswith("topoipamd: error:"), line
    assert not (run_dir / "s.sock").exists()

    # On loopback: gRPC health and Status over TCP, and that is its only listener.
    tcp = new_daemon(daemons, tmp_path, "tcp-node", etcd.endpoint, prefix,
                     ["--tcp-address", f"127.0.0.1:{port}"])
    tcp.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = ipam_pb2_grpc.IpamStub(channel).Status(ipam_pb2.StatusRequest(), timeout=10)
        assert reply.node == "tcp-node" and reply.in_sync
    assert listening_ports(tcp) == {port}

    # By default (and with metrics off): no TCP listener at all, only the unix sockets.
    default = new_daemon(daemons, tmp_path, "default-node", etcd.endpoint, prefix, [])
    default.start()
    allocate(default, "default-c1")
    assert default.process is not None
    etcd_port = int(etcd.endpoint.rsplit(":", 1)[1])
    sockets = process_tcp_sockets(default.process.pid)
    # The /proc reading does see this process's sockets (its connection to etcd) ...
    assert any(s.remote_port == etcd_port and s.state == TCP_ESTABLISHED for s in sockets)
    # ... and none of them listens.
    assert listening_ports(default) == set(), sockets
