"""Clients of the daemon and of etcd: the CNI plugin, the admin CLI, an RPC client."""
