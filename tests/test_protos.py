"""The committed gRPC stubs match protos/, and they carry the contract the README documents."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from nexus.v1 import nexus_pb2, nexus_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"

# message -> {contract field: (protobuf type, repeated)}; map fields are repeated messages.
CONTRACT_FIELDS: dict[str, dict[str, tuple[int, bool]]] = {
    "EventRequest": {
        "event_type": (FieldDescriptor.TYPE_STRING, False),
        "event_id": (FieldDescriptor.TYPE_STRING, False),
        "payload": (FieldDescriptor.TYPE_MESSAGE, False),
        "metadata": (FieldDescriptor.TYPE_MESSAGE, True),
    },
    "EventResponse": {
        "success": (FieldDescriptor.TYPE_BOOL, False),
        "message": (FieldDescriptor.TYPE_STRING, False),
        "event_type": (FieldDescriptor.TYPE_STRING, False),
        "event_id": (FieldDescriptor.TYPE_STRING, False),
        "payload": (FieldDescriptor.TYPE_MESSAGE, False),
        "metadata": (FieldDescriptor.TYPE_MESSAGE, True),
        "offset": (FieldDescriptor.TYPE_UINT64, False),
        "epoch": (FieldDescriptor.TYPE_STRING, False),
        "timestamp": (FieldDescriptor.TYPE_MESSAGE, False),
    },
    "SubscribeRequest": {
        "event_types": (FieldDescriptor.TYPE_STRING, True),
        "since_offset": (FieldDescriptor.TYPE_UINT64, False),
        "epoch": (FieldDescriptor.TYPE_STRING, False),
    },
}

MESSAGE_FIELD_TYPES = {
    ("EventRequest", "payload"): "google.protobuf.Struct",
    ("EventResponse", "payload"): "google.protobuf.Struct",
    ("EventResponse", "timestamp"): "google.protobuf.Timestamp",
}


def _run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_committed_stubs_match_protos() -> None:
    """The stubs in nexus/v1/ are exactly what scripts/gen_protos.py makes from protos/."""
    result = _run_check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_check_reports_stale_stubs(tmp_path: Path) -> None:
    """The check fails and names the file when a stub no longer matches the proto."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(GEN_SCRIPT, tmp_path / "scripts" / "gen_protos.py")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / "nexus" / "v1", tmp_path / "nexus" / "v1", ignore=shutil.ignore_patterns("__pycache__"))
    assert _run_check(tmp_path).returncode == 0

    proto = tmp_path / "protos" / "nexus" / "v1" / "nexus.proto"
    proto.write_text(proto.read_text(encoding="utf-8") + "\nmessage Extra {}\n", encoding="utf-8")
    result = _run_check(tmp_path)
    assert result.returncode == 1
    assert "differs: nexus/v1/nexus_pb2.py" in result.stderr


def test_service_exposes_contract_rpcs() -> None:
    """NexusService has EmitEvent (unary) and SubscribeEvents (server streaming) with the contract types."""
    service = nexus_pb2.DESCRIPTOR.services_by_name["NexusService"]
    assert service.full_name == "nexus.v1.NexusService"

    emit = service.methods_by_name["EmitEvent"]
    assert emit.input_type.full_name == "nexus.v1.EventRequest"
    assert emit.output_type.full_name == "nexus.v1.EventResponse"
    assert not emit.client_streaming
    assert not emit.server_streaming

    subscribe = service.methods_by_name["SubscribeEvents"]
    assert subscribe.input_type.full_name == "nexus.v1.SubscribeRequest"
    assert subscribe.output_type.full_name == "nexus.v1.EventResponse"
    assert not subscribe.client_streaming
    assert subscribe.server_streaming

    for name in ("NexusServiceStub", "NexusServiceServicer", "add_NexusServiceServicer_to_server"):
        assert hasattr(nexus_pb2_grpc, name), name
    for rpc in ("EmitEvent", "SubscribeEvents"):
        assert callable(getattr(nexus_pb2_grpc.NexusServiceServicer, rpc))


@pytest.mark.parametrize("message_name", sorted(CONTRACT_FIELDS))
def test_messages_have_contract_fields(message_name: str) -> None:
    """Each contract message has every contract field with the contract type."""
    descriptor: Descriptor = nexus_pb2.DESCRIPTOR.message_types_by_name[message_name]
    for field_name, (field_type, repeated) in CONTRACT_FIELDS[message_name].items():
        field = descriptor.fields_by_name.get(field_name)
        assert field is not None, f"{message_name}.{field_name} is missing"
        assert field.type == field_type, f"{message_name}.{field_name} has type {field.type}"
        assert field.is_repeated == repeated, f"{message_name}.{field_name} repeated={field.is_repeated}"
        expected_message = MESSAGE_FIELD_TYPES.get((message_name, field_name))
        if expected_message is not None:
            assert field.message_type is not None
            assert field.message_type.full_name == expected_message
    if "metadata" in descriptor.fields_by_name:
        entry = descriptor.fields_by_name["metadata"].message_type
        assert entry is not None
        assert entry.GetOptions().map_entry, f"{message_name}.metadata is not a map"
        assert entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
        assert entry.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING


def test_contract_messages_round_trip() -> None:
    """The generated classes accept the contract fields by name and survive serialization."""
    request = nexus_pb2.EventRequest(event_type="orders:create:v1:requested", event_id="e-1")
    request.payload.update({"n": 1, "tags": ["a"]})
    request.metadata["user_id"] = "u1"
    assert nexus_pb2.EventRequest.FromString(request.SerializeToString()) == request

    response = nexus_pb2.EventResponse(success=True, message="stored", offset=7, epoch="ep")
    response.timestamp.FromSeconds(1)
    assert nexus_pb2.EventResponse.FromString(response.SerializeToString()) == response

    subscribe = nexus_pb2.SubscribeRequest(event_types=["orders:>"], since_offset=3, epoch="ep")
    assert list(nexus_pb2.SubscribeRequest.FromString(subscribe.SerializeToString()).event_types) == ["orders:>"]
