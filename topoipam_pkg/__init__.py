"""topoipam: topology-aware IP address management for container networks."""
