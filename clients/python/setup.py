"""Generates the gRPC code from ../../protos while building; never edit the output."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "protos"
OUT = HERE / "src"


def generate() -> None:
    protos = sorted(PROTO_ROOT.glob("recgw/v1/*.proto"))
    if not protos:
        if (OUT / "recgw" / "v1" / "upload_pb2.py").exists():
            return  # building from an sdist that already holds the generated code
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    from grpc_tools import protoc  # build requirement

    plugin = shutil.which("protoc-gen-mypy_grpc") or str(
        Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    )
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--plugin=protoc-gen-mypy_grpc={plugin}",
        f"--mypy_grpc_out={OUT}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in (OUT / "recgw", OUT / "recgw" / "v1"):
        (package / "__init__.py").touch()
        (package / "py.typed").touch()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
