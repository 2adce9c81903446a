"""topoipam: topology-aware IP address management for container networks."""

import os

# grpc's C core logs failed TLS handshakes and reconnects straight to stderr at
# INFO; our own errors already say what failed, in one line. Set before any
# topoipam module imports grpc; an operator's explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
