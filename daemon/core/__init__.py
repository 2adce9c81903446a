"""The pure policy and data: no asyncio, no etcd, no sockets, no files.

The model (pools, nodes, blocks, handles, sticky identities), node selectors,
the etcd key schema, the plain values of a transaction's writes, the errors,
the allocator (which pool, which block, which address) and conflict
standings; and the policy that uses them: the planner (:mod:`.planner`,
with :mod:`.claims` and :mod:`.sticky`) plans a call (:mod:`.calls`) over a
read-only view of the cluster (:mod:`.view`). Everything here is a plain value
or function, tested with tables and properties and the planner against an
in-memory view; the daemon and the CLI read the cluster and hand it in.
"""
