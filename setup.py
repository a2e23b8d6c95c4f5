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
    """tailorpo/_proto is gitignored, so in a clean checkout the package list (found from pyproject before
    any command runs) lacks it: generate the stubs before build_py lists its modules and add the package."""

    def finalize_options(self) -> None:
        super().finalize_options()
        generate_stubs()
        if self.packages is not None and "tailorpo._proto" not in self.packages:
            self.packages.append("tailorpo._proto")


setup(cmdclass={"build_py": BuildPyWithStubs})
