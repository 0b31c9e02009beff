"""Build hook: generate the gRPC/protobuf modules from proto/*.proto.

The generated ``*_pb2*.py`` files are not checked in. protoc's virtual-path
mapping (``-Ishardguard/proto=proto``) makes the generated imports read
``from shardguard.proto import x_pb2``. They are written next to the
``.proto`` sources (so an editable install imports them) and into the build
directory (so a wheel carries them).
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_protos() -> list[str]:
    from grpc_tools import protoc

    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    sources = sorted(glob.glob(os.path.join(HERE, "proto", "*.proto")))
    out = os.path.join(HERE, "_gen")
    os.makedirs(out, exist_ok=True)
    for src in sources:
        args = [
            "grpc_tools.protoc",
            f"-Ishardguard/proto={os.path.join(HERE, 'proto')}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"shardguard/proto/{os.path.basename(src)}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {src}")
    generated = sorted(glob.glob(os.path.join(out, "shardguard", "proto", "*_pb2*.py")))
    for path in generated:
        shutil.copy2(path, os.path.join(HERE, "proto", os.path.basename(path)))
    shutil.rmtree(out)
    return [os.path.join(HERE, "proto", os.path.basename(p)) for p in generated]


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generated = generate_protos()
        super().run()
        if not self.editable_mode:
            target = os.path.join(self.build_lib, "shardguard", "proto")
            os.makedirs(target, exist_ok=True)
            for path in generated:
                shutil.copy2(path, target)


# The restore's checked copy (proto/_fastcopy.c). Optional: where it cannot be built the
# install goes on and proto/parallel_copy.py copies without it (slower, same checks).
FASTCOPY = Extension("shardguard.proto._fastcopy", ["proto/_fastcopy.c"],
                     extra_compile_args=["-O2"], optional=True)

setup(cmdclass={"build_py": BuildPyWithProtos}, ext_modules=[FASTCOPY])
