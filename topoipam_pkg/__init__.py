"""topoipam: topology-aware IP address management for container networks."""

import os

# grpc's C core logs failed TLS handshakes and reconnects straight to stderr at
# INFO; our own errors already say what failed, in one line. Set before any
# topoipam module imports grpc; an operator's explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def package_version() -> str:
    """The installed package's version: pyproject.toml's, the one place it is written."""
    # Imported here, not at the top: importlib.metadata costs milliseconds that
    # every ``import topoipam`` (the plugin's console script too) would pay.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("topoipam")
    except PackageNotFoundError:
        return "(not installed)"
