"""Regenerate the protobuf and gRPC modules: ``python -m topoipam.proto.generate``.

``--check`` exits 1 when the committed modules differ from what the
installed grpcio-tools would generate (a test runs it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = "topoipam/v1/ipam.proto"
OUTPUTS = ("ipam_pb2.py", "ipam_pb2.pyi", "ipam_pb2_grpc.py")


def generate() -> dict[str, str]:
    """The generated modules, as text, with imports rewritten to ``topoipam.proto``."""
    from grpc_tools import protoc  # build-time only: grpcio-tools is a dev dependency

    with tempfile.TemporaryDirectory() as out:
        status = protoc.main([
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(HERE / SOURCE),
        ])
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")
        generated = {}
        for name in OUTPUTS:
            text = (Path(out) / "topoipam" / "v1" / name).read_text()
            text = text.replace("from topoipam.v1 import ipam_pb2",
                                "from topoipam.proto import ipam_pb2")
            generated[name] = text
        return generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the modules are stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        path = HERE / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"stale generated modules: {', '.join(stale)}; run python -m topoipam.proto.generate",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
