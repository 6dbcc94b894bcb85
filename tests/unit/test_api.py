"""The API package: importable as generated, every message round-trips, no drift from protos/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import Message

from backfill.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
FD = _descriptor.FieldDescriptor

pytestmark = pytest.mark.unit

SCALAR_SAMPLES = {
    FD.TYPE_STRING: "héllo ✓",
    FD.TYPE_BYTES: b"\x00\xff",
    FD.TYPE_BOOL: True,
    FD.TYPE_FLOAT: 0.5,
    FD.TYPE_DOUBLE: 0.25,
    FD.TYPE_INT32: -7,
    FD.TYPE_INT64: -(2**40),
    FD.TYPE_UINT32: 2**31 + 3,
    FD.TYPE_UINT64: 2**63 + 5,
    FD.TYPE_SINT32: -9,
    FD.TYPE_SINT64: -(2**50),
}


def _fill(msg: Message, depth: int = 0) -> Message:
    """Sets every field of msg (one oneof member each) to a non-default value."""
    seen_oneofs: set[str] = set()
    for field in msg.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):
            if oneof.name in seen_oneofs:
                continue
            seen_oneofs.add(oneof.name)
        _set_field(msg, field, depth)
    return msg


def _set_field(msg: Message, field: FD, depth: int) -> None:
    repeated = field.is_repeated
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        getattr(msg, field.name)["key"] = "value"
    elif field.type == FD.TYPE_MESSAGE:
        if depth > 3:
            return
        target = getattr(msg, field.name).add() if repeated else getattr(msg, field.name)
        if field.message_type.full_name.startswith("google.protobuf."):
            target.seconds, target.nanos = 12, 345
        else:
            _fill(target, depth + 1)
    elif field.type == FD.TYPE_ENUM:
        value = field.enum_type.values[-1].number
        if repeated:
            getattr(msg, field.name).append(value)
        else:
            setattr(msg, field.name, value)
    else:
        sample = SCALAR_SAMPLES[field.type]
        if repeated:
            getattr(msg, field.name).extend([sample, sample])
        else:
            setattr(msg, field.name, sample)


MESSAGE_NAMES = sorted(inference_pb2.DESCRIPTOR.message_types_by_name)


@pytest.mark.parametrize("name", MESSAGE_NAMES)
def test_every_message_round_trips(name: str) -> None:
    cls = getattr(inference_pb2, name)
    original = _fill(cls())
    decoded = cls.FromString(original.SerializeToString())
    assert decoded == original
    if original.DESCRIPTOR.fields:
        assert decoded.ByteSize() > 0, f"{name}: the filler set nothing"


ONEOF_MEMBERS = sorted(
    (name, field.name)
    for name, desc in inference_pb2.DESCRIPTOR.message_types_by_name.items()
    for oneof in desc.oneofs
    if not oneof.name.startswith("_")  # proto3 ``optional`` fields are synthetic oneofs
    for field in oneof.fields
)


@pytest.mark.parametrize(("name", "member"), ONEOF_MEMBERS)
def test_every_oneof_member_round_trips(name: str, member: str) -> None:
    """The filler above sets each oneof's first member only; this covers the others (e.g.
    SessionRequest.batch), each with the rest of the message filled."""
    cls = getattr(inference_pb2, name)
    original = _fill(cls())
    _set_field(original, original.DESCRIPTOR.fields_by_name[member], 0)
    oneof = original.DESCRIPTOR.fields_by_name[member].containing_oneof.name
    assert original.WhichOneof(oneof) == member
    decoded = cls.FromString(original.SerializeToString())
    assert decoded == original and decoded.WhichOneof(oneof) == member


def test_enums_have_unspecified_zero() -> None:
    for enum in inference_pb2.DESCRIPTOR.enum_types_by_name.values():
        zero = enum.values_by_number[0]
        assert zero.name.endswith("_UNSPECIFIED"), enum.name


def test_servicer_has_every_rpc() -> None:
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    servicer = inference_pb2_grpc.InferenceServiceServicer
    stub_methods = {m.name for m in service.methods}
    assert stub_methods >= {"Generate", "Session", "SubmitBatch", "GetBatch",
                            "StreamBatchResults", "CancelBatch", "ListModels", "GetStats"}
    for method in service.methods:
        assert callable(getattr(servicer, method.name)), method.name
    assert service.methods_by_name["Session"].client_streaming
    assert service.methods_by_name["Session"].server_streaming
    assert service.methods_by_name["Generate"].server_streaming


def test_generated_code_is_not_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_drift_check_detects_a_changed_file(tmp_path: Path) -> None:
    """The check must fail when committed code differs from what protoc writes."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    copy = tmp_path / "v1"
    shutil.copytree(ROOT / "backfill" / "v1", copy)
    assert gen_proto.stale_files(copy) == []
    target = copy / "inference_pb2.pyi"
    target.write_bytes(target.read_bytes() + b"\n# edited by hand\n")
    (copy / "inference_pb2_grpc.py").unlink()
    assert gen_proto.stale_files(copy) == ["inference_pb2.pyi", "inference_pb2_grpc.py"]
