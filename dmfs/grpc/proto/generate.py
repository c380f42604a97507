"""Generate the Python modules of the snapshots service from its .proto files.

    python -m dmfs.grpc.proto.generate          # rewrite the *_pb2*.py modules
    python -m dmfs.grpc.proto.generate --check  # exit 1 if they differ from a fresh run

The generated modules are committed, not made at build time: dmfs installs
offline from a wheelhouse (``contrib/install-system``) and runs with grpcio and
protobuf alone, so neither the install nor the daemon needs grpcio-tools (which
pulls a protoc build and setuptools); ``tests/unit/test_grpc_proto.py`` runs
``--check`` so that the committed modules never drift from the .proto files.
The output depends on the grpcio-tools version (its protoc stamps it in the
modules), which is why pyproject.toml pins grpcio-tools exactly, and on
nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
#: the directory that holds the ``dmfs`` package: protoc runs from there, so the
#: modules import each other as ``dmfs.grpc.proto.<name>_pb2``
SOURCE_ROOT = PROTO_DIR.parents[2]
PROTOS = ("mount.proto", "snapshots.proto")
#: what protoc writes for PROTOS (messages, and service stubs: none for mount.proto)
GENERATED = ("mount_pb2.py", "mount_pb2_grpc.py", "snapshots_pb2.py", "snapshots_pb2_grpc.py")


def generate(output_root: Path) -> None:
    """Run protoc (grpcio-tools') on PROTOS, writing under ``output_root``."""
    import grpc_tools  # only for development: the daemon needs none of it
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    relative = [str((PROTO_DIR / name).relative_to(SOURCE_ROOT)) for name in PROTOS]
    argv = ["grpc_tools.protoc", f"-I{SOURCE_ROOT}", f"-I{well_known}",
            f"--python_out={output_root}", f"--grpc_python_out={output_root}", *relative]
    if protoc.main(argv) != 0:
        raise SystemExit(f"protoc failed on {', '.join(relative)}")


def differences() -> list[str]:
    """The generated modules that differ from what protoc makes now."""
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        fresh = Path(scratch) / PROTO_DIR.relative_to(SOURCE_ROOT)
        return [name for name in GENERATED
                if not (PROTO_DIR / name).is_file()
                or (PROTO_DIR / name).read_bytes() != (fresh / name).read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmfs.grpc.proto.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare the committed modules with a fresh run")
    args = parser.parse_args(argv)
    if args.check:
        stale = differences()
        for name in stale:
            print(f"{PROTO_DIR / name} differs from what protoc makes of the .proto files",
                  file=sys.stderr)
        return 1 if stale else 0
    os.chdir(SOURCE_ROOT)
    generate(SOURCE_ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
