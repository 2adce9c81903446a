"""A private podman for the e2e tests: its own config, storage, image and host namespace.

Debian 12's podman 4.3 on its CNI backend, set up the way the machine it runs
on needs (measured, see issue 15): no systemd, so ``cgroup_manager =
"cgroupfs"``; ``crun`` fails on this cgroup layout, so ``runtime = "runc"``;
root lacks CAP_SYS_RESOURCE, so the ulimits are pinned. ``CONTAINERS_CONF``
and ``--root``/``--runroot`` keep its config, storage and state in a
temporary directory; the CNI network configs are read from one too
(``network_config_dir``), and the plugin path is the installed ``topoipam``
file's directory plus ``/usr/lib/cni``.

Every podman command runs in a network namespace the test creates (``nsenter
--net``), so the host side of each container's network — the bridge, the
veths, the routes, and the ``ip_forward`` that ``isGateway`` and ``ptp`` turn
on — lives there, not in the machine's own namespace.

What podman 4.3 still writes outside the temporary directory: the network
namespaces' bind mounts in ``/run/netns`` (removed with each container), runc's
state in ``/run/runc``, libcni's result cache in ``/var/lib/cni/results`` (one
file per attachment, removed on teardown) and, on ``podman import``,
containers/image's blob-info cache in ``/var/lib/containers/cache``. Those
paths are compiled in; there is no setting for them in 4.3.

The image is made offline: ``podman import`` of a tarball that holds
busybox-static as ``/bin/busybox`` and its applet links.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from tests.e2e.netns import CNI_BIN
from tests.installed_plugin import PLUGIN_DIR

IMAGE = "localhost/topoipam-e2e-busybox:1"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "ip", "cat", "ping", "true")


def require_podman() -> None:
    """Fail loudly (never skip) when the packages tests/run installs are missing."""
    missing = [tool for tool in ("podman", "runc", "nsenter") if shutil.which(tool) is None]
    if not BUSYBOX.is_file():
        missing.append(str(BUSYBOX))
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run tests/run, which installs "
                           "podman, runc and busybox-static")


def containers_conf(base: Path) -> str:
    return f"""\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "private"

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "none"
tmp_dir = "{base}/tmp"
volume_path = "{base}/volumes"
static_dir = "{base}/static"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{PLUGIN_DIR}", "{CNI_BIN}"]
network_config_dir = "{base}/net.d"
"""


class Podman:
    """podman with everything under ``base``, run in the network namespace ``host_ns``."""

    def __init__(self, base: Path, host_ns: str) -> None:
        self.base = base
        self.host_ns = host_ns
        for sub in ("tmp", "volumes", "static", "net.d", "root", "runroot"):
            (base / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.conf = base / "containers.conf"
        self.conf.write_text(containers_conf(base))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERS_")}
        self.env["CONTAINERS_CONF"] = str(self.conf)

    def command(self, *args: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.host_ns}", "podman",
                "--root", str(self.base / "root"), "--runroot", str(self.base / "runroot"),
                "--storage-driver", "vfs", *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def start(self, *args: str) -> subprocess.Popen[str]:
        """A podman command started, not waited for (to run several at once)."""
        return subprocess.Popen(self.command(*args), env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def import_busybox(self) -> None:
        tarball = self.base / "busybox.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(BUSYBOX, "bin/busybox")
            for applet in APPLETS:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
                tar.addfile(link)
        self("import", str(tarball), IMAGE)

    def add_network(self, conflist: dict[str, Any]) -> str:
        """Write a CNI conflist where podman reads networks; its ``name`` is the network."""
        name = str(conflist["name"])
        (self.base / "net.d" / f"{name}.conflist").write_text(json.dumps(conflist, indent=2))
        return name

    def ipv4(self, container: str) -> list[str]:
        return self.addresses(container, 4)

    def addresses(self, container: str, family: int) -> list[str]:
        """The container's global eth0 addresses of ``family`` (address/prefix)."""
        shown = self("exec", container, "ip", f"-{family}", "-o", "addr", "show", "dev", "eth0",
                     "scope", "global").stdout
        return [line.split()[3] for line in shown.splitlines()]

    def remove_all(self) -> None:
        self("rm", "--force", "--all", "--time", "0", check=False)
