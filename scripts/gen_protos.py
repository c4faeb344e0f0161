#!/usr/bin/env python3
"""Regenerate the Python gRPC stubs in nexus/v1/ from protos/.

Usage (from anywhere; paths are relative to the repository root):

    python scripts/gen_protos.py           # write nexus/v1/*_pb2*.py and .pyi
    python scripts/gen_protos.py --check   # exit 1 with a summary if the committed stubs are stale

The stubs are made by grpc_tools.protoc with the well-known types shipped in grpc_tools, plus
mypy-protobuf's plugins for the ``.pyi`` files. ``-Iprotos`` makes the generated imports read
``from nexus.v1 import nexus_pb2``, which resolves inside the ``nexus`` Python package.

``--check`` ignores the lines that only record which generator version wrote a file (so a newer
grpcio-tools does not fail the check by itself) and compares everything else line for line.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = Path("nexus") / "v1"
OUT_DIR = ROOT / OUT_PACKAGE
GENERATED_GLOBS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")

# Spans that only say which version of a generator wrote a file, and what to put in their place.
_VERSION_STAMPS = (
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: <any>"),
    (
        re.compile(
            r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)[^)]*?('[^']*'\s*\))"
        ),
        r"\1 <any>, \2",
    ),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = <any>"),
)


class GenerationError(RuntimeError):
    """protoc failed or a plugin is missing."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto file under proto_root, relative to it, in a stable order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def _plugin(name: str) -> str:
    """Find a protoc plugin next to this interpreter first, then on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise GenerationError(f"{name} not found: install the dev extra (mypy-protobuf)")
    return found


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc over proto_root into out_root; return the generated files relative to out_root."""
    try:
        well_known = resources.files("grpc_tools") / "_proto"
    except ModuleNotFoundError as exc:
        raise GenerationError("grpcio-tools is not installed: install the dev extra") from exc
    protos = proto_files(proto_root)
    if not protos:
        raise GenerationError(f"no .proto files under {proto_root}")
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(proto_root / p) for p in protos),
    ]
    # A child process, so protoc's and the plugins' chatter can be shown only when something fails.
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GenerationError(f"protoc exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return sorted(
        p.relative_to(out_root) for pattern in GENERATED_GLOBS for p in (out_root / OUT_PACKAGE).glob(pattern)
    )


def _committed(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root) for pattern in GENERATED_GLOBS for p in (root / OUT_PACKAGE).glob(pattern)
    )


def _normalized(text: str) -> list[str]:
    for pattern, replacement in _VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text.splitlines()


def check(root: Path = ROOT) -> list[str]:
    """Generate into a temp dir and compare with the stubs under root; return the problems found."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nexus-protos-") as tmp:
        fresh_root = Path(tmp)
        fresh = generate(fresh_root, root / "protos")
        committed = _committed(root)
        for missing in sorted(set(fresh) - set(committed)):
            problems.append(f"missing: {missing}")
        for extra in sorted(set(committed) - set(fresh)):
            problems.append(f"not generated from any .proto (stale?): {extra}")
        for rel in sorted(set(fresh) & set(committed)):
            new = _normalized((fresh_root / rel).read_text(encoding="utf-8"))
            old = _normalized((root / rel).read_text(encoding="utf-8"))
            if new != old:
                diff = list(
                    difflib.unified_diff(old, new, f"committed/{rel}", f"generated/{rel}", lineterm="")
                )
                changed = sum(1 for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---"))
                problems.append(f"differs: {rel} ({changed} changed lines)\n" + "\n".join(diff[:40]))
    return problems


def write(root: Path = ROOT) -> list[Path]:
    """Regenerate the stubs in place under root, removing stale ones; return what was written."""
    out_dir = root / OUT_PACKAGE
    for old in _committed(root):
        (root / old).unlink()
    written = generate(root, root / "protos")
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs for the nexus.v1 contract (protos/nexus/v1)."""\n')
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 if the committed stubs are out of date"
    )
    ns = parser.parse_args(argv)
    try:
        if ns.check:
            problems = check()
            if problems:
                print("gen_protos: the committed stubs in nexus/v1/ do not match protos/:", file=sys.stderr)
                for problem in problems:
                    print(textwrap.indent(problem, "  "), file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print("gen_protos: nexus/v1/ stubs are up to date")
            return 0
        for rel in write():
            print(f"wrote {rel}")
        return 0
    except GenerationError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
