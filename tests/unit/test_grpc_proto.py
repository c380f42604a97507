"""The snapshots service's wire format is containerd 1.6.20's, and the committed
Python modules are what protoc makes of dmfs's .proto files."""

from __future__ import annotations

import difflib

import pytest
from google.protobuf import descriptor_pb2

from dmfs.grpc.proto import generate
from tests.support import proto_wire


def _diff(expected: str, actual: str) -> str:
    return "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                        "containerd", "dmfs"))


def test_generated_modules_have_containerds_wire_format() -> None:
    expected = proto_wire.SUMMARY.read_text()
    actual = proto_wire.summary(proto_wire.generated_files())
    assert actual == expected, _diff(expected, actual)


def test_checked_in_summary_is_containerds_own() -> None:
    missing = proto_wire.containerd_protos_missing()
    if missing:
        pytest.skip(missing)
    actual = proto_wire.summary(proto_wire.containerd_files())
    assert actual == proto_wire.SUMMARY.read_text(), _diff(actual, proto_wire.SUMMARY.read_text())


def test_summary_sees_a_changed_number_type_or_stream() -> None:
    """The comparison can fail: each kind of wire change shows in the summary."""
    files = proto_wire.generated_files()
    original = proto_wire.summary(files)

    def changed(change: object) -> str:
        copies = [descriptor_pb2.FileDescriptorProto.FromString(f.SerializeToString())
                  for f in files]
        change(next(f for f in copies if f.package == "containerd.services.snapshots.v1"))
        return proto_wire.summary(copies)

    def renumber(file: descriptor_pb2.FileDescriptorProto) -> None:
        info = next(m for m in file.message_type if m.name == "Info")
        info.field[2].number = 7

    def retype(file: descriptor_pb2.FileDescriptorProto) -> None:
        usage = next(m for m in file.message_type if m.name == "UsageResponse")
        usage.field[0].type = descriptor_pb2.FieldDescriptorProto.TYPE_UINT64

    def unstream(file: descriptor_pb2.FileDescriptorProto) -> None:
        file.service[0].method[7].server_streaming = False

    for change in (renumber, retype, unstream):
        assert changed(change) != original, change.__name__


def test_committed_modules_are_what_protoc_makes() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a test dependency) is missing")
    assert generate.differences() == [], (
        "regenerate them: python -m dmfs.grpc.proto.generate")
