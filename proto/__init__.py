"""Generated protobuf/gRPC modules for topoipam.v1.

Regenerate with ``python -m topoipam.proto.generate``.
"""
