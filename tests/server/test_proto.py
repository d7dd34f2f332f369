"""The proto is documented and its committed stubs are what scripts/gen_proto makes of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "src" / "llm_service" / "api" / "v1"
GENERATED = ["llm_pb2.py", "llm_pb2.pyi", "llm_pb2_grpc.py", "llm_pb2_grpc.pyi"]


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run([ROOT / "scripts" / "gen_proto", tmp_path], check=True, capture_output=True)
    fresh = tmp_path / "llm_service" / "api" / "v1"
    stale = [n for n in GENERATED if (fresh / n).read_bytes() != (API / n).read_bytes()]
    assert not stale, f"run scripts/gen_proto: {stale} are out of date"


def undocumented(descriptor_set: Path) -> list[str]:
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(descriptor_set.read_bytes())
    (f,) = fds.file
    docs = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}
    # Paths follow descriptor.proto's field numbers: message_type 4, field 2, enum_type 5,
    # value 2, service 6, method 2.
    missing = []
    for i, m in enumerate(f.message_type):
        missing += [m.name] if not docs.get((4, i)) else []
        missing += [
            f"{m.name}.{x.name}" for j, x in enumerate(m.field) if not docs.get((4, i, 2, j))
        ]
    for i, e in enumerate(f.enum_type):
        missing += [e.name] if not docs.get((5, i)) else []
        missing += [
            f"{e.name}.{v.name}" for j, v in enumerate(e.value) if not docs.get((5, i, 2, j))
        ]
    for i, s in enumerate(f.service):
        missing += [s.name] if not docs.get((6, i)) else []
        missing += [
            f"{s.name}.{r.name}" for j, r in enumerate(s.method) if not docs.get((6, i, 2, j))
        ]
    return missing


def test_every_message_field_enum_and_method_is_documented(tmp_path: Path) -> None:
    out = tmp_path / "llm.pb"
    rc = protoc.main(
        ["protoc", f"-I{ROOT / 'src'}", "--include_source_info", f"--descriptor_set_out={out}",
         str(API / "llm.proto")]
    )  # fmt: skip
    assert rc == 0
    assert undocumented(out) == []


def test_enums_start_with_unspecified_zero() -> None:
    from llm_service.api.v1 import llm_pb2

    for enum in llm_pb2.DESCRIPTOR.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), (enum.name, zero)
    assert llm_pb2.DESCRIPTOR.package == "llm.v1"
