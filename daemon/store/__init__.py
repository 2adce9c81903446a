"""The etcd adapter: the one package that talks to etcd, split by job.

It spells keys through :class:`topoipam.daemon.core.keys.KeySchema` (the key
schema lives there, both directions) and commits the plain transaction
values of :mod:`topoipam.daemon.core.writes`. :class:`EtcdStore` is the one class
callers use; each job is a module of its own:

* :mod:`.transport` -- endpoints, TLS, auth, the channel, and the one RPC
  error mapping every call goes through; raw reads.
* :mod:`.reads` -- typed reads and the allocator's index queries;
  :func:`decode_each`, the one way a corrupt value is skipped.
* :mod:`.commits` -- write values turned into one guarded transaction; the
  datastore identity written before a client's first commit.
* :mod:`.retry` -- the one retry policy of every compare-and-swap loop
  (:func:`retry_cas`, :data:`CAS_ATTEMPTS`).
* :mod:`.gate` -- the write gate a daemon passes at construction: its node
  fence, the pause state, the watch on etcd's history, the commit hook.
* :mod:`.leases` -- the node's fence key, keep-alives, a node's absence.
* :mod:`.watch` -- one watch stream carrying watchers that come and go.

The keys are spelled in one place, :class:`topoipam.daemon.core.keys.KeySchema`
(prefix default ``/topoipam/v1``); docs/design.md#the-etcd-keys lists every
kind with its value and what writes it.
"""

from __future__ import annotations

from ..core.view import DaemonAbsence
from .commits import DatastoreIdentity, EtcdCommits
from .gate import CommitFence, EtcdHistory, WriteGate, WritePause
from .leases import ABSENCE_LEASE_SECONDS, EtcdLeases
from .reads import decode, decode_each
from .retry import CAS_ATTEMPTS, LOST_RACE, LostRace, backoff, retry_cas
from .transport import DEFAULT_TIMEOUT, EtcdOptions
from .watch import WatchCompacted, WatchStream, WatchTokenExpired

__all__ = [
    "ABSENCE_LEASE_SECONDS", "CAS_ATTEMPTS", "DEFAULT_TIMEOUT", "LOST_RACE", "CommitFence",
    "DaemonAbsence", "DatastoreIdentity", "EtcdHistory", "EtcdOptions", "EtcdStore", "LostRace",
    "WatchCompacted", "WatchStream", "WatchTokenExpired", "WriteGate", "WritePause", "backoff",
    "decode", "decode_each", "retry_cas",
]


class EtcdStore(EtcdCommits, EtcdLeases):
    """Connection to etcd plus typed reads, guarded writes, leases and watches.

    One object per client, made of the jobs' classes (they share the
    transport's channel, so one ``_call`` carries every RPC). All methods are
    coroutine-safe: several tasks may call them at once on one store. A
    failed RPC raises :class:`~topoipam.daemon.core.errors.DatastoreUnavailable`
    (retriable); nothing is half-written because every write is a single
    transaction. ``gate`` (default: open) and ``on_error`` are given at
    construction.
    """

    def open_watch(self) -> WatchStream:
        """A watch stream on which watchers can be added and cancelled while it runs."""
        return WatchStream(self)
