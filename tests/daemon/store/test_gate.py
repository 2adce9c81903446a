"""The write gate: which commits it admits, and what it says when it refuses (no etcd)."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from topoipam.daemon.core.errors import EtcdWentBack, NodeFenced, NotReady
from topoipam.daemon.store import CommitFence, EtcdHistory, WriteGate, WritePause


def held_fence(on_lost: Callable[[], None] = lambda: None) -> CommitFence:
    fence = CommitFence("n1", b"/p/daemons/n1", on_lost=on_lost)
    fence.lease, fence.valid_until, fence.reason = 7, time.monotonic() + 60, ""
    return fence


def test_the_default_gate_admits_every_commit_unfenced() -> None:
    gate = WriteGate()
    assert gate.admit(reassert=False) is None
    assert not gate.paused and gate.pause_reason == ""


def test_a_fence_not_held_refuses_with_its_reason() -> None:
    gate = WriteGate(CommitFence("n1", b"/p/daemons/n1"))
    with pytest.raises(NodeFenced, match="not acquired its node identity"):
        gate.admit(reassert=True)


def test_a_lapsed_lease_refuses_even_while_held() -> None:
    fence = held_fence()
    fence.valid_until = time.monotonic() - 1
    with pytest.raises(NodeFenced, match="its etcd lease lapsed"):
        WriteGate(fence).admit(reassert=False)


@pytest.mark.parametrize("pause", [WritePause.CHECKING_RECORD, WritePause.REASSERTING])
def test_a_pause_holds_ordinary_writes_but_not_the_reassertion(pause: WritePause) -> None:
    fence = held_fence()
    gate = WriteGate(fence, pause=pause)
    assert gate.paused and gate.pause_reason  # a human reason by default
    with pytest.raises(NotReady, match=gate.pause_reason):
        gate.admit(reassert=False)
    assert gate.admit(reassert=True) is fence
    gate.resume_writes()
    assert gate.admit(reassert=False) is fence and gate.pause_reason == ""


def test_a_pause_keeps_the_reason_it_was_given() -> None:
    gate = WriteGate(held_fence())
    gate.pause_writes(WritePause.REASSERTING, "etcd went back; re-asserting 3 allocation(s)")
    with pytest.raises(NotReady, match="re-asserting 3 allocation"):
        gate.admit(reassert=False)
    with pytest.raises(ValueError):
        gate.pause_writes(WritePause.NONE)


def test_a_fence_found_on_another_lease_is_lost_and_names_the_holder() -> None:
    lost: list[bool] = []
    fence = held_fence(on_lost=lambda: lost.append(True))
    gate = WriteGate(fence)
    other = SimpleNamespace(lease=8, value=b'{"pid": 42, "host": "h2", "instance": "i2"}')
    with pytest.raises(NodeFenced, match="pid 42 on host h2"):
        gate.refused(fence, [other])
    assert lost == [True] and fence.lease == 0 and fence.lost_signal.is_set()
    gate.refused(held_fence(), [SimpleNamespace(lease=7, value=b"{}")])  # still ours


def test_the_commit_hook_sees_every_commit() -> None:
    seen: list[int] = []
    gate = WriteGate(on_committed=lambda writes, revision: seen.append(revision))
    gate.committed([], 5)
    assert seen == [5]
    WriteGate().committed([], 6)  # no hook: nothing to call


def test_history_that_goes_back_is_reported_once_and_refused() -> None:
    reasons: list[str] = []
    history = EtcdHistory(on_went_back=reasons.append)
    history.observe(0, SimpleNamespace(revision=10, cluster_id=1))
    with pytest.raises(EtcdWentBack):
        history.observe(10, SimpleNamespace(revision=4, cluster_id=1))
    assert len(reasons) == 1 and "went back to 4 from 10" in reasons[0]
    history.forget()
    history.observe(0, SimpleNamespace(revision=2, cluster_id=9))  # another datastore
    assert (history.revision, history.cluster_id) == (2, 9)
