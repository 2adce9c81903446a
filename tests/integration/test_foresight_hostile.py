"""Foresight against a hostile operator: ``explain pod`` next to real daemons (sticky pods,
attachments that exist, a claim the daemon found ahead, addresses cooling down, nodes
without a daemon), writing nothing; bad input as one line.

Each test pins a case where the prediction and the node's next real ADD could part: the
prediction is either exact there, or ``explain pod`` says why it cannot be and what
the ADD gets instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import DaemonProcess, NodeDaemons, cni
from tests.integration.test_foresight import revision, run
from topoipam.daemon.store import EtcdStore

POOL = """\
apiVersion: topoipam/v1
kind: IPPool
metadata: {{name: {name}}}
spec: {{cidr: {cidr}, blockSize: {block}}}
"""


def pool(name: str, cidr: str, block: int) -> str:
    return POOL.format(name=name, cidr=cidr, block=block)


def conf(daemon: DaemonProcess, network: str = "net", **ipam: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": network,
            "ipam": {"type": "topoipam", "socket": daemon.socket, **ipam}}


async def add(daemon: DaemonProcess, container: str, pod: str, network: str = "net",
              **ipam: Any) -> list[str]:
    code, result, err = await asyncio.to_thread(
        cni, "ADD", conf(daemon, network, **ipam), container, "eth0", "",
        f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}")
    assert code == 0 and result is not None, (result, err, daemon.log())
    return [str(ip["address"]).split("/")[0] for ip in result["ips"]]


async def delete(daemon: DaemonProcess, container: str, pod: str, network: str = "net",
                 **ipam: Any) -> None:
    code, result, err = await asyncio.to_thread(
        cni, "DEL", conf(daemon, network, **ipam), container, "eth0", "",
        f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}")
    assert code == 0, (result, err)


def predicted(out: str) -> list[list[str]]:
    """The table rows of ``explain pod`` (address first)."""
    return [line.split() for line in out.splitlines()
            if line[:1].isdigit() or line.startswith("fd")]


async def explain(ctl_env: dict[str, str], pod: str, node: str, *extra: str) -> Any:
    return await run(ctl_env, "explain", "pod", f"default/{pod}", "--node", node, *extra)


@pytest.mark.asyncio
async def test_explain_pod_writes_nothing_where_a_sticky_identity_waits_for_a_takeover(
        store: EtcdStore, ctl_env: dict[str, str], node_daemons: NodeDaemons) -> None:
    """The node holding the identity has no daemon: explain pod must not note that absence
    (a write, and the start of the takeover clock)."""
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.7.0.0/24", 28))
    daemons = await asyncio.to_thread(node_daemons.start_all, {"n1": [], "n2": []})
    await add(daemons["n2"], "c1", "web-0", "snet", sticky=True)
    await asyncio.to_thread(daemons["n2"].stop)
    before = await revision(store)
    done = await explain(ctl_env, "web-0", "n1", "--network", "snet")
    assert done.returncode == 1 and "its next ADD fails" in done.stdout, done.stdout
    assert "a new container of this pod" in done.stdout and "explain-pod" not in done.stdout
    assert await revision(store) == before, "explain pod wrote to etcd"
    identity = await run(ctl_env, "explain", "identity", "snet/default/web-0/eth0")
    assert "the takeover clock starts at this identity's next ADD" in identity.stdout


@pytest.mark.asyncio
async def test_explain_pod_without_network_names_the_pods_sticky_identity(
        store: EtcdStore, ctl_env: dict[str, str], node_daemons: NodeDaemons) -> None:
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.1.0.0/24", 28))
    daemon = await asyncio.to_thread(node_daemons.start, "n1")
    await add(daemon, "x0", "other")
    [parked] = await add(daemon, "c1", "web-0", "snet", sticky=True)
    await delete(daemon, "c1", "web-0", "snet", sticky=True)
    plain = await explain(ctl_env, "web-0", "n1")
    assert plain.returncode == 0, plain.stderr
    assert predicted(plain.stdout)[0][0] != parked
    assert ("pod default/web-0 has sticky identity snet/default/web-0/eth0 (parked until"
            in plain.stdout), plain.stdout
    assert f"{parked}): on network snet its ADD takes it back (--network snet)" in plain.stdout
    sticky = await explain(ctl_env, "web-0", "n1", "--network", "snet")
    assert [row[0] for row in predicted(sticky.stdout)] == [parked]
    assert await add(daemon, "c2", "web-0", "snet", sticky=True) == [parked]


@pytest.mark.asyncio
async def test_explain_pod_names_the_addresses_the_pod_already_holds(
        store: EtcdStore, ctl_env: dict[str, str], node_daemons: NodeDaemons) -> None:
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.1.0.0/24", 28))
    daemon = await asyncio.to_thread(node_daemons.start, "n1")
    [held] = await add(daemon, "x0", "web-1")
    done = await explain(ctl_env, "web-1", "n1")
    assert done.returncode == 0, done.stderr
    [row] = predicted(done.stdout)
    assert (f"pod default/web-1 holds {held} on node n1 (attachment net/x0/eth0): a repeated "
            "ADD of that container gets it back; this prediction is for a new container"
            in done.stdout), done.stdout
    assert await add(daemon, "x0", "web-1") == [held]
    assert await add(daemon, "x1", "web-1") == [row[0]]


@pytest.mark.asyncio
async def test_explain_pod_says_a_claim_may_land_where_the_daemon_looked_ahead(
        store: EtcdStore, ctl_env: dict[str, str], node_daemons: NodeDaemons) -> None:
    """n1's blocks run full, so its daemon finds the block of its next claim ahead (a hint,
    used for 10 s). A block freed meanwhile is where a fresh search claims; the daemon
    claims its hint: explain pod names both."""
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.5.0.0/26", 29))
    daemons = await asyncio.to_thread(node_daemons.start_all, {"n1": [], "n2": []})
    await add(daemons["n2"], "b0", "q0")  # n2 claims 10.5.0.0/29
    for i in range(8):  # n1 fills 10.5.0.8/29; its daemon finds 10.5.0.16/29 for later
        await add(daemons["n1"], f"c{i}", f"p{i}")
    await run(ctl_env, "delete", "node", "n2", "--force")  # 10.5.0.0/29 is unclaimed again
    done = await explain(ctl_env, "px", "n1")
    assert done.returncode == 0, done.stderr
    [row] = predicted(done.stdout)
    assert row[0] == "10.5.0.2" and row[4] == "claim", done.stdout
    assert ("note: node n1's daemon may have found its next claim of pool p ahead (up to "
            "10 s ago, when its blocks ran low): a block freed since then is claimed only "
            "after that one" in done.stdout), done.stdout
    assert (await add(daemons["n1"], "cx", "px"))[0] in ("10.5.0.2", "10.5.0.16")
    own = await explain(ctl_env, "py", "n1")
    assert "may have found its next claim" not in own.stdout  # not on an own-block path


@pytest.mark.asyncio
async def test_explain_pod_says_until_when_its_prediction_holds_while_an_address_cools(
        store: EtcdStore, ctl_env: dict[str, str], node_daemons: NodeDaemons) -> None:
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.8.0.0/26", 29))
    await run(ctl_env, "ipam", "configure", "--ip-cooldown-seconds", "4")
    daemon = await asyncio.to_thread(node_daemons.start, "n1")
    held = [(await add(daemon, f"c{i}", f"p{i}"))[0] for i in range(6)]  # 10.8.0.0/29 full
    await delete(daemon, "c3", "p3")  # its address cools down for 4 s
    done = await explain(ctl_env, "px", "n1")
    assert done.returncode == 0, done.stderr
    [row] = predicted(done.stdout)
    assert row[0] == "10.8.0.8" and row[4] == "claim", done.stdout
    assert f"this holds until {held[3]}'s cooldown ends at" in done.stdout, done.stdout
    assert f"; then the ADD gets {held[3]} (own block)" in done.stdout, done.stdout
    await asyncio.sleep(4.5)
    assert await add(daemon, "cx", "px") == [held[3]]


@pytest.mark.asyncio
async def test_explain_pod_refuses_bad_input_in_one_line_and_names_a_node_without_daemon(
        store: EtcdStore, ctl_env: dict[str, str]) -> None:
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.9.0.0/24", 28))
    before = await revision(store)
    for args, message in (
            (("--node", "bad/node"), "invalid node name 'bad/node'"),
            (("--node", "n1", "--network", ""), "invalid network name ''"),
            (("--node", "n1", "--ifname", "a/b"), "invalid interface name 'a/b'"),
            (("--node", "n1", "--ifname", ""), "invalid interface name ''")):
        done = await run(ctl_env, "explain", "pod", "default/web-0", *args)
        assert done.returncode == 1, done.stdout
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(f"error: {message}"), done.stderr
    both = await run(ctl_env, "explain", "pod", "default/web-0", "--node", "n1", "--ipv6",
                     "--ipv6-only")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    for flag in (("--ifname", "eth1"), ("--ipv6",)):
        other = await run(ctl_env, "explain", "node", "n1", *flag)
        assert other.returncode == 2 and "only apply to `explain pod`" in other.stderr
    ghost = await run(ctl_env, "explain", "pod", "default/web-0", "--node", "ghost")
    assert ghost.returncode == 0, ghost.stderr
    assert "warning: node ghost is not registered" in ghost.stderr
    assert "note: no topoipamd runs on node ghost: its pods get no address until one does" \
        in ghost.stdout, ghost.stdout
    assert await revision(store) == before


@pytest.mark.asyncio
async def test_every_dry_run_verb_writes_nothing(store: EtcdStore, ctl_env: dict[str, str],
                                                 tmp_path: Path) -> None:
    """apply, create, delete, patch and label with --dry-run: a multi-document manifest with
    IPAMConfig, an IPReservation, a Calico IPPool and priority/topologyKey pools; a pool's
    forced deletion. The etcd revision stays; every dry run shows its changes."""
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.20.0.0/24", 28))
    await run(ctl_env, "label", "nodes", "n1", "rack=a", "--create")
    manifest = tmp_path / "all.yaml"
    manifest.write_text("\n---\n".join((
        "apiVersion: topoipam/v1\nkind: IPAMConfig\nspec: {strictAffinity: true, "
        "warmAddresses: 4}",
        "apiVersion: topoipam/v1\nkind: IPReservation\nmetadata: {name: r}\n"
        "spec: {cidrs: [10.20.0.0/28]}",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: cal}\n"
        "spec: {cidr: 10.21.0.0/24, blockSize: 28, natOutgoing: true, nodeSelector: all()}",
        "apiVersion: topoipam/v1\nkind: IPPool\nmetadata: {name: topo}\nspec: {cidr: "
        "10.22.0.0/20, blockSize: 28, priority: 5, topologyKey: rack, topologyBlockSize: 24}",
        "apiVersion: topoipam/v1\nkind: Node\nmetadata: {name: n2, labels: {rack: b}}")))
    before = await revision(store)
    for args in (("apply", "-f", str(manifest)), ("create", "-f", str(manifest)),
                 ("create", "ippool", "q", "--cidr", "10.30.0.0/24", "--priority", "3"),
                 ("delete", "ippool", "p", "--force"), ("delete", "-f", str(manifest)),
                 ("patch", "ippool", "p", "-p", '{"spec": {"nodeSelector": "rack == \\"b\\""}}'),
                 ("label", "nodes", "n1", "rack=b", "--overwrite")):
        done = await run(ctl_env, *args, "--dry-run", "-o", "json")
        if args[:2] == ("delete", "-f"):  # IPAMConfig and Node cannot be deleted: refused
            errors = [line for line in done.stderr.splitlines() if not line.startswith("warning")]
            assert done.returncode == 1 and len(errors) == 1, done.stderr
            continue
        assert done.returncode == 0, (args, done.stderr)
        shown = json.loads(done.stdout)
        assert shown["dry_run"] is True and shown["changes"], (args, shown)
        assert await revision(store) == before, args


@pytest.mark.asyncio
async def test_report_html_writes_a_page_and_nothing_else(
        ctl_env: dict[str, str], tmp_path: Path) -> None:
    """No name, a directory: one line. A FIFO or a device (``/dev/stdout``) is written into,
    never replaced; a symbolic link's target gets the page (the link stays); a file planted
    where a fixed temporary name would be is never written through."""
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.9.0.0/24", 28))
    for target, message in (("", "--html needs a file name"),
                            (str(tmp_path), f"cannot write --html {tmp_path}: Is a directory")):
        done = await run(ctl_env, "report", "--html", target)
        assert done.returncode == 1 and done.stderr.strip() == f"error: {message}", done.stderr
    assert list(tmp_path.iterdir()) == []

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = asyncio.create_task(asyncio.to_thread(fifo.read_text))
    done = await run(ctl_env, "report", "--html", str(fifo))
    assert done.returncode == 0, done.stderr
    assert (await reader).startswith("<!DOCTYPE html>")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)

    real, link = tmp_path / "real.html", tmp_path / "link.html"
    real.write_text("old")
    link.symlink_to(real)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".real.html.tmp").symlink_to(victim)
    (tmp_path / ".link.html.tmp").symlink_to(victim)
    done = await run(ctl_env, "report", "--html", str(link))
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and real.read_text().startswith("<!DOCTYPE html>")
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".link.html.tmp", ".real.html.tmp", "fifo", "link.html", "real.html", "victim"]


@pytest.mark.asyncio
async def test_check_capacity_says_which_domain_no_pool_serves(
        ctl_env: dict[str, str]) -> None:
    """rack=0 is served by pool p; node n9 has no rack label and no pool selects it: a
    problem that names the missing pool, not "no free address"."""
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.9.0.0/24", 28).replace(
        "blockSize: 28}", "blockSize: 28, nodeSelector: rack == \"0\"}"))
    await run(ctl_env, "label", "nodes", "n0", "rack=0", "--create")
    await run(ctl_env, "label", "nodes", "n9", "zone=a", "--create")
    done = await run(ctl_env, "check", "capacity")
    assert done.returncode == 1, done.stdout
    problems = [line for line in done.stdout.splitlines() if line.startswith("no ")]
    assert problems == ["no pool: rack=- (nodes n9): no enabled Automatic pool selects its "
                        "nodes"], done.stdout


@pytest.mark.asyncio
async def test_by_is_checked_everywhere_and_only_taken_with_a_dry_run(
        ctl_env: dict[str, str]) -> None:
    done = await run(ctl_env, "create", "ippool", "q", "--cidr", "10.30.0.0/24", "--by", "zone")
    assert done.returncode == 2 and "--by only applies with --dry-run" in done.stderr
    routes = await run(ctl_env, "check", "routes", "--by", "bad key!")
    assert routes.returncode == 1 and "Traceback" not in routes.stderr
    assert routes.stderr.strip().splitlines() == [
        "error: --by: invalid label key 'bad key!': the name must be letters, digits, '-', "
        "'_' and '.', starting and ending with a letter or digit"], routes.stderr
    assert (await run(ctl_env, "get", "ippools")).stdout.splitlines()[1:] == []


@pytest.mark.asyncio
async def test_explain_pod_foresees_strict_affinity_refusing_and_then_a_borrow(
        store: EtcdStore, ctl_env: dict[str, str], node_daemons: NodeDaemons) -> None:
    """A /28 pool of two /29 blocks, one per node; n1's is full. With strictAffinity its
    next ADD fails, as explain pod says; without, explain pod names the address it borrows
    from n2's block, and the ADD gets it."""
    await run(ctl_env, "apply", "-f", "-", stdin=pool("p", "10.4.0.0/28", 29))
    await run(ctl_env, "ipam", "configure", "--strictaffinity", "true")
    daemons = await asyncio.to_thread(node_daemons.start_all, {"n1": [], "n2": []})
    await add(daemons["n2"], "b0", "q0")  # 10.4.0.0/29 (.2 to .7)
    for i in range(7):  # 10.4.0.8/29 full (.8 to .14: .15 is the pool's broadcast)
        await add(daemons["n1"], f"c{i}", f"p{i}")
    refused = await explain(ctl_env, "px", "n1")
    assert refused.returncode == 1 and "strictAffinity forbids borrowing" in refused.stdout
    code, result, _ = await asyncio.to_thread(
        cni, "ADD", conf(daemons["n1"]), "cx", "eth0", "", "K8S_POD_NAMESPACE=default;"
        "K8S_POD_NAME=px")
    assert code != 0 and "strictAffinity" in json.dumps(result), result
    await run(ctl_env, "ipam", "configure", "--strictaffinity", "false")
    await asyncio.sleep(1)  # the daemons' caches see the change
    done = await explain(ctl_env, "px", "n1")
    [row] = predicted(done.stdout)
    assert row[4] == "borrow" and row[3] == "10.4.0.0/29", done.stdout
    assert await add(daemons["n1"], "cy", "px") == [row[0]]
