"""Regenerate the Python modules of bos_v1.proto (messages, type stubs, grpclib stubs).

Run from anywhere with the project's venv (dev extra: grpcio-tools):
    .venv/bin/python drivers/braiins/proto/generate.py
The generated modules are committed; this is only needed after editing the .proto. The
repository root is the include path, so the generated modules import each other as
`drivers.braiins.proto....`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PROTOS = sorted(HERE.glob("*.proto"))


def main() -> int:
    # protoc finds the grpclib plugin (protoc-gen-grpclib_python) on PATH: the venv's bin.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpclib_python_out={ROOT}",
        *(str(p.relative_to(ROOT)) for p in PROTOS),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
