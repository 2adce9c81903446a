"""The topoipam library and node daemon.

``core/`` is the pure policy and data (the planner among them); ``store/`` the
etcd adapter; ``planning``, ``admin``, ``audit``, ``reports`` and ``resolve`` the
library that both the daemon and ``topoipamctl`` use; ``committer``, ``upkeep``,
``engine``, ``cache``, ``service``, ``cni_socket``, ``server`` and ``main`` the
daemon's process.
"""
