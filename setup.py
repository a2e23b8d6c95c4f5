"""Generates the gRPC stubs from protos/reward.proto at build time (they are never edited by hand)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_stubs() -> None:
    from grpc_tools import protoc

    out = ROOT / "tailorpo" / "_proto"
    out.mkdir(exist_ok=True)
    (out / "__init__.py").write_text('"""Generated from protos/reward.proto at build time; do not edit."""\n')
    args = [
        "grpc_tools.protoc",
        f"-Itailorpo/_proto={ROOT / 'protos'}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        str(ROOT / "protos" / "reward.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed to generate the reward service stubs")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
