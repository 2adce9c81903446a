"""The topoipam node daemon: pure core, etcd store, cache, gRPC service, lifecycle."""
