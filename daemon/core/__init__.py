"""The pure policy and data: no asyncio, no etcd, no sockets, no files.

The model (pools, nodes, blocks, handles, sticky identities), node selectors,
the etcd key schema, the plain values of a transaction's writes, the errors,
the allocator (which pool, which block, which address) and conflict
standings. Everything here is a plain value or function, tested with tables
and properties; the daemon and the CLI read the cluster and hand it in.
"""
