"""The checked-in protobuf stubs are exactly what `python -m pdcluster.proto.gen` produces, and import."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from pdcluster.proto import gen

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"


def test_checked_in_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    protos = gen.proto_files(PROTO_DIR)
    assert "kv.proto" in [p.name for p in protos]
    fresh = gen.generate(tmp_path, PROTO_DIR)
    assert sorted(p.name for p in fresh) == sorted(n for p in protos for n in gen.outputs_for(p))
    for path in fresh:
        committed = PROTO_DIR / path.name
        assert committed.exists(), f"{path.name} is not checked in: run python -m pdcluster.proto.gen"
        assert committed.read_bytes() == path.read_bytes(), \
            f"{path.name} is stale: run python -m pdcluster.proto.gen"


def test_stubs_import_with_the_installed_runtime() -> None:
    from pdcluster.proto import kv_pb2

    assert kv_pb2.DESCRIPTOR.name == "pdcluster/proto/kv.proto"
    assert kv_pb2.KVManifest.DESCRIPTOR.full_name == "pdcluster.kv.v1.KVManifest"
    m = kv_pb2.KVManifest(version=1, blocks=[kv_pb2.BlockRef(key="k", checksum=2**64 - 1)])
    assert kv_pb2.KVManifest.FromString(m.SerializeToString()).blocks[0].checksum == 2**64 - 1


def test_service_protos_get_grpc_stubs_that_import_siblings(tmp_path: Path) -> None:
    src = tmp_path / "protos"
    src.mkdir()
    shutil.copy(PROTO_DIR / "kv.proto", src)
    (src / "gentest_echo.proto").write_text(
        'syntax = "proto3";\npackage pdcluster.gentest.v1;\nimport "pdcluster/proto/kv.proto";\n'
        "// service NotThis {} is only a comment\n"
        "service Echo { rpc Say(pdcluster.kv.v1.BlockRef) returns (pdcluster.kv.v1.BlockRef); }\n")
    out = tmp_path / "out"
    names = {p.name for p in gen.generate(out, src)}
    assert names == {"kv_pb2.py", "kv_pb2.pyi", "gentest_echo_pb2.py", "gentest_echo_pb2.pyi",
                     "gentest_echo_pb2_grpc.py"}
    grpc_stub = (out / "gentest_echo_pb2_grpc.py").read_text()
    assert "from pdcluster.proto import kv_pb2" in grpc_stub

    spec = importlib.util.spec_from_file_location("gentest_echo_pb2_grpc", out / "gentest_echo_pb2_grpc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "EchoStub") and hasattr(module, "EchoServicer")
