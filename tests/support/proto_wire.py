"""The wire format of a protobuf API as text: what must match for two definitions
to interoperate, and nothing else.

A line per enum value, message field and service method, with the full names,
numbers, labels and types that go on the wire (and map entries, which are
nested messages there); file names, comments, json names and options (such as
containerd's gogoproto ones, which change only its Go code) are left out.
``tests/unit/test_grpc_proto.py`` compares dmfs's generated modules with the
checked-in summary of containerd 1.6.20's definitions, and that summary with
containerd's own .proto files where Debian's golang-github-containerd-containerd-dev
has them.  ``python -m tests.support.proto_wire`` rewrites the summary from them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2

#: containerd's packages that dmfs serves
PACKAGES = ("containerd.types", "containerd.services.snapshots.v1")
#: containerd.types has more messages than the snapshots service uses
MESSAGES = {"containerd.types": ("Mount",)}
SUMMARY = Path(__file__).parents[1] / "unit" / "data" / "containerd-1.6.20-snapshots.wire"
#: where Debian's golang-github-containerd-containerd-dev and golang-github-gogo-protobuf-dev
#: put the .proto files
GOCODE = Path("/usr/share/gocode/src")
CONTAINERD_PROTOS = ("github.com/containerd/containerd/api/types/mount.proto",
                     "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto")
GOGO_INCLUDE = GOCODE / "github.com/gogo/protobuf"

_FIELD = descriptor_pb2.FieldDescriptorProto
_LABELS = {_FIELD.LABEL_OPTIONAL: "optional", _FIELD.LABEL_REPEATED: "repeated",
           _FIELD.LABEL_REQUIRED: "required"}
_TYPES = {value: name.removeprefix("TYPE_").lower()
          for name, value in _FIELD.Type.items()}


def _message_lines(prefix: str, message: descriptor_pb2.DescriptorProto) -> Iterable[str]:
    name = f"{prefix}.{message.name}"
    entry = " map_entry" if message.options.map_entry else ""
    yield f"message {name}{entry}"
    for field in sorted(message.field, key=lambda f: f.number):
        type_name = f" {field.type_name}" if field.type_name else ""
        oneof = f" oneof={message.oneof_decl[field.oneof_index].name}" \
            if field.HasField("oneof_index") else ""
        yield (f"  field {field.number} {field.name} {_LABELS[field.label]} "
               f"{_TYPES[field.type]}{type_name}{oneof}")
    for nested in sorted(message.nested_type, key=lambda m: m.name):
        yield from _message_lines(name, nested)
    for enum in sorted(message.enum_type, key=lambda e: e.name):
        yield from _enum_lines(name, enum)


def _enum_lines(prefix: str, enum: descriptor_pb2.EnumDescriptorProto) -> Iterable[str]:
    yield f"enum {prefix}.{enum.name}"
    for value in sorted(enum.value, key=lambda v: v.number):
        yield f"  value {value.number} {value.name}"


def summary(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> str:
    """The wire format of PACKAGES (MESSAGES only, where listed) in ``files``."""
    lines: list[str] = []
    for file in sorted((f for f in files if f.package in PACKAGES), key=lambda f: f.package):
        wanted = MESSAGES.get(file.package)
        if file.syntax:
            lines.append(f"syntax {file.package} {file.syntax}")
        for message in sorted(file.message_type, key=lambda m: m.name):
            if wanted is None or message.name in wanted:
                lines.extend(_message_lines(file.package, message))
        for enum in sorted(file.enum_type, key=lambda e: e.name):
            lines.extend(_enum_lines(file.package, enum))
        for service in sorted(file.service, key=lambda s: s.name):
            lines.append(f"service {file.package}.{service.name}")
            for method in service.method:  # in order: the order of the service definition
                stream_in = "stream " if method.client_streaming else ""
                stream_out = "stream " if method.server_streaming else ""
                lines.append(f"  rpc {method.name} {stream_in}{method.input_type} -> "
                             f"{stream_out}{method.output_type}")
    return "\n".join(lines) + "\n"


def generated_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The file descriptors of dmfs's generated modules."""
    from dmfs.grpc.proto import mount_pb2, snapshots_pb2

    return [descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
            for module in (mount_pb2, snapshots_pb2)]


def containerd_protos_missing() -> str | None:
    """Why containerd's own .proto files cannot be read here, or None."""
    for relative in CONTAINERD_PROTOS:
        if not (GOCODE / relative).is_file():
            return (f"{GOCODE / relative} is missing: install Debian's "
                    "golang-github-containerd-containerd-dev")
    if not (GOGO_INCLUDE / "gogoproto" / "gogo.proto").is_file():
        return "gogoproto/gogo.proto is missing: install golang-github-gogo-protobuf-dev"
    return None


def containerd_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """containerd's .proto files, parsed by grpcio-tools' protoc."""
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "containerd.pb"
        result = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{GOCODE}", f"-I{GOGO_INCLUDE}",
             f"-I{well_known}", "--include_imports", f"--descriptor_set_out={output}",
             *CONTAINERD_PROTOS], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"protoc could not parse containerd's files: {result.stderr}")
        return list(descriptor_pb2.FileDescriptorSet.FromString(output.read_bytes()).file)


if __name__ == "__main__":
    missing = containerd_protos_missing()
    if missing:
        sys.exit(missing)
    SUMMARY.write_text(summary(containerd_files()))
    print(f"wrote {SUMMARY}")
