"""Generated protobuf/gRPC modules for topoipam.v1 (regenerate: python -m topoipam.proto.generate)."""
