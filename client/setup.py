"""Generates the gRPC stubs from ../proto at build time (they are never committed or hand-edited).

`-I proto` makes the generated imports read `from interpgw.v1 import ...`, matching the package path, so no
import rewriting is needed. They are generated when this file is loaded, before setuptools discovers packages:
generated later (in build_py), `interpgw.v1` would be missing from a wheel built from a clean checkout.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup

HERE = Path(__file__).resolve().parent


def _proto_root() -> Path:
    for candidate in (HERE.parent / "proto", HERE / "proto"):
        if (candidate / "interpgw" / "v1").is_dir():
            return candidate
    raise FileNotFoundError("proto/interpgw/v1 not found next to the client package")


def generate_stubs() -> None:
    import grpc_tools
    from grpc_tools import protoc

    root = _proto_root()
    protos = sorted(str(p.relative_to(root)) for p in (root / "interpgw" / "v1").glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


class GenerateStubs(Command):
    description = "generate gRPC stubs from proto/"
    user_options: list = []

    def initialize_options(self) -> None: ...

    def finalize_options(self) -> None: ...

    def run(self) -> None:
        generate_stubs()


generate_stubs()
setup(cmdclass={"generate_stubs": GenerateStubs})
