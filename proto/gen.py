"""Regenerate the checked-in Python stubs for every proto/*.proto with grpcio-tools' bundled protoc.

`python -m pdcluster.proto.gen` rewrites them in place; `--out DIR` writes elsewhere; `--check` fails if stale.
"""
from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
# protoc sees proto/ as "pdcluster/proto/": descriptors get unique names ("pdcluster/proto/kv.proto",
# not a bare "kv.proto" that could clash in the process-wide descriptor pool), generated code imports
# siblings as `from pdcluster.proto import kv_pb2`, and a .proto imports another as
# `import "pdcluster/proto/kv.proto";`.
VIRTUAL_DIR = "pdcluster/proto"
_SERVICE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    return sorted(proto_dir.glob("*.proto"))


def has_service(proto: Path) -> bool:
    return bool(_SERVICE.search(_COMMENT.sub("", proto.read_text())))


def outputs_for(proto: Path) -> list[str]:
    """File names generated for one .proto (a _pb2_grpc.py only when it declares a service)."""
    names = [f"{proto.stem}_pb2.py", f"{proto.stem}_pb2.pyi"]
    return names + [f"{proto.stem}_pb2_grpc.py"] if has_service(proto) else names


def generate(out_dir: Path = PROTO_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on every .proto in proto_dir; returns the files written to out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for proto in proto_files(proto_dir):
            args = ["grpc_tools.protoc", f"-I{VIRTUAL_DIR}={proto_dir}", f"-I{well_known}",
                    f"--python_out={tmp}", f"--pyi_out={tmp}"]
            if has_service(proto):
                args.append(f"--grpc_python_out={tmp}")
            if protoc.main([*args, f"{VIRTUAL_DIR}/{proto.name}"]) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            for name in outputs_for(proto):
                shutil.copyfile(Path(tmp, VIRTUAL_DIR, name), out_dir / name)
                written.append(out_dir / name)
    return written


def stale(proto_dir: Path = PROTO_DIR) -> list[str]:
    """Names of checked-in stubs that differ from (or are missing next to) a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp), proto_dir)
        return [p.name for p in fresh
                if not (proto_dir / p.name).exists() or not filecmp.cmp(p, proto_dir / p.name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdcluster.proto.gen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output folder (default: proto/ itself)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        print("stale: " + ", ".join(bad) if bad else "stubs are current")
        return 1 if bad else 0
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
